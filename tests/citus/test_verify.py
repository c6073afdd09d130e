"""tests/engine/test_verify.py on the cluster: a ledger the engine wrote verifies (the audit
chain, balances against transfers and snapshots, holds), and every kind of tampering is named,
also through ``onecard verify``. Tampering with transfers needs the append-only guard off on
the shards: here the guard is disabled for the cluster (ALTER TABLE ... DISABLE TRIGGER,
propagated to every shard), where a single server switches it off for one session."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

import tests.engine.test_verify as single
from engine.service import Engine
from tests.engine.test_verify import *  # noqa: F403 - the module's tests and fixtures, run here

pytestmark = pytest.mark.citus


@contextlib.asynccontextmanager
async def tampering_on_the_shards(engine: Engine) -> AsyncIterator[asyncpg.Connection]:
    """A connection while the guards of transfers are off on every shard."""
    async with engine.store.pool.acquire() as conn:
        await conn.execute("SET citus.enable_unsafe_triggers = on")
        await conn.execute("ALTER TABLE transfers DISABLE TRIGGER USER")
        try:
            yield conn
        finally:
            await conn.execute("ALTER TABLE transfers ENABLE TRIGGER USER")
            await conn.execute("RESET citus.enable_unsafe_triggers")


@pytest.fixture(autouse=True)
def _tamper_on_the_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(single, "tampering", tampering_on_the_shards)
    yield

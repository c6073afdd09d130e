"""Revocation takes effect at the next request, across engine processes (contract §6: "a
revoked or disabled credential is 401 at once"); the key cache is bounded in time even when
notifications are lost."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from engine.access.apikeys import Created, KeyRing, create_key, revoke_key
from engine.access.roles import Role
from engine.service import Engine
from tests.conftest import _IDS
from tests.faults.harness import REPO_ROOT
from tests.http.served import Door, served


@pytest.fixture(scope="module")
async def door(engine: Engine) -> AsyncIterator[Door]:
    async with served(engine, _IDS) as d:
        yield d


async def _key(door: Door, name: str) -> dict[str, str]:
    async with door.engine.store.pool.acquire() as conn:
        made = await create_key(conn, role=Role.AUDITOR, name=name)
    assert isinstance(made, Created)
    return {"Authorization": f"Bearer {made.secret}"}


async def _listening(door: Door) -> None:
    keys = door.app.state.access.keys
    deadline = time.monotonic() + 10
    while not keys.listening:
        assert time.monotonic() < deadline, "the key ring never started listening"
        await asyncio.sleep(0.01)


async def test_a_key_revoked_elsewhere_is_refused_at_the_next_request(door: Door,
                                                                      dsn: str) -> None:
    headers = await _key(door, f"revoked-{door.ledger}")
    balance = f"/v1/accounts/{door.purse}/balance"
    async with door.client() as c:
        assert (await c.get(balance, headers=headers)).status_code == 200
        await _listening(door)
        assert (await c.get(balance, headers=headers)).status_code == 200  # cached now
        # another engine process (its own connection) revokes it...
        other = await asyncpg.connect(dsn)
        try:
            assert await revoke_key(other, f"revoked-{door.ledger}") == "revoked"
        finally:
            await other.close()
        # ...and the very next request with it is refused, cache or not
        r = await c.get(balance, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "unauthorized"


async def test_a_key_revoked_by_the_cli_is_refused_at_the_next_request(door: Door,
                                                                       dsn: str) -> None:
    name = f"cli-revoked-{door.ledger}"
    headers = await _key(door, name)
    path = "/v1/operator-log?limit=1"
    async with door.client() as c:
        assert (await c.get(path, headers=headers)).status_code == 200
        await _listening(door)
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "engine.cli", "apikey", "revoke", "--name", name,
             "--dsn", dsn],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert (await c.get(path, headers=headers)).status_code == 401


async def test_without_notifications_the_cache_time_bounds_a_revocation(engine: Engine) -> None:
    now = [100.0]
    ring = KeyRing(lambda: engine.store.pool, listen_dsn=None, ttl_s=1.0,
                   clock=lambda: now[0])
    async with engine.store.pool.acquire() as conn:
        made = await create_key(conn, role=Role.FINANCE, name=f"ttl-{time.time_ns()}")
        assert isinstance(made, Created)
        assert (await ring.lookup(made.secret)) == made.key
        assert ring.lookups == 1
        assert await revoke_key(conn, made.key.name) == "revoked"
    now[0] += 0.5
    assert (await ring.lookup(made.secret)) is not None  # still trusted within the cache time
    assert ring.lookups == 1
    now[0] += 0.6
    assert await ring.lookup(made.secret) is None  # re-read after it: revoked
    assert ring.lookups == 2
    assert await ring.lookup("ock_" + "A" * 43) is None  # unknown keys are cached too
    assert await ring.lookup("ock_" + "A" * 43) is None
    assert ring.lookups == 3
    await ring.close()


async def test_many_requests_with_an_uncached_key_read_it_once(engine: Engine) -> None:
    ring = KeyRing(lambda: engine.store.pool, listen_dsn=None)
    async with engine.store.pool.acquire() as conn:
        made = await create_key(conn, role=Role.CARD_OFFICE, name=f"herd-{time.time_ns()}")
    assert isinstance(made, Created)
    found = await asyncio.gather(*(ring.lookup(made.secret) for _ in range(50)))
    assert all(k == made.key for k in found)
    assert ring.lookups == 1

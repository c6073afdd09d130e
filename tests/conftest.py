"""Shared fixtures: one real PostgreSQL database per test session (no mocks).

The server comes from ``ONECARD_TEST_DSN`` (a maintenance DSN such as
``postgresql://postgres@127.0.0.1:5432/postgres``); ``.ci/run`` sets it, starting the
embedded PostgreSQL when no server is reachable. Each session creates a fresh database and
drops it at the end. Tests isolate themselves with fresh ledger and account ids (``ids``):
transfers are append-only, so nothing is ever truncated.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import msgspec
import pytest
import uvicorn
from litestar import Litestar

from engine.db.migrate import migrate
from engine.http.app import create_app
from engine.service import Engine
from tests.databases import with_database

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

# PINs and MAC keys are sealed under a secret key (engine/access/secretbox.py). One key for the
# whole session, in the environment, so that every engine of the session, in this process and
# in the `onecard serve` subprocesses it starts on the same databases, opens what the others
# sealed (a server refuses to start with a key that does not open the stored values).
os.environ.setdefault("ONECARD_SECRET_KEY", secrets.token_hex(32))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Citus suite (tests/citus, marker ``citus``) needs a cluster: it runs only when the
    marker expression asks for it (``pytest -m citus``), never in a default or ``-m 'not
    slow'`` run, whatever the environment."""
    if "citus" in (config.option.markexpr or ""):
        return
    cluster = [i for i in items if i.get_closest_marker("citus") is not None]
    if cluster:
        config.hook.pytest_deselected(items=cluster)
        items[:] = [i for i in items if i.get_closest_marker("citus") is None]


@pytest.fixture(scope="session")
def admin_dsn() -> str:
    """DSN of the maintenance database on the test server."""
    return os.environ.get("ONECARD_TEST_DSN", DEFAULT_DSN)


@pytest.fixture(scope="session")
async def dsn(admin_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test session."""
    name = f"onecard_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    conn = await asyncpg.connect(admin_dsn)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = with_database(admin_dsn, name)
    c = await asyncpg.connect(url)
    await migrate(c)
    await c.close()
    yield url
    conn = await asyncpg.connect(admin_dsn)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


@pytest.fixture(scope="session")
async def engine(dsn: str) -> AsyncIterator[Engine]:
    """A started engine (pool, store, batcher, expirer) on the session database."""
    e = Engine(dsn, expirer_interval_s=0.2)
    await e.start(run_migrations=False)
    yield e
    await e.stop()


class Ids:
    """Fresh ledger and account ids, unique within the session."""

    def __init__(self) -> None:
        self._ledger = itertools.count(1000)
        self._account = itertools.count(1_000_000)

    def ledger(self) -> int:
        """A ledger no other test uses."""
        return next(self._ledger)

    def account(self) -> int:
        """An account id no other test uses."""
        return next(self._account)

    def accounts(self, n: int) -> list[int]:
        """``n`` fresh account ids, ascending."""
        return [next(self._account) for _ in range(n)]


_IDS = Ids()


@pytest.fixture
def ids() -> Iterator[Ids]:
    """The session's id source."""
    yield _IDS


class Api(msgspec.Struct, frozen=True):
    """A live HTTP API on a real socket."""

    base_url: str
    admin_token: str
    read_token: str

    @property
    def admin(self) -> dict[str, str]:
        """Headers with the admin token."""
        return {"Authorization": f"Bearer {self.admin_token}"}

    @property
    def read(self) -> dict[str, str]:
        """Headers with the read token."""
        return {"Authorization": f"Bearer {self.read_token}"}


@contextlib.asynccontextmanager
async def live_server(app: Litestar) -> AsyncIterator[str]:
    """``app`` on uvicorn on a free port of 127.0.0.1, in the running event loop; its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=0, loop="none", lifespan="off", log_level="warning"
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture(scope="session")
async def api(engine: Engine) -> AsyncIterator[Api]:
    """The real HTTP API (Litestar on uvicorn) over the session engine, on a free port."""
    app = create_app(engine, admin_token="admin-token", read_token="read-token")
    async with live_server(app) as base_url:
        yield Api(base_url, "admin-token", "read-token")


@pytest.fixture
async def http(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the live API (no auth header set)."""
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        yield client

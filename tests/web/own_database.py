"""A test module's own database and server (import both fixtures into the module).

The console's finance page exports the day over every ledger, and without a snapshot run a
ledger's opening balances are summed from its first transfer (production takes a run at each
day's end, so the window is a day). In the session database that is every earlier test's
history, hundreds of thousands of transfers by the time the finance tests run: their pages
took over 30 s on a loaded machine. A module of finance pages gets a database of its own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from engine.db.migrate import migrate
from tests.databases import with_database
from tests.web.conftest import WebServer, serving


async def _create(admin_dsn: str, name: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = with_database(admin_dsn, name)
    c = await asyncpg.connect(url)
    try:
        await migrate(c)
    finally:
        await c.close()
    return url


async def _drop(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="module", name="dsn")
def own_dsn(admin_dsn: str) -> Iterator[str]:
    """A fresh, migrated database for this module (overrides the session's ``dsn``)."""
    name = f"onecard_test_own_{uuid.uuid4().hex[:8]}"
    url = asyncio.run(_create(admin_dsn, name))
    yield url
    asyncio.run(_drop(admin_dsn, name))


@pytest.fixture(scope="module", name="web")
def own_web(dsn: str) -> Iterator[WebServer]:
    """The app over this module's own database (overrides the session's ``web``)."""
    with serving(dsn) as server:
        yield server

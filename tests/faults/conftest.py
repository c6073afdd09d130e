"""Fixtures of the fault tests: a real server subprocess on its own scratch database, with a
funded ledger whose money must never move under hostile input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from tests.faults.harness import (
    Book,
    Campus,
    ServerProcess,
    new_book,
    open_book,
    open_campus,
    running_server,
    scratch_database,
)

# Far from the small ids and ledgers that generators favour, so that no generated request can
# name these accounts by chance: any change to them is money moved by garbage.
GUARDED_LEDGER = 424_242
GUARDED_FIRST_ID = 7_300_000_001

SQL_FINGERPRINT = """
SELECT (SELECT count(*) FROM transfers WHERE ledger = $1) AS transfers,
       (SELECT array_agg(ARRAY[id, debits_posted, credits_posted, debits_pending,
                               credits_pending] ORDER BY id)
        FROM accounts WHERE ledger = $1) AS accounts
"""
SQL_UNBALANCED_LEDGERS = """
SELECT ledger FROM accounts GROUP BY ledger
HAVING sum(debits_posted) <> sum(credits_posted) OR sum(debits_pending) <> sum(credits_pending)
"""


@dataclass
class Target:
    """A live server, its database, and the guarded ledger."""

    server: ServerProcess
    dsn: str
    book: Book

    @property
    def url(self) -> str:
        """The HTTP API's base URL."""
        return self.server.base_url

    async def fingerprint(self) -> tuple[int, list[list[int]]]:
        """The guarded ledger's transfer count and every account's four fields."""
        conn = await asyncpg.connect(self.dsn)
        try:
            r = await conn.fetchrow(SQL_FINGERPRINT, self.book.ledger)
        finally:
            await conn.close()
        assert r is not None
        return r["transfers"], [list(a) for a in r["accounts"]]

    async def unbalanced_ledgers(self) -> list[int]:
        """Ledgers whose debits and credits differ (must always be empty)."""
        conn = await asyncpg.connect(self.dsn)
        try:
            return [r["ledger"] for r in await conn.fetch(SQL_UNBALANCED_LEDGERS)]
        finally:
            await conn.close()


@pytest.fixture(scope="module")
async def target(admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    """One server per test module, on a scratch database, with the guarded ledger funded."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    async with scratch_database(admin_dsn) as dsn, running_server(dsn, log) as server:
        book = new_book(GUARDED_LEDGER, GUARDED_FIRST_ID, purses=4, merchants=2)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as c:
            await open_book(c, book)
        yield Target(server, dsn, book)


SQL_TRANSFER_COUNT = "SELECT count(*) FROM transfers WHERE ledger = $1"
SQL_BALANCES = """
SELECT id, debits_posted, credits_posted FROM accounts WHERE ledger = $1 ORDER BY id
"""


@dataclass
class IsoTarget:
    """A live server with its terminal gateway, and a campus set up in it."""

    server: ServerProcess
    dsn: str
    campus: Campus

    @property
    def port(self) -> int:
        """The gateway's TCP port."""
        assert self.server.iso_port is not None
        return self.server.iso_port

    async def fingerprint(self) -> tuple[int, list[tuple[int, int, int]]]:
        """The campus ledger's transfer count and every account's posted fields."""
        conn = await asyncpg.connect(self.dsn)
        try:
            n = await conn.fetchval(SQL_TRANSFER_COUNT, self.campus.ledger)
            rows = await conn.fetch(SQL_BALANCES, self.campus.ledger)
        finally:
            await conn.close()
        return n, [(r["id"], r["debits_posted"], r["credits_posted"]) for r in rows]


@pytest.fixture(scope="module")
async def iso_target(
    admin_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[IsoTarget]:
    """One server with the gateway per test module, with 4 terminals and 8 funded cards."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    async with scratch_database(admin_dsn) as dsn, running_server(dsn, log, iso=True) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as c:
            campus = await open_campus(c, ledger=5, terminals=4, holders=8)
        yield IsoTarget(server, dsn, campus)

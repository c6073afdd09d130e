"""Upgrade safety: this release starts on a database the previous release filled.

``fixtures/release-abc9096.sql`` is such a database (accounts, holders, cards, terminals,
transfers, holds settled, pending, voided and expired, a snapshot, remembered gateway answers
and a reversal), made by that release's own code and dumped (``fixtures/fill_release.py`` says
how), so the test needs no git history. Loading it, migrating with this release, and running
this release's engine on it must keep every row, keep ``verify`` clean, and go on posting.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import asyncpg
import msgspec
import pytest

from engine.db.migrate import migrate, migration_files
from engine.db.pool import create_pool
from engine.finance.verify import verify
from engine.service import Engine
from ledger.status import TransferStatus
from ledger.transfer import Transfer
from ledger.types import TransferCode
from terminals.iso8583 import Message
from tests.databases import scratch_database

FIXTURE: Final = Path(__file__).parent / "fixtures" / "release-abc9096.sql"
TABLES: Final = (
    "ledgers", "accounts", "transfers", "holds", "audit_batches", "balance_snapshots",
    "snapshot_runs", "holders", "cards", "terminals", "reversals", "gateway_responses",
)


def _fixture_sql() -> str:
    return FIXTURE.read_text(encoding="utf-8")


@pytest.fixture
async def previous_release(admin_dsn: str) -> AsyncIterator[str]:
    """A fresh database holding the previous release's data, exactly as it left it."""
    async with scratch_database(admin_dsn, prefix="onecard_upgrade") as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(_fixture_sql())
        finally:
            await conn.close()
        yield url


async def buy_a_meal(engine: Engine) -> None:
    """The release's first purse with money pays its canteen 100 fen: the engine posts on the
    old rows."""
    async with engine.store.pool.acquire() as c:
        purse = await c.fetchrow(
            "SELECT ledger, id FROM accounts WHERE kind = 'purse' "
            "AND credits_posted - debits_posted - debits_pending >= 100 ORDER BY id LIMIT 1")
        canteen = await c.fetchval("SELECT id FROM accounts WHERE kind = 'merchant'")
    assert purse is not None
    [r] = await engine.batcher.submit([Transfer(
        id=uuid.uuid4(), ledger=purse["ledger"], debit_account_id=purse["id"],
        credit_account_id=canteen, amount=100, code=TransferCode.MEAL)])
    assert r.status is TransferStatus.CREATED


# The previous release's columns of each table: this release adds columns (sealed secrets), and
# the comparison is of the data that was there.
SQL_COLUMNS = """
SELECT table_name::text, array_agg(column_name::text ORDER BY ordinal_position) AS cols
FROM information_schema.columns WHERE table_schema = 'public' GROUP BY table_name
"""
# Migration 0005 gives every ledger with holders its subsidy fund (subsidies no longer create
# it): the only rows an upgrade may add. They are compared apart.
NOT_A_FUND: Final = "WHERE t.kind <> 'fund'"


async def _columns(dsn: str) -> dict[str, list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["table_name"]: r["cols"] for r in await conn.fetch(SQL_COLUMNS)}
    finally:
        await conn.close()


async def _contents(dsn: str, columns: dict[str, list[str]]) -> dict[str, tuple[int, str]]:
    """Every table's row count and a digest of its rows (``columns`` of each table)."""
    conn = await asyncpg.connect(dsn)
    try:
        found: dict[str, tuple[int, str]] = {}
        for table in TABLES:
            row_text = "ROW(" + ", ".join(f"t.{c}" for c in columns[table]) + ")::text"
            where = NOT_A_FUND if table == "accounts" else ""
            row = await conn.fetchrow(
                f"SELECT count(*) AS n, md5(coalesce(string_agg({row_text}, '|' "
                f"ORDER BY {row_text}), '')) AS digest FROM {table} t {where}"
            )
            assert row is not None
            found[table] = (row["n"], row["digest"])
        return found
    finally:
        await conn.close()


async def _funds(dsn: str) -> tuple[set[tuple[int, int]], set[int]]:
    """(ledger, id) of every fund account, and the ledgers that have holders."""
    conn = await asyncpg.connect(dsn)
    try:
        funds = {(r["ledger"], r["id"]) for r in await conn.fetch(
            "SELECT ledger, id FROM accounts WHERE kind = 'fund'")}
        with_holders = {r["ledger"] for r in await conn.fetch(
            "SELECT DISTINCT ledger FROM holders")}
        return funds, with_holders
    finally:
        await conn.close()


async def test_this_release_starts_on_the_previous_release_database(
    previous_release: str,
) -> None:
    columns = await _columns(previous_release)
    before = await _contents(previous_release, columns)
    funds_before, with_holders = await _funds(previous_release)
    assert before["transfers"][0] > 0 and before["gateway_responses"][0] > 0
    conn = await asyncpg.connect(previous_release)
    try:
        old = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        applied = await migrate(conn)  # the release's migrations are unchanged (checksums)
        answers = [r["response"] for r in await conn.fetch(
            "SELECT response FROM gateway_responses")]
    finally:
        await conn.close()
    assert applied == [name for name, _ in migration_files() if name not in old]
    assert await _contents(previous_release, columns) == before  # data intact
    funds_after, _ = await _funds(previous_release)
    assert funds_before <= funds_after  # the old funds stay; a fund for every holders' ledger
    assert {ledger for ledger, _ in funds_after} == {lg for lg, _ in funds_before} | with_holders
    # the answers the old gateway remembered are still answers this one can send again
    for raw in answers:
        assert msgspec.json.decode(raw, type=Message).rrn

    pool = await create_pool(previous_release, max_size=2)
    try:
        report = await verify(pool)
    finally:
        await pool.close()
    assert report.ok, report.first()
    assert report.transfers == before["transfers"][0] and report.expired_holds >= 1

    engine = Engine(previous_release)
    await engine.start()  # as `onecard serve` does: migrations, committer, expirer
    try:
        await buy_a_meal(engine)
        report = await verify(engine.store.pool)
    finally:
        await engine.stop()
    assert report.ok, report.first()
    assert report.transfers == before["transfers"][0] + 1

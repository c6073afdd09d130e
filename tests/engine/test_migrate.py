"""``engine.migrate`` on scratch databases of the test server: apply once, never twice, refuse
changed history, serialise concurrent migrators; and the schema keeps transfers append-only."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from engine.db.migrate import MigrationError, migrate, migration_files
from engine.limits import MIGRATION_LOCK_KEY
from tests.databases import scratch_database


@pytest.fixture
async def scratch(admin_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty database (no migrations), dropped afterwards."""
    async with scratch_database(admin_dsn, prefix="onecard_migrate") as url:
        yield url


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


async def _advisory_locks(conn: asyncpg.Connection) -> int:
    n: int = await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 "
        "AND classid = $2 AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())",
        MIGRATION_LOCK_KEY & 0xFFFFFFFF, MIGRATION_LOCK_KEY >> 32)
    return n


def test_migration_files_are_numbered_and_unique() -> None:
    names = [n for n, _ in migration_files()]
    assert names and names[0] == "0001_ledger.sql"
    assert names == sorted(names)
    numbers = [n.split("_", 1)[0] for n in names]
    assert all(len(x) == 4 and x.isdigit() for x in numbers)
    assert len(set(numbers)) == len(numbers), "two migrations share a number"


async def test_applies_everything_once(scratch: str) -> None:
    conn = await asyncpg.connect(scratch)
    try:
        files = migration_files()
        applied = await migrate(conn)
        assert applied == [n for n, _ in files]
        tables = await _tables(conn)
        assert {"schema_migrations", "ledgers", "accounts", "transfers", "holds",
                "audit_batches", "balance_snapshots", "snapshot_runs"} <= tables
        recorded = {r["name"]: r["sha256"]
                    for r in await conn.fetch("SELECT name, sha256 FROM schema_migrations")}
        assert recorded == {n: hashlib.sha256(sql.encode()).hexdigest() for n, sql in files}

        assert await migrate(conn) == []
        assert await migrate(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(files)
        assert await _advisory_locks(conn) == 0  # released after each run
    finally:
        await conn.close()


async def test_changed_applied_file_is_refused(scratch: str) -> None:
    conn = await asyncpg.connect(scratch)
    try:
        await migrate(conn)
        await conn.execute(
            "UPDATE schema_migrations SET sha256 = $1 WHERE name = '0001_ledger.sql'",
            hashlib.sha256(b"someone edited history").hexdigest())
        with pytest.raises(MigrationError, match=r"0001_ledger\.sql"):
            await migrate(conn)
        # the failure releases the lock: another migrator is not stuck behind it
        assert await _advisory_locks(conn) == 0
        other = await asyncpg.connect(scratch)
        try:
            async with asyncio.timeout(10):
                with pytest.raises(MigrationError):
                    await migrate(other)
        finally:
            await other.close()
    finally:
        await conn.close()


async def test_failed_migration_rolls_back_and_is_not_recorded(scratch: str) -> None:
    # a database where 0001's tables exist but nothing is recorded: applying fails cleanly
    conn = await asyncpg.connect(scratch)
    try:
        await conn.execute("CREATE TABLE ledgers (ledger integer PRIMARY KEY)")
        with pytest.raises(MigrationError, match=r"0001_ledger\.sql"):
            await migrate(conn)
        # the failed file rolled back entirely and was not recorded
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 0
        assert "accounts" not in await _tables(conn)
        assert await _advisory_locks(conn) == 0
    finally:
        await conn.close()


async def test_concurrent_migrators_are_serialised(scratch: str) -> None:
    conns = [await asyncpg.connect(scratch) for _ in range(6)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        names = [n for n, _ in migration_files()]
        assert sorted(results, key=len) == [[]] * 5 + [names]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == len(names)
        for c in conns:
            assert await migrate(c) == []
    finally:
        for c in conns:
            await c.close()


async def test_migrator_waits_for_the_lock(scratch: str) -> None:
    holder, waiter = await asyncpg.connect(scratch), await asyncpg.connect(scratch)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        task = asyncio.create_task(migrate(waiter))
        await asyncio.sleep(0.5)
        assert not task.done(), "migrate ran while another migrator held the lock"
        assert "accounts" not in await _tables(holder)
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        async with asyncio.timeout(30):
            assert await task == [n for n, _ in migration_files()]
    finally:
        await holder.close()
        await waiter.close()


async def test_transfers_are_append_only(scratch: str) -> None:
    conn = await asyncpg.connect(scratch)
    try:
        await migrate(conn)
        tid = uuid.uuid4()
        await conn.execute(
            "INSERT INTO transfers (ledger, id, debit_account_id, credit_account_id, amount, "
            "code, flags, timestamp) VALUES (1, $1, 1, 2, 100, 1, 0, 1)", tid)
        for sql in (
            "UPDATE transfers SET amount = 1 WHERE id = $1",
            "UPDATE transfers SET user_data = 'x' WHERE id = $1",
            "DELETE FROM transfers WHERE id = $1",
        ):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await conn.execute(sql, tid)
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("TRUNCATE transfers")
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("TRUNCATE transfers CASCADE")
        row = await conn.fetchrow("SELECT amount, user_data FROM transfers WHERE id = $1", tid)
        assert row is not None
        assert (row["amount"], row["user_data"]) == (100, None)
        # amounts are never negative, even written by hand
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO transfers (ledger, id, debit_account_id, credit_account_id, "
                "amount, code, flags, timestamp) VALUES (1, $1, 1, 2, -5, 1, 0, 2)",
                uuid.uuid4())
        # one timestamp per ledger
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO transfers (ledger, id, debit_account_id, credit_account_id, "
                "amount, code, flags, timestamp) VALUES (1, $1, 1, 2, 5, 1, 0, 1)",
                uuid.uuid4())
    finally:
        await conn.close()

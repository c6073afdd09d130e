"""The operator log: group-committed appends with consecutive ids, append-only in the
database, and ``onecard verify`` naming a changed, deleted or inserted entry."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest

from engine.access import oplog
from engine.access.oplog import Entry, OperatorLog
from engine.db.migrate import migrate
from engine.db.pool import create_pool
from engine.finance.verify import verify
from engine.finance.verify_report import Rank
from tests.databases import scratch_database
from tests.faults.harness import REPO_ROOT


@pytest.fixture(scope="module")
async def dsn(admin_dsn: str) -> AsyncIterator[str]:
    """A database of this module's own: its operator log is the only one in it."""
    async with scratch_database(admin_dsn, prefix="onecard_oplog") as url:
        conn = await asyncpg.connect(url)
        await migrate(conn)
        await conn.close()
        yield url


@pytest.fixture(scope="module")
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(dsn, max_size=4)
    yield p
    await p.close()


def entry(n: int) -> Entry:
    return Entry(f"key-{n}", "admin", "POST /v1/holders", f"id=H{n}", "200 created")


@contextlib.asynccontextmanager
async def tampering(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
    """A connection on which the append-only triggers do not fire (as a superuser could)."""
    async with pool.acquire() as conn:
        await conn.execute("SET session_replication_role = replica")
        try:
            yield conn
        finally:
            await conn.execute("SET session_replication_role = DEFAULT")


async def problems(pool: asyncpg.Pool) -> list[tuple[str, str]]:
    report = await verify(pool)
    return [(p.subject, p.detail) for p in report.ordered() if p.rank is Rank.OPERATOR_LOG]


async def test_concurrent_appends_share_transactions_and_chain(pool: asyncpg.Pool) -> None:
    log = OperatorLog(lambda: pool)
    ids = await asyncio.gather(*(log.record(entry(n)) for n in range(60)))
    assert sorted(ids) == list(range(ids[0], ids[0] + 60))  # consecutive, none lost
    assert log.transactions < 60  # grouped: requests arriving together share a commit
    async with pool.acquire() as conn:
        page, next_before = await oplog.page(conn, limit=25, before=None)
        assert [e.id for e in page] == list(range(max(ids), max(ids) - 25, -1))
        older, _ = await oplog.page(conn, limit=25, before=next_before)
        assert older[0].id == page[-1].id - 1
        assert (await oplog.check_chain(conn))[1] == []
    report = await verify(pool)
    assert report.ok and report.operator_log >= 60


async def test_appenders_of_several_processes_share_one_chain(pool: asyncpg.Pool) -> None:
    # each OperatorLog remembers the head it left; another one moving it costs a retry
    logs = [OperatorLog(lambda: pool) for _ in range(3)]
    for log in logs:
        await log.record(entry(0))  # every one has a head in memory now, soon stale
    ids = await asyncio.gather(*(log.record(entry(n)) for n in range(30) for log in logs))
    assert len(set(ids)) == 90 and max(ids) - min(ids) == 89
    async with pool.acquire() as conn:
        assert (await oplog.check_chain(conn))[1] == []


async def test_the_log_refuses_updates_and_deletes(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await oplog.record(conn, entry(1))
        for sql in ("UPDATE operator_log SET outcome = 'x'", "DELETE FROM operator_log",
                    "TRUNCATE operator_log"):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await conn.execute(sql)


async def test_verify_names_a_changed_entry(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        n = await oplog.record(conn, entry(7))
        await oplog.record(conn, entry(8))
    async with tampering(pool) as conn:
        await conn.execute("UPDATE operator_log SET actor = 'someone-else' WHERE id = $1", n)
        try:
            found = await problems(pool)
        finally:
            await conn.execute("UPDATE operator_log SET actor = 'key-7' WHERE id = $1", n)
        # changed and re-hashed: the next entry no longer continues the chain
        forged = await conn.fetchrow("SELECT * FROM operator_log WHERE id = $1", n)
        assert forged is not None
        fake = oplog.Logged(n, forged["at"], "someone-else", forged["role"], forged["action"],
                            forged["target"], forged["outcome"])
        await conn.execute("UPDATE operator_log SET actor = $2, hash = $3 WHERE id = $1", n,
                           "someone-else", oplog.entry_hash(forged["prev_hash"], fake))
        try:
            rehashed = await problems(pool)
        finally:
            await conn.execute("UPDATE operator_log SET actor = 'key-7', hash = $2 WHERE id = $1",
                               n, forged["hash"])
    assert found == [(f"operator log entry {n}",
                      "changed after it was written: its hash no longer matches")]
    assert rehashed[0][0] == f"operator log entry {n + 1}"
    assert f"entry {n} was changed or replaced" in rehashed[0][1]
    assert await problems(pool) == []


async def test_verify_names_a_deleted_entry(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        ids = [await oplog.record(conn, entry(n)) for n in range(3)]
    async with tampering(pool) as conn:
        for victim in (ids[1], ids[2]):  # one in the middle, then the last one
            row = await conn.fetchrow("SELECT * FROM operator_log WHERE id = $1", victim)
            assert row is not None
            await conn.execute("DELETE FROM operator_log WHERE id = $1", victim)
            try:
                found = await problems(pool)
            finally:
                await conn.execute(
                    "INSERT INTO operator_log VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    *row)
            assert found[0][0] == f"operator log entry {victim}", found
            assert found[0][1].startswith("deleted"), found
    assert await problems(pool) == []


async def test_verify_names_an_inserted_entry_and_the_cli_fails(
    pool: asyncpg.Pool, dsn: str
) -> None:
    async with pool.acquire() as conn:
        last = await oplog.record(conn, entry(9))
        head = await conn.fetchval("SELECT head FROM operator_log_heads WHERE ledger = 0")
    forged = oplog.Logged(last + 1, 1, "intruder", "admin", "POST /v1/transfers", "-", "200")
    async with tampering(pool) as conn:
        await conn.execute(
            "INSERT INTO operator_log VALUES (0, $1, $2, $3, $4, $5, $6, $7, $8, $9)",
            forged.id, forged.at, forged.actor, forged.role, forged.action, forged.target,
            forged.outcome, head, oplog.entry_hash(head, forged))
        try:
            found = await problems(pool)
            cli = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "engine.cli", "verify", "--dsn", dsn],
                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
        finally:
            await conn.execute("DELETE FROM operator_log WHERE id = $1", forged.id)
    assert found == [(f"operator log entry {last + 1}",
                      f"inserted outside the engine: the chain's head ends at entry {last}")]
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert cli.stdout.startswith(f"FAILED: operator log entry {last + 1}: inserted")
    assert await problems(pool) == []


async def test_any_text_is_stored_as_hashed(pool: asyncpg.Pool) -> None:
    odd = Entry('ac"tor\\', "r\u00f4le", "POST /v1/x\n", "\u4e2d\u6587 \u0000 " + "t" * 300,
                "200 \ud7ff")
    async with pool.acquire() as conn:
        n = await oplog.record(conn, odd)
        row = await conn.fetchrow("SELECT * FROM operator_log WHERE id = $1", n)
        assert row is not None
        assert (row["actor"], row["role"], row["action"]) == ('ac"tor\\', "r\u00f4le",
                                                             "POST /v1/x?")
        assert row["target"].startswith("\u4e2d\u6587 ? t") and row["target"].endswith("...")
        assert len(row["target"]) == 200
        assert (await oplog.check_chain(conn))[1] == []

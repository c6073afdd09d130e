"""Retention on the cluster (engine/db/retention.py, ``cluster=True``): remembered terminal
answers, login failures and wrong PINs deleted ledger by ledger through their keys, each
statement on one worker; the replicated web sessions by their key, the same rows on every
copy; newer rows kept."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from engine.db.pool import create_pool
from engine.db.retention import RULES, Pruned, Window, prune, windows_from_env
from tests.conftest import Ids
from tests.db.test_retention import SQL_ANSWER, SQL_OLD_ROWS

pytestmark = pytest.mark.citus

SQL_COPIES = """
SELECT DISTINCT result FROM run_command_on_placements(
    'web_sessions', 'SELECT string_agg(subject, '','' ORDER BY subject) FROM %s')
"""


async def test_old_rows_go_ledger_by_ledger_and_by_key(dsn: str, ids: Ids) -> None:
    one, two = ids.ledger(), ids.ledger()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany("INSERT INTO ledgers (ledger) VALUES ($1)", [(one,), (two,)])
        await conn.execute(SQL_ANSWER, one, timedelta(days=40), 25)
        await conn.execute(SQL_ANSWER, two, timedelta(days=40), 7)
        await conn.execute(SQL_ANSWER, two, timedelta(minutes=1), 5)
        await conn.execute("DELETE FROM web_sessions; DELETE FROM login_failures;")
        await conn.execute(SQL_OLD_ROWS.replace("SELECT 1, 'holder'", f"SELECT {one}, 'holder'"))
    finally:
        await conn.close()
    windows = {w.rule.table: w for w in windows_from_env(RULES, environ={})}
    pool = await create_pool(dsn, max_size=2)
    try:
        answers = Window(windows["gateway_responses"].rule, timedelta(days=35))
        done = await prune(pool, answers, batch=10, pause_s=0, cluster=True)
        sessions = await prune(pool, windows["web_sessions"], batch=10, pause_s=0, cluster=True)
        failures = await prune(pool, windows["login_failures"], batch=10, pause_s=0,
                               cluster=True)
        async with pool.acquire() as c:
            left = [await c.fetchval(
                "SELECT count(*) FROM gateway_responses WHERE ledger = $1", x) for x in (one, two)]
            copies = [r[0] for r in await c.fetch(SQL_COPIES)]
            failed = await c.fetchval("SELECT count(*) FROM login_failures WHERE ledger = $1",
                                      one)
    finally:
        await pool.close()
    assert done.rows == 32 and left == [0, 5]
    assert sessions.rows == 24
    assert len(copies) == 1  # every copy of the replicated table kept the same 24 sessions
    assert failures == Pruned(rows=2, statements=failures.statements) and failed == 8

"""Bounded growth (engine/db/retention.py): remembered terminal answers past their window are
deleted in small batches with a metric; newer ones stay; a retransmission or reversal arriving
after its answer was pruned is answered as for a request the gateway never saw, and still moves
money once; ``onecard serve`` runs the pruner."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Final

import asyncpg
import httpx
import pytest

from engine import metrics
from engine.campus import Campus
from engine.db.migrate import migrate
from engine.db.pool import create_pool
from engine.db.retention import (
    ANSWER_RETENTION_ENV,
    RULES,
    Pruned,
    Window,
    prune,
    rule,
    windows_from_env,
)
from engine.finance.verify import verify
from engine.service import Engine
from terminals.gateway import Gateway
from tests.conftest import Ids
from tests.databases import scratch_database
from tests.engine.test_cli import START_TIMEOUT_S, _kill, _run, _serve, _terminate, _wait_healthy
from tests.terminals.test_gateway_flows import World

ANSWERS: Final = RULES[0]
SQL_ANSWER: Final = """
INSERT INTO gateway_responses (ledger, key, terminal_id, request_digest, rrn, response,
                               created_at)
SELECT $1, gen_random_uuid(), 'T0000001', '\\x00', gen_random_uuid()::text, '{}',
       now() - $2::interval
FROM generate_series(1, $3) g
"""
SQL_COUNT: Final = "SELECT count(*) FROM gateway_responses WHERE ledger = $1"


async def _add_answers(dsn: str, ledger: int, age: timedelta, n: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SQL_ANSWER, ledger, age, n)
    finally:
        await conn.close()


async def _counts(dsn: str, *ledgers: int) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [await conn.fetchval(SQL_COUNT, ledger) for ledger in ledgers]
    finally:
        await conn.close()


def _pruned_total() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "onecard_pruned_rows_total", {"table": "gateway_responses"}
    )
    return value or 0.0


@pytest.fixture
async def scratch(admin_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database: the pruner sees exactly the rows a test puts there."""
    async with scratch_database(admin_dsn, prefix="onecard_ops") as url:
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield url


async def _clocks(dsn: str, *ledgers: int) -> None:
    """Clock rows for ``ledgers``: on a cluster the pruner takes its ledgers from them."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany("INSERT INTO ledgers (ledger) VALUES ($1)", [(x,) for x in ledgers])
    finally:
        await conn.close()


# cluster: the statements a Citus cluster runs (per ledger from the clocks, and ledger 0; a
# replicated table by its key), on a plain PostgreSQL (tests/citus runs them on a cluster)
@pytest.mark.parametrize("cluster", [False, True])
async def test_old_answers_are_pruned_in_batches_newer_kept(scratch: str, cluster: bool) -> None:
    await _add_answers(scratch, 1, timedelta(days=40), 25)
    await _add_answers(scratch, 2, timedelta(days=36), 7)
    await _add_answers(scratch, 1, timedelta(days=34), 5)  # inside the window
    await _add_answers(scratch, 2, timedelta(minutes=1), 5)
    await _clocks(scratch, 1, 2)
    before = _pruned_total()
    window = Window(ANSWERS, timedelta(days=35))
    pool = await create_pool(scratch, max_size=2)
    try:
        done = await prune(pool, window, batch=10, pause_s=0, cluster=cluster)
        again = await prune(pool, window, batch=10, pause_s=0, cluster=cluster)
    finally:
        await pool.close()
    # ledger 1: 10 + 10 + 5, ledger 2: 7 (and on a cluster one statement for ledger 0)
    assert done == Pruned(rows=32, statements=5 if cluster else 4)
    assert again == Pruned(rows=0, statements=3 if cluster else 2)
    assert await _counts(scratch, 1, 2) == [5, 5]
    assert _pruned_total() - before == 32


async def test_a_rule_without_scope(scratch: str) -> None:
    # a table with just a time column
    sessions = rule(table="ops_sessions", time_column="expires_at", scope_column=None,
                    env="ONECARD_TEST_SESSION_DAYS", default_days=1)
    conn = await asyncpg.connect(scratch)
    try:
        await conn.execute("CREATE TABLE ops_sessions (expires_at timestamptz NOT NULL); "
                           "INSERT INTO ops_sessions SELECT now() - g * interval '1 hour' "
                           "FROM generate_series(0, 47) g")
    finally:
        await conn.close()
    pool = await create_pool(scratch, max_size=1)
    try:
        done = await prune(pool, windows_from_env([sessions], environ={})[0], batch=10)
    finally:
        await pool.close()
    assert done == Pruned(rows=24, statements=3)  # 24 h (a moment past by now) .. 47 h old
    with pytest.raises(ValueError, match="identifier"):
        rule(table="x; DROP TABLE y", time_column="t", scope_column=None, env="E",
             default_days=1)


SQL_OLD_ROWS: Final = """
INSERT INTO web_sessions (id_hash, kind, subject, csrf, created_at, last_seen)
SELECT sha256(g::text::bytea), 'self', 'S' || g, sha256(('c' || g)::bytea),
       now() - g * interval '1 hour', now() - g * interval '1 hour'
FROM generate_series(0, 47) g;
INSERT INTO login_failures (ledger, realm, subject, failures, window_start, locked_until)
SELECT 1, 'holder', 'H' || g,
       5, (extract(epoch FROM now() - g * interval '1 day') * 1e9)::bigint,
       CASE WHEN g = 9 THEN (extract(epoch FROM now()) * 1e9)::bigint ELSE 0 END
FROM generate_series(0, 9) g;
"""


@pytest.mark.parametrize("cluster", [False, True])
async def test_sessions_and_login_failures_are_pruned(scratch: str, cluster: bool) -> None:
    by_table = {r.table: r for r in RULES}
    assert {"web_sessions", "login_failures", "pin_tries"} <= set(by_table)
    conn = await asyncpg.connect(scratch)
    try:
        await conn.execute(SQL_OLD_ROWS)
    finally:
        await conn.close()
    await _clocks(scratch, 1)
    windows = {w.rule.table: w for w in windows_from_env(RULES, environ={})}
    pool = await create_pool(scratch, max_size=1)
    try:
        sessions = await prune(pool, windows["web_sessions"], batch=10, pause_s=0,
                               cluster=cluster)
        failures = await prune(pool, windows["login_failures"], batch=10, pause_s=0,
                               cluster=cluster)
        tries = await prune(pool, windows["pin_tries"], batch=10, pause_s=0, cluster=cluster)
        async with pool.acquire() as c:
            left = await c.fetch("SELECT subject FROM login_failures ORDER BY subject")
    finally:
        await pool.close()
    assert sessions.rows == 24  # not seen for a day (24 h, a moment past by now) .. 47 h
    # failures older than 7 days go, unless the subject is locked right now (H9)
    assert failures.rows == 2 and [r["subject"] for r in left] == [f"H{g}" for g in
                                                                     (0, 1, 2, 3, 4, 5, 6, 9)]
    assert tries.rows == 0  # nothing there: the statement runs on the bigint column


def test_the_window_comes_from_the_environment() -> None:
    keep = {w.rule.table: w.keep for w in windows_from_env(environ={})}
    assert keep == {"gateway_responses": timedelta(days=35), "web_sessions": timedelta(days=1),
                    "login_failures": timedelta(days=7), "pin_tries": timedelta(days=7)}
    [w, *_] = windows_from_env(environ={ANSWER_RETENTION_ENV: " 90 "})
    assert w.keep == timedelta(days=90)
    for bad in ("0", "-3", "35d", "1.5"):
        with pytest.raises(ValueError, match=ANSWER_RETENTION_ENV):
            windows_from_env(environ={ANSWER_RETENTION_ENV: bad})


@pytest.fixture
async def world(engine: Engine, ids: Ids) -> AsyncIterator[World]:
    campus = Campus(engine)
    gateway = Gateway(engine, campus=campus)
    await gateway.start("127.0.0.1", 0)
    w = await World(engine, campus, gateway, ids).setup()
    try:
        yield w
    finally:
        await w.close()
        await gateway.stop()


async def _forget_answers(engine: Engine, ledger: int) -> int:
    """Age the ledger's remembered answers past the window and prune; rows pruned."""
    async with engine.store.pool.acquire() as conn:
        await conn.execute("UPDATE gateway_responses SET created_at = now() - interval "
                           "'36 days' WHERE ledger = $1", ledger)
    done = await prune(engine.store.pool, windows_from_env(environ={})[0])
    assert await _counts(engine.dsn, ledger) == [0]
    return done.rows


async def test_requests_after_their_answer_was_pruned(world: World, engine: Engine) -> None:
    w = world
    p = await w.person(cash=5_000)
    purchase = w.pos.purchase(p.card, 1_000)
    first = await w.pos.request(purchase)
    assert first.response_code == "00"
    assert await w.pos.request(purchase) == first  # remembered
    assert await _forget_answers(engine, w.ledger) >= 1

    # A retransmission past the window is a request the gateway has not seen: it reaches the
    # campus again, whose derived transfer ids post nothing twice.
    late = await w.pos.request(purchase)
    assert late.response_code == "00" and late.rrn == first.rrn
    assert await w.purses(p) == (4_000, 0)
    assert await w.balance(w.canteen) == 1_000
    assert await _counts(engine.dsn, w.ledger) == [1]  # remembered again, from now on

    # A reversal past the window: answered 00 as always, the money comes back once.
    await _forget_answers(engine, w.ledger)
    reversal = w.pos.reversal(purchase)
    assert (await w.pos.request(reversal)).response_code == "00"
    await _forget_answers(engine, w.ledger)
    assert (await w.pos.request(reversal)).response_code == "00"
    assert await w.purses(p) == (5_000, 0)
    assert await w.balance(w.canteen) == 0
    report = await verify(engine.store.pool, ledgers=[w.ledger])  # never reads pruned rows
    assert report.ok, report.first()


async def test_serve_runs_the_pruner(scratch: str, tmp_path: Path) -> None:
    ledger = 77
    await _add_answers(scratch, ledger, timedelta(days=40), 3)
    await _add_answers(scratch, ledger, timedelta(days=1), 2)
    s = await _serve(tmp_path, "--dsn", scratch, "--data-dir", str(tmp_path))
    try:
        await _wait_healthy(s, START_TIMEOUT_S)
        deadline = time.monotonic() + 30
        while await _counts(scratch, ledger) != [2]:
            assert time.monotonic() < deadline, s.output()
            await asyncio.sleep(0.1)
        async with httpx.AsyncClient(base_url=s.url, timeout=10) as c:
            text = (await c.get("/metrics")).text
        assert 'onecard_pruned_rows_total{table="gateway_responses"} 3.0' in text
        assert "onecard_prune_last_pass_timestamp_seconds" in text
        code, _ = await _terminate(s)
        assert code == 0, s.output()
    finally:
        await _kill(s)


async def test_serve_refuses_a_bad_retention_window(tmp_path: Path) -> None:
    code, _, err = await _run("serve", "--dsn", "postgresql://x@127.0.0.1:1/none",
                              "--data-dir", str(tmp_path), **{ANSWER_RETENTION_ENV: "soon"})
    assert code == 2 and ANSWER_RETENTION_ENV in err


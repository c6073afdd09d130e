"""End-of-day snapshots: the campus calendar, the once-a-day scheduler (restart-safe, race-safe)
and proof from the query plan that ``balance_at`` reads a window bounded by the latest snapshot,
however much history lies before it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import uuid
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from bench.export_day import busy_day, load_ledger
from engine.calendar import day_window, from_ns, to_ns
from engine.finance.snapshots import (
    Schedule,
    last_cutoff,
    next_cutoff,
    parse_cutoff,
    run_alongside,
    run_due,
    run_scheduler,
    snapshot_if_missing,
)
from engine.lookups import SQL_BALANCE_AT
from engine.service import Engine
from engine.store import Store, now_ns
from ledger.account import Account
from ledger.transfer import Transfer
from ledger.types import AccountFlag, AccountKind, TransferFlag
from tests.conftest import Ids

SH: Final = ZoneInfo("Asia/Shanghai")
ROOT: Final = Path(__file__).resolve().parents[2]
CLI: Final = "import sys; from engine.cli import main; sys.exit(main())"
SQL_RUNS: Final = "SELECT timestamp FROM snapshot_runs WHERE ledger = $1 ORDER BY timestamp"


def _sh(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return to_ns(datetime(y, mo, d, h, mi, s, tzinfo=SH))


# -- the calendar ------------------------------------------------------------------------------


def test_parse_cutoff() -> None:
    assert parse_cutoff("00:00") == time(0, 0)
    assert parse_cutoff("23:59") == time(23, 59)
    assert parse_cutoff(" 03:30 ") == time(3, 30)
    for bad in ("24:00", "3:30", "03:60", "0330", "ab:cd", "", "03:30:00"):
        with pytest.raises(ValueError, match="HH:MM"):
            parse_cutoff(bad)


def test_schedule_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONECARD_SNAPSHOT_AT", raising=False)
    monkeypatch.delenv("ONECARD_TZ", raising=False)
    s = Schedule.from_env()
    assert (s.cutoff, s.tz.key) == (time(0, 0), "Asia/Shanghai")
    monkeypatch.setenv("ONECARD_SNAPSHOT_AT", "02:15")
    monkeypatch.setenv("ONECARD_TZ", "Europe/Berlin")
    s = Schedule.from_env()
    assert (s.cutoff, s.tz.key) == (time(2, 15), "Europe/Berlin")
    monkeypatch.setenv("ONECARD_TZ", "Mars/Olympus")
    with pytest.raises(ValueError, match="time zone"):
        Schedule.from_env()


def test_day_window_is_the_local_day() -> None:
    start, end = day_window(date(2024, 3, 10), SH)
    assert from_ns(start, ZoneInfo("UTC")).isoformat() == "2024-03-09T16:00:00+00:00"
    assert end - start == 86_400 * 10**9
    # 23:59:59 and 00:00:01 local fall on different business days
    assert start <= _sh(2024, 3, 10, 23, 59, 59) < end <= _sh(2024, 3, 11, 0, 0, 1)


def test_cutoffs() -> None:
    midnight = time(0, 0)
    late = _sh(2024, 3, 10, 23, 59, 59)
    assert last_cutoff(late, midnight, SH) == _sh(2024, 3, 10)
    assert next_cutoff(late, midnight, SH) == _sh(2024, 3, 11)
    at = _sh(2024, 3, 11)
    assert last_cutoff(at, midnight, SH) == at  # the cut-off instant itself is due
    assert next_cutoff(at, midnight, SH) == _sh(2024, 3, 12)
    three = time(3, 0)
    assert last_cutoff(_sh(2024, 3, 11, 2, 0), three, SH) == _sh(2024, 3, 10, 3, 0)
    assert last_cutoff(_sh(2024, 3, 11, 4, 0), three, SH) == _sh(2024, 3, 11, 3, 0)
    assert next_cutoff(_sh(2024, 3, 11, 2, 0), three, SH) == _sh(2024, 3, 11, 3, 0)


# -- the scheduler -----------------------------------------------------------------------------


async def _ledger_with_money(engine: Engine, ids: Ids) -> tuple[int, int, int]:
    ledger = ids.ledger()
    bank, purse = ids.accounts(2)
    st = await engine.store.create_accounts(
        [
            Account(id=bank, ledger=ledger, kind=AccountKind.CLEARING, code=1),
            Account(
                id=purse, ledger=ledger, kind=AccountKind.PURSE, code=1,
                flags=(AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,),
            ),
        ]
    )
    assert [str(s) for s in st] == ["created", "created"]
    await _post(engine, ledger, [(bank, purse, 10_000, 4)])
    return ledger, bank, purse


async def _post(
    engine: Engine, ledger: int, moves: list[tuple[int, int, int, int]], **kw: Any
) -> list[uuid.UUID]:
    batch = [
        Transfer(
            id=uuid.uuid4(), ledger=ledger, debit_account_id=d, credit_account_id=c,
            amount=a, code=code, **kw,
        )
        for d, c, a, code in moves
    ]
    res = await engine.batcher.submit(batch)
    assert {str(r.status) for r in res} == {"created"}, res
    return [t.id for t in batch]


def _cutoff_just_before(ns: int, tz: ZoneInfo) -> time:
    return from_ns(ns, tz).time()


async def _runs(engine: Engine, ledger: int) -> list[int]:
    async with engine.store.pool.acquire() as conn:
        return [r["timestamp"] for r in await conn.fetch(SQL_RUNS, ledger)]


async def test_run_due_snapshots_each_day_once_even_across_restarts(
    engine: Engine, ids: Ids
) -> None:
    ledger, _, _ = await _ledger_with_money(engine, ids)
    before = now_ns() - 1_000_000_000
    sched = Schedule(cutoff=_cutoff_just_before(before, SH), tz=SH)
    taken = await run_due(engine.store, sched)
    mine = [t for t in taken if t.ledger == ledger]
    assert len(mine) == 1 and mine[0].accounts == 2
    assert await _runs(engine, ledger) == [mine[0].timestamp]
    # the same day again, and "after a restart" (a fresh Store on the same pool): nothing new
    assert all(t.ledger != ledger for t in await run_due(engine.store, sched))
    assert all(t.ledger != ledger for t in await run_due(Store(engine.store.pool), sched))
    assert await _runs(engine, ledger) == [mine[0].timestamp]
    # the next day's cut-off (simulated: a cut-off just after the first run) takes a new one
    first = mine[0].timestamp
    later = Schedule(cutoff=from_ns(first + 1000, SH).time(), tz=SH)
    taken = await run_due(engine.store, later, clock=lambda: max(now_ns(), first + 2000))
    assert [t.ledger for t in taken].count(ledger) == 1
    runs = await _runs(engine, ledger)
    assert len(runs) == 2 and runs[1] > first


async def test_two_schedulers_cannot_take_the_same_day(engine: Engine, ids: Ids) -> None:
    ledger, _, _ = await _ledger_with_money(engine, ids)
    since = now_ns()
    results = await asyncio.gather(
        *(snapshot_if_missing(engine.store.pool, ledger, since) for _ in range(4))
    )
    assert sum(r is not None for r in results) == 1
    assert len(await _runs(engine, ledger)) == 1


async def test_scheduler_task_takes_the_snapshot_and_stops_on_cancel(
    engine: Engine, ids: Ids
) -> None:
    ledger, _, _ = await _ledger_with_money(engine, ids)
    sched = Schedule(cutoff=_cutoff_just_before(now_ns() - 10**9, SH), tz=SH)
    task = asyncio.create_task(run_scheduler(engine.store, sched, max_sleep_s=0.05))
    try:
        async with asyncio.timeout(10):
            while not await _runs(engine, ledger):  # noqa: ASYNC110 (polling the database)
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # several more passes: still one run for the day
        assert len(await _runs(engine, ledger)) == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_alongside_cancels_the_scheduler_when_serving_ends(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def serving() -> str:
        await asyncio.sleep(0.1)
        return "stopped"

    sched = Schedule(cutoff=time(0, 0), tz=SH)
    assert await run_alongside(serving(), engine.store, sched) == "stopped"
    await asyncio.sleep(0)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "onecard-snapshots"]
    monkeypatch.setenv("ONECARD_SNAPSHOT_AT", "25:00")
    coro = serving()
    with pytest.raises(ValueError, match="HH:MM"):
        await run_alongside(coro, engine.store)
    assert coro.cr_frame is None  # closed, not left un-awaited


# -- balance_at cost is bounded by the latest snapshot ---------------------------------------


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for p in plan.get("Plans", []):
        out.extend(_nodes(p))
    return out


async def _explain(conn: asyncpg.Connection, ledger: int, account: int, at: int) -> list[Any]:
    raw = await conn.fetchval(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + SQL_BALANCE_AT, ledger, account, at
    )
    doc = json.loads(raw)
    return _nodes(doc[0]["Plan"])


def _touched(nodes: list[dict[str, Any]]) -> int:
    """Rows the plan read from transfers and holds: kept or filtered out, every loop counted."""
    scans = [n for n in nodes if n.get("Relation Name") in ("transfers", "holds")]
    assert len(scans) == 6, "four transfer sums and two hold sums"
    for n in scans:
        assert n["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), (
            f"{n['Relation Name']}: {n['Node Type']}, filter {n.get('Filter')}"
        )
    return sum(
        (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)
         + n.get("Rows Removed by Index Recheck", 0)) * n["Actual Loops"]
        for n in scans
    )


@pytest.fixture(scope="module")
async def other_campus(engine: Engine) -> int:
    """20,000 transfers in another ledger: the planner then plans as for a real campus."""
    filler = 900_000 + Ids().ledger()
    accounts, rows = busy_day(filler, 9_000_000_000, date(2024, 1, 2), 20_000)
    async with engine.store.pool.acquire() as conn:
        await load_ledger(
            conn, filler, accounts, rows, created_at=day_window(date(2024, 1, 2), SH)[0]
        )
    # and 4,000 holds, released: the holds table is not a toy either
    water = accounts[2].id
    purses = [a.id for a in accounts if a.kind is AccountKind.PURSE]
    holds = await _post(
        engine, filler, [(p, water, 1, 2) for p in purses] * 10, flags=(TransferFlag.PENDING,)
    )
    voids = [
        Transfer(id=uuid.uuid4(), ledger=filler, pending_id=h, flags=(TransferFlag.VOID_PENDING,))
        for h in holds
    ]
    assert {str(r.status) for r in await engine.batcher.submit(voids)} == {"created"}
    return filler


@pytest.mark.parametrize("history", [40, 2_000])
async def test_balance_at_reads_only_the_window_after_the_snapshot(
    engine: Engine, ids: Ids, history: int, other_campus: int
) -> None:
    ledger, _bank, purse = await _ledger_with_money(engine, ids)
    canteen, water = ids.accounts(2)
    await engine.store.create_accounts(
        [
            Account(id=canteen, ledger=ledger, kind=AccountKind.MERCHANT, code=1),
            Account(id=water, ledger=ledger, kind=AccountKind.UTILITY, code=2),
        ]
    )
    for i in range(0, history, 1000):  # the history before the snapshot
        await _post(engine, ledger, [(purse, canteen, 1, 1)] * min(1000, history - i))
    ts, _ = await engine.store.snapshot(ledger)
    # the window: 3 meals, and a hold that is posted (2 transfers, 1 hold released)
    await _post(engine, ledger, [(purse, canteen, 5, 1)] * 3)
    (hold,) = await _post(engine, ledger, [(purse, water, 50, 2)], flags=(TransferFlag.PENDING,))
    settle = Transfer(
        id=uuid.uuid4(), ledger=ledger, pending_id=hold, amount=30,
        flags=(TransferFlag.POST_PENDING,),
    )
    assert str((await engine.batcher.submit([settle]))[0].status) == "created"
    async with engine.store.pool.acquire() as conn:
        await conn.execute("ANALYZE transfers; ANALYZE holds; ANALYZE balance_snapshots")
        last = await conn.fetchval("SELECT last_timestamp FROM ledgers WHERE ledger = $1", ledger)
        nodes = await _explain(conn, ledger, purse, last)
        # without a snapshot before `at`, the same query walks the whole history instead
        early = await _explain(conn, ledger, purse, ts - 1)
    live = await engine.store.get_account(purse)
    assert live is not None
    b = await engine.store.balance_at(ledger, purse, last)
    assert (b.debits_posted, b.credits_posted, b.debits_pending) == (
        live.state.debits_posted, live.state.credits_posted, live.state.debits_pending
    ) == (history + 15 + 30, 10_000, 0)
    # The window holds 5 debits (3 meals, the hold, its post) and 1 released hold: read by
    # four transfer sums and two hold sums that is 11 rows with plain index scans; a bitmap
    # plan may recheck a few more. Either way it is bounded by the window, not by the history
    # (40 or 2,000 transfers precede the snapshot), while without the snapshot it is not.
    assert _touched(nodes) <= 4 * 6
    assert _touched(early) >= history
    snap = [n for n in nodes if n.get("Relation Name") == "balance_snapshots"]
    assert snap and all(n["Actual Rows"] <= 1 for n in snap)



async def test_onecard_serve_takes_the_days_snapshot(
    engine: Engine, ids: Ids, dsn: str, tmp_path: Path
) -> None:
    ledger, _, _ = await _ledger_with_money(engine, ids)
    cutoff = from_ns(now_ns(), SH).strftime("%H:%M")  # this minute: due at once
    env = {
        **os.environ, "ONECARD_SNAPSHOT_AT": cutoff, "ONECARD_TZ": "Asia/Shanghai",
        "ONECARD_ADMIN_TOKEN": "a" * 24, "ONECARD_READ_TOKEN": "r" * 24,
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLI, "serve", "--dsn", dsn, "--http", f"127.0.0.1:{port}",
        "--no-iso", "--data-dir", str(tmp_path),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(30):
            while not await _runs(engine, ledger):
                assert proc.returncode is None, "onecard serve exited early"
                await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            raw, _ = await proc.communicate()
    out = raw.decode()
    assert proc.returncode == 0, out
    assert len(await _runs(engine, ledger)) == 1
    assert "Traceback" not in out

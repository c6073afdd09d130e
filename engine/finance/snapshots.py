"""End-of-day balance snapshots.

``onecard serve`` runs :func:`run_scheduler` next to the API: once per campus-local day, at the
cut-off time (``ONECARD_SNAPSHOT_AT``, ``HH:MM``, default ``00:00`` in ``ONECARD_TZ``), it
records every ledger's balances with the same statements as ``Store.snapshot``. A day counts as
done when ``snapshot_runs`` already has a run at or after that day's cut-off, checked under
the ledger's clock lock, so restarts and several engine processes never snapshot a day twice
(a manual ``onecard snapshot`` after the cut-off also counts). After downtime only the latest
cut-off is caught up: the past cannot be snapshotted after the fact, and ``balance_at`` needs
no more than the latest snapshot before an instant.

Snapshots bound the cost of ``balance_at``: it reads one snapshot row and the transfers and
hold releases after it, through index ranges, however long the history before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from datetime import datetime, time, timedelta
from typing import Any, Final, TypeVar
from zoneinfo import ZoneInfo

import asyncpg
import msgspec

from engine import limits
from engine import store as store_sql
from engine.calendar import campus_tz, local_date, to_ns
from engine.faults import OUTLIVED
from engine.store import Store, now_ns

log = logging.getLogger(__name__)

T = TypeVar("T")

SNAPSHOT_AT_ENV: Final = "ONECARD_SNAPSHOT_AT"
DEFAULT_SNAPSHOT_AT: Final = time(0, 0)

def parse_cutoff(value: str) -> time:
    """``HH:MM`` (24-hour) as a time of day; ValueError otherwise."""
    hh, sep, mm = value.strip().partition(":")
    if not (sep and len(hh) == 2 and len(mm) == 2 and hh.isdigit() and mm.isdigit()):
        raise ValueError(f"{SNAPSHOT_AT_ENV} must be HH:MM, got {value!r}")
    h, m = int(hh), int(mm)
    if h > 23 or m > 59:
        raise ValueError(f"{SNAPSHOT_AT_ENV} must be HH:MM, got {value!r}")
    return time(h, m)


def last_cutoff(now: int, cutoff: time, tz: ZoneInfo) -> int:
    """The most recent cut-off instant at or before ``now`` (engine ns)."""
    today = local_date(now, tz)
    for day in (today, today - timedelta(days=1), today - timedelta(days=2)):
        c = to_ns(datetime.combine(day, cutoff, tzinfo=tz))
        if c <= now:
            return c
    raise AssertionError("a cut-off happens every local day")  # pragma: no cover


def next_cutoff(now: int, cutoff: time, tz: ZoneInfo) -> int:
    """The first cut-off instant strictly after ``now`` (engine ns)."""
    today = local_date(now, tz)
    for day in (today, today + timedelta(days=1), today + timedelta(days=2)):
        c = to_ns(datetime.combine(day, cutoff, tzinfo=tz))
        if c > now:
            return c
    raise AssertionError("a cut-off happens every local day")  # pragma: no cover


class Schedule(msgspec.Struct, frozen=True):
    """When the end-of-day snapshot runs: ``cutoff`` local time in ``tz``."""

    cutoff: time
    tz: ZoneInfo

    @classmethod
    def from_env(cls) -> Schedule:
        """``$ONECARD_SNAPSHOT_AT`` (default 00:00) in ``$ONECARD_TZ`` (default Asia/Shanghai)."""
        raw = os.environ.get(SNAPSHOT_AT_ENV, "")
        return cls(cutoff=parse_cutoff(raw) if raw else DEFAULT_SNAPSHOT_AT, tz=campus_tz())


# -- taking the day's snapshot ------------------------------------------------------------------

# Ledgers with no snapshot run at or after $1: the cheap unlocked pre-check of every pass.
SQL_LEDGERS_DUE = """
SELECT l.ledger FROM ledgers l
WHERE NOT EXISTS (SELECT 1 FROM snapshot_runs r WHERE r.ledger = l.ledger AND r.timestamp >= $1)
ORDER BY l.ledger
"""
# The ledger's clock row: every writer of the ledger (batches, snapshots) locks it first.
SQL_LOCK_CLOCK = "SELECT 1 FROM ledgers WHERE ledger = $1 FOR UPDATE"
SQL_RUN_SINCE = "SELECT EXISTS (SELECT 1 FROM snapshot_runs WHERE ledger = $1 AND timestamp >= $2)"


class SnapshotTaken(msgspec.Struct, frozen=True):
    """One snapshot run recorded by the scheduler."""

    ledger: int
    timestamp: int
    accounts: int


async def snapshot_if_missing(pool: asyncpg.Pool, ledger: int, since: int) -> SnapshotTaken | None:
    """Snapshot ``ledger`` unless a run at or after ``since`` exists; None when skipped.

    The check and the snapshot happen under the ledger's clock lock, so two schedulers (two
    engine processes, or a restart racing the old one) cannot both take the same day.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(SQL_LOCK_CLOCK, ledger)
        if await conn.fetchval(SQL_RUN_SINCE, ledger, since):
            return None
        clock = await conn.fetchrow(store_sql.SQL_RESERVE, ledger, now_ns(), 1)
        assert clock is not None, "the reserve upsert always returns the clock row"
        ts: int = clock["first"]
        count: int = await conn.fetchval(store_sql.SQL_SNAPSHOT, ledger, ts)
    return SnapshotTaken(ledger=ledger, timestamp=ts, accounts=count)


async def run_due(
    store: Store, schedule: Schedule, *, clock: Callable[[], int] = now_ns
) -> list[SnapshotTaken]:
    """Take the current day's snapshot of every ledger that does not have it yet."""
    since = last_cutoff(clock(), schedule.cutoff, schedule.tz)
    async with store.pool.acquire() as conn:
        due = [r["ledger"] for r in await conn.fetch(SQL_LEDGERS_DUE, since)]
    taken = []
    for ledger in due:
        t = await snapshot_if_missing(store.pool, ledger, since)
        if t is not None:
            log.info("snapshot of ledger %d: %d accounts at %d", t.ledger, t.accounts, t.timestamp)
            taken.append(t)
    return taken


async def run_scheduler(
    store: Store,
    schedule: Schedule | None = None,
    *,
    clock: Callable[[], int] = now_ns,
    max_sleep_s: float = limits.SNAPSHOT_SCHEDULER_MAX_SLEEP_S,
) -> None:
    """Forever: take the day's snapshots when due, then sleep until the next cut-off.

    The first pass runs at once, which catches up a cut-off missed while the engine was down.
    Cancel the task to stop it.
    """
    sched = schedule or Schedule.from_env()
    while True:
        try:
            await run_due(store, sched, clock=clock)
        except OUTLIVED as e:  # the database restarting or briefly away
            log.warning(
                "end-of-day snapshot failed, retrying in %.0fs: %s",
                limits.SNAPSHOT_SCHEDULER_RETRY_S, e,
            )
            await asyncio.sleep(min(limits.SNAPSHOT_SCHEDULER_RETRY_S, max_sleep_s))
            continue
        now = clock()
        wait_s = (next_cutoff(now, sched.cutoff, sched.tz) - now) / 1e9
        await asyncio.sleep(min(max(wait_s, 0.0), max_sleep_s))


async def run_alongside(
    main: Coroutine[Any, Any, T], store: Store, schedule: Schedule | None = None
) -> T:
    """Await ``main`` (the HTTP server) with the snapshot scheduler running beside it; the
    scheduler is cancelled when ``main`` ends, however it ends.

    A bad ``ONECARD_SNAPSHOT_AT``/``ONECARD_TZ`` raises ValueError before ``main`` starts.
    """
    try:
        sched = schedule or Schedule.from_env()
    except ValueError:
        main.close()
        raise
    task = asyncio.create_task(run_scheduler(store, sched), name="onecard-snapshots")
    try:
        return await main
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await task
            except Exception:  # it must not mask how `main` ended
                log.exception("snapshot scheduler failed")

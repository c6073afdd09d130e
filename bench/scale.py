"""``scale``: ``core`` on a small database, then on a large one (``--accounts`` accounts and
``--transfers`` transfers loaded by COPY, default 1,000,000 and 10,000,000), same workload.

The large ledger is loaded with ``bench.export_day.load_ledger``: the rows the engine would have
written (audit chain, clock, live balances included), so ``onecard verify`` holds on it and the
engine continues the ledger as if it had posted them itself.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Final

import asyncpg

from bench.core import core_phase
from bench.databases import scratch_database
from bench.fixture import PURSE_FUNDS_FEN, Campus, campus_ids, client_id, load_campus
from bench.loop import Bar
from bench.machine import CpuMeter, machine, peak_rss_mb
from bench.measure import Stats
from bench.options import Options
from bench.report import Result, now_stamp, target
from engine.service import Engine
from engine.store import now_ns
from ledger import audit
from ledger.types import AccountKind, TransferCode

LEDGER: Final = 1
TARGET_RATIO: Final = 0.8  # large within 20% of small
LOAD_WINDOW_NS: Final = 86_400 * 10**9  # the preloaded history spans the day before the run
PROGRESS_EVERY: Final = 100_000
MEAL_FEN: Final = (300, 2_500)


def _rows(
    c: Campus, transfers: int, seed: int, bar: Bar, total: int
) -> Iterator[audit.Row]:
    """Top-ups for every purse first (so none goes negative), then meals on the canteen with
    a top-up every 20th transfer, at increasing timestamps over the past day; ids as the
    campus's clients make them (UUIDv7 of the posting time, or random)."""
    ledger, purses = c.ledger, len(c.purses)
    rng = random.Random(seed)
    start = now_ns() - 2 * LOAD_WINDOW_NS
    step = max(1, LOAD_WINDOW_NS // max(transfers, 1))
    task = bar.task(f"COPY {transfers:,} transfers", total)
    for i in range(transfers):
        ts = start + (i + 1) * step
        tid = client_id(rng, ts // 1_000_000, random_ids=c.random_ids)
        if i < purses:
            p = c.purses[i]
            yield (tid, ledger, c.clearing, p, PURSE_FUNDS_FEN, None, int(TransferCode.TOP_UP),
                   0, 0, f"load-{p}", ts)
        elif i % 20 == 0:
            p = c.purses[rng.randrange(purses)]
            yield (tid, ledger, c.clearing, p, 50_000, None, int(TransferCode.TOP_UP), 0, 0,
                   f"bank-{i}", ts)
        else:
            p = c.purses[rng.randrange(purses)]
            yield (tid, ledger, p, c.canteen, rng.randint(*MEAL_FEN), None,
                   int(TransferCode.MEAL), 0, 0, None, ts)
        if i % PROGRESS_EVERY == 0:
            bar.update(task, completed=i, rate=f"{i:,} rows")
    bar.update(task, completed=total, rate="committing")


async def load_large(dsn: str, o: Options, bar: Bar) -> tuple[int, float, int]:
    """COPY the large ledger; returns (purses, seconds, database bytes)."""
    from bench.export_day import LoadAccount, load_ledger

    purses = max(1, o.accounts - 3)
    c = campus_ids(LEDGER, purses, base=0, random_ids=o.random_ids)
    accounts = [LoadAccount(id=p, kind=AccountKind.PURSE, flags=1) for p in c.purses]
    accounts += [
        LoadAccount(id=c.canteen, kind=AccountKind.MERCHANT, code=2, name="canteen"),
        LoadAccount(id=c.water, kind=AccountKind.UTILITY, code=3, name="hot water"),
        LoadAccount(id=c.clearing, kind=AccountKind.CLEARING, code=4, name="bank"),
    ]
    t0 = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        await load_ledger(
            conn, LEDGER, accounts,
            _rows(c, o.transfers, o.seed, bar, o.transfers),
            created_at=now_ns() - 3 * LOAD_WINDOW_NS,
        )
        await conn.execute("VACUUM ANALYZE accounts")  # as autovacuum would after a load
        await conn.execute("ANALYZE transfers")
        size: int = await conn.fetchval("SELECT pg_database_size(current_database())")
    finally:
        await conn.close()
    return purses, time.perf_counter() - t0, size


async def run(o: Options, bar: Bar) -> Result:
    """Small core, COPY load, large core; the ratio of the two."""
    m = await machine(o.dsn)
    cpu = CpuMeter()

    async def core(engine: Engine, c: Campus, name: str, stream0: int) -> Stats:
        return await core_phase(
            engine, c, name=name, concurrency=o.concurrency, request_size=o.request_size,
            duration=o.duration, warmup=o.warmup, seed=o.seed, stream0=stream0, bar=bar,
        )

    async with scratch_database(o.dsn, "scale_small", keep=o.keep) as dsn:
        engine = Engine(dsn)
        await engine.start(run_migrations=False)
        try:
            small_c = campus_ids(LEDGER, o.purses, base=0, random_ids=o.random_ids)
            await load_campus(engine.store, small_c, seed=o.seed)
            cpu.start()
            small = await core(engine, small_c, f"core, {o.purses:,} purses", 0)
        finally:
            await engine.stop()
    async with scratch_database(o.dsn, "scale_large", keep=o.keep) as dsn:
        purses, load_s, size = await load_large(dsn, o, bar)
        bar.note(f"loaded {o.accounts:,} accounts and {o.transfers:,} transfers in "
                 f"{load_s:.0f}s ({size / 2**30:.1f} GiB)")
        engine = Engine(dsn)
        await engine.start(run_migrations=False)
        try:
            large = await core(
                engine, campus_ids(LEDGER, purses, base=0, random_ids=o.random_ids),
                f"core, {o.accounts:,} accounts + {o.transfers:,} transfers", 1_000_000,
            )
        finally:
            await engine.stop()
    cpu.stop(m)
    ratio = large.transfers_per_s / small.transfers_per_s if small.transfers_per_s else 0.0
    return Result(
        workload="scale",
        started_at=now_stamp(),
        seed=o.seed,
        config={"accounts": o.accounts, "transfers": o.transfers, "small_purses": o.purses,
                "concurrency": o.concurrency, "request_size": o.request_size,
                "transfer_ids": o.transfer_ids,
                "duration_s": o.duration},
        machine=m,
        transfers_per_s=large.transfers_per_s,
        p50_ms=large.p50_ms,
        p99_ms=large.p99_ms,
        peak_rss_mb={"bench+engine": peak_rss_mb()},
        phases=[small, large],
        baselines={"load_s": round(load_s, 1), "database_bytes": size},
        ratios={"large_vs_small": round(ratio, 3)},
        targets=[target("large core / small core", f">= {TARGET_RATIO}", ratio,
                        ratio >= TARGET_RATIO)],
    )

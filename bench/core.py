"""``core``: the in-process engine, many concurrent submitters through ``Engine.batcher.submit``
on one ledger with a hot canteen merchant; then the naive poster and ``pgbench -N``."""

from __future__ import annotations

import time
from typing import Final

from bench.baselines import naive_poster, pgbench, unbatched_engine
from bench.databases import database_of, scratch_database
from bench.fixture import Campus, campus_ids, load_campus
from bench.loop import Bar, Request, closed_loop
from bench.machine import CpuMeter, CpuProbe, machine, peak_rss_mb
from bench.measure import Stats
from bench.mix import Mix
from bench.options import Options
from bench.report import Result, now_stamp, target
from engine import metrics
from engine.batcher import Overloaded
from engine.service import Engine

CORE_LEDGER: Final = 1
NAIVE_LEDGER: Final = 2
NAIVE_ACCOUNT_BASE: Final = 10_000_000  # the naive poster's campus lives apart from the core's
UNBATCHED_LEDGER: Final = 3
UNBATCHED_ACCOUNT_BASE: Final = 20_000_000
TARGET_TPS: Final = 40_000
TARGET_VS_PGBENCH: Final = 6.0
TARGET_VS_NAIVE: Final = 15.0


async def batch_probe() -> tuple[float, float]:
    """(sum, count) of the in-process batch size histogram."""
    s = metrics.REGISTRY.get_sample_value("onecard_batch_transfers_sum") or 0.0
    c = metrics.REGISTRY.get_sample_value("onecard_batch_transfers_count") or 0.0
    return s, c


async def core_phase(
    engine: Engine,
    campus: Campus,
    *,
    name: str,
    concurrency: int,
    request_size: int,
    duration: float,
    warmup: float,
    seed: int,
    stream0: int,
    bar: Bar,
) -> Stats:
    """``concurrency`` submitters, each posting ``request_size`` transfers per request."""
    batcher = engine.batcher

    def worker(stream: int) -> Request:
        mix = Mix(campus, seed=seed, stream=stream)
        submit = batcher.submit

        async def one() -> tuple[int, list[str]]:
            req = mix.request(request_size)
            try:
                res = await submit(req)
            except Overloaded:
                # a refused request is retried (same transfers: idempotent) after a pause
                mix.replay(req)
                raise
            return len(req), [r.status.value for r in res]

        return one

    s = await closed_loop(
        name,
        [worker(stream0 + i) for i in range(concurrency)],
        duration=duration,
        warmup=warmup,
        bar=bar,
        batch_probe=batch_probe,
        cpu=CpuProbe(database=database_of(engine.dsn), own="engine+bench (python)"),
    )
    s.request_size = request_size
    return s


async def run(o: Options, bar: Bar) -> Result:
    """The core workload with its sweep and baselines."""
    m = await machine(o.dsn)
    cpu = CpuMeter()
    notes: list[str] = []
    sweep: list[Stats] = []
    baselines: dict[str, object] = {}
    ratios: dict[str, float] = {}
    async with scratch_database(o.dsn, "core", keep=o.keep) as dsn:
        engine = Engine(dsn)
        await engine.start(run_migrations=False)
        try:
            core_c = campus_ids(CORE_LEDGER, o.purses, base=0, random_ids=o.random_ids)
            naive_c = campus_ids(
                NAIVE_LEDGER, o.purses, base=NAIVE_ACCOUNT_BASE, random_ids=o.random_ids
            )
            unbatched_c = campus_ids(
                UNBATCHED_LEDGER, o.purses, base=UNBATCHED_ACCOUNT_BASE, random_ids=o.random_ids
            )
            t = time.perf_counter()
            await load_campus(engine.store, core_c, seed=o.seed)
            if o.baselines:
                await load_campus(engine.store, naive_c, seed=o.seed + 1)
                await load_campus(engine.store, unbatched_c, seed=o.seed + 2)
            bar.note(f"loaded {o.purses:,} purses per ledger in {time.perf_counter() - t:.1f}s")
            cpu.start()
            main = await core_phase(
                engine, core_c, name=f"core c={o.concurrency} r={o.request_size}",
                concurrency=o.concurrency, request_size=o.request_size,
                duration=o.duration, warmup=o.warmup, seed=o.seed, stream0=0, bar=bar,
            )
            points = [(c, 1) for c in o.sweep]  # one-transfer requests, like a terminal
            points += [(o.sweep_size_concurrency, r) for r in o.sweep_sizes]
            for i, (c, r) in enumerate(points):
                sweep.append(
                    await core_phase(
                        engine, core_c, name=f"sweep c={c} r={r}", concurrency=c,
                        request_size=r, duration=o.sweep_duration,
                        warmup=min(o.warmup, 0.5), seed=o.seed, stream0=(i + 1) * 100_000,
                        bar=bar,
                    )
                )
        finally:
            await engine.stop()
        phases = [main]
        if o.baselines:
            naive = await naive_poster(
                dsn, naive_c, clients=o.baseline_clients, duration=o.duration,
                warmup=o.warmup, seed=o.seed, bar=bar,
            )
            unbatched = await unbatched_engine(
                dsn, unbatched_c, clients=o.baseline_clients, duration=o.duration,
                warmup=o.warmup, seed=o.seed, bar=bar,
            )
            for key, b in (("naive", naive), ("unbatched", unbatched)):
                phases.append(b)
                baselines[key] = {
                    "transfers_per_s": b.transfers_per_s,
                    "p50_ms": b.p50_ms,
                    "p99_ms": b.p99_ms,
                    "clients": b.concurrency,
                }
                if b.transfers_per_s:
                    ratios[f"core_vs_{key}"] = round(main.transfers_per_s / b.transfers_per_s, 2)
    if o.baselines:
        task = bar.task(f"pgbench -N c={o.baseline_clients}", 1)
        pg = await pgbench(
            o.dsn, clients=o.baseline_clients, duration=o.duration, scale=o.pgbench_scale,
            keep=o.keep,
        )
        bar.update(task, completed=1, rate=f"{pg.tps:,.0f} tps")
        baselines["pgbench"] = pg
        if pg.tps:
            ratios["core_vs_pgbench"] = round(main.transfers_per_s / pg.tps, 2)
    cpu.stop(m)
    vs_pg, vs_naive = ratios.get("core_vs_pgbench"), ratios.get("core_vs_naive")
    return Result(
        workload="core",
        started_at=now_stamp(),
        seed=o.seed,
        config=_config(o),
        machine=m,
        transfers_per_s=main.transfers_per_s,
        p50_ms=main.p50_ms,
        p99_ms=main.p99_ms,
        peak_rss_mb={"bench+engine": peak_rss_mb()},
        phases=phases,
        sweep=sweep,
        baselines=baselines,
        ratios=ratios,
        targets=[
            target("core transfers/s", f">= {TARGET_TPS:,}", main.transfers_per_s,
                   main.transfers_per_s >= TARGET_TPS),
            target("core / pgbench -N", f">= {TARGET_VS_PGBENCH}x", vs_pg,
                   None if vs_pg is None else vs_pg >= TARGET_VS_PGBENCH),
            target("core / naive", f">= {TARGET_VS_NAIVE}x", vs_naive,
                   None if vs_naive is None else vs_naive >= TARGET_VS_NAIVE),
        ],
        notes=notes,
    )


def _config(o: Options) -> dict[str, object]:
    return {
        "duration_s": o.duration,
        "warmup_s": o.warmup,
        "concurrency": o.concurrency,
        "request_size": o.request_size,
        "transfer_ids": o.transfer_ids,
        "purses": o.purses,
        "sweep": o.sweep,
        "sweep_sizes": o.sweep_sizes,
        "sweep_size_concurrency": o.sweep_size_concurrency,
        "sweep_duration_s": o.sweep_duration,
        "baseline_clients": o.baseline_clients,
        "pgbench_scale": o.pgbench_scale,
    }

"""``core``: the in-process engine, many concurrent submitters through ``Engine.batcher.submit``
on one ledger with a hot canteen merchant; then the naive poster and ``pgbench -N``."""

from __future__ import annotations

import time
from typing import Final, NamedTuple

from bench.baselines import naive_poster, pgbench, unbatched_engine
from bench.databases import database_of, scratch_database
from bench.fixture import Campus, campus_ids, load_campus
from bench.loop import Bar, Request, closed_loop
from bench.machine import CpuMeter, CpuProbe, Machine, machine, peak_rss_mb
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


class _Campuses(NamedTuple):
    """The core's campus and the baselines', each in a ledger and an id range of its own."""

    core: Campus
    naive: Campus
    unbatched: Campus

    @classmethod
    def of(cls, o: Options) -> _Campuses:
        """The three campuses of a run."""
        return cls(
            campus_ids(CORE_LEDGER, o.purses, base=0, random_ids=o.random_ids),
            campus_ids(NAIVE_LEDGER, o.purses, base=NAIVE_ACCOUNT_BASE, random_ids=o.random_ids),
            campus_ids(
                UNBATCHED_LEDGER, o.purses, base=UNBATCHED_ACCOUNT_BASE, random_ids=o.random_ids
            ),
        )


class _Yardsticks:
    """The baselines measured beside the core, and the core's ratio to each."""

    def __init__(self, core: Stats) -> None:
        self.core = core
        self.baselines: dict[str, object] = {}
        self.ratios: dict[str, float] = {}

    def add(self, key: str, entry: object, tps: float) -> None:
        """Record baseline ``key`` (``entry`` as the result shows it; ``tps`` its rate)."""
        self.baselines[key] = entry
        if tps:
            self.ratios[f"core_vs_{key}"] = round(self.core.transfers_per_s / tps, 2)


async def run(o: Options, bar: Bar) -> Result:
    """The core workload with its sweep and baselines."""
    m = await machine(o.dsn)
    cpu = CpuMeter()
    campuses = _Campuses.of(o)
    async with scratch_database(o.dsn, "core", keep=o.keep) as dsn:
        main, sweep = await _engine_phases(dsn, campuses, o, bar, cpu)
        yardsticks = _Yardsticks(main)
        phases = [main]
        if o.baselines:
            phases += await _posters(dsn, campuses, o, bar, yardsticks)
    if o.baselines:
        await _pgbench(o, bar, yardsticks)
    cpu.stop(m)
    return _result(o, m, phases, sweep, yardsticks)


async def _engine_phases(
    dsn: str, campuses: _Campuses, o: Options, bar: Bar, cpu: CpuMeter
) -> tuple[Stats, list[Stats]]:
    """Load the campuses, then the main phase and the sweep on the in-process engine (the
    machine's CPU counted from the main phase on)."""
    engine = Engine(dsn)
    await engine.start(run_migrations=False)
    try:
        t = time.perf_counter()
        await load_campus(engine.store, campuses.core, seed=o.seed)
        if o.baselines:
            await load_campus(engine.store, campuses.naive, seed=o.seed + 1)
            await load_campus(engine.store, campuses.unbatched, seed=o.seed + 2)
        bar.note(f"loaded {o.purses:,} purses per ledger in {time.perf_counter() - t:.1f}s")
        cpu.start()
        main = await core_phase(
            engine, campuses.core, name=f"core c={o.concurrency} r={o.request_size}",
            concurrency=o.concurrency, request_size=o.request_size,
            duration=o.duration, warmup=o.warmup, seed=o.seed, stream0=0, bar=bar,
        )
        sweep = await _sweep(engine, campuses.core, o, bar)
    finally:
        await engine.stop()
    return main, sweep


async def _sweep(engine: Engine, campus: Campus, o: Options, bar: Bar) -> list[Stats]:
    """Short phases over concurrencies (one-transfer requests, like a terminal) and over
    request sizes."""
    points = [(c, 1) for c in o.sweep]
    points += [(o.sweep_size_concurrency, r) for r in o.sweep_sizes]
    sweep: list[Stats] = []
    for i, (c, r) in enumerate(points):
        sweep.append(
            await core_phase(
                engine, campus, name=f"sweep c={c} r={r}", concurrency=c,
                request_size=r, duration=o.sweep_duration,
                warmup=min(o.warmup, 0.5), seed=o.seed, stream0=(i + 1) * 100_000,
                bar=bar,
            )
        )
    return sweep


async def _posters(
    dsn: str, campuses: _Campuses, o: Options, bar: Bar, yardsticks: _Yardsticks
) -> list[Stats]:
    """The naive poster and the unbatched engine, on their own campuses."""
    naive = await naive_poster(
        dsn, campuses.naive, clients=o.baseline_clients, duration=o.duration,
        warmup=o.warmup, seed=o.seed, bar=bar,
    )
    unbatched = await unbatched_engine(
        dsn, campuses.unbatched, clients=o.baseline_clients, duration=o.duration,
        warmup=o.warmup, seed=o.seed, bar=bar,
    )
    for key, b in (("naive", naive), ("unbatched", unbatched)):
        entry = {
            "transfers_per_s": b.transfers_per_s,
            "p50_ms": b.p50_ms,
            "p99_ms": b.p99_ms,
            "clients": b.concurrency,
        }
        yardsticks.add(key, entry, b.transfers_per_s)
    return [naive, unbatched]


async def _pgbench(o: Options, bar: Bar, yardsticks: _Yardsticks) -> None:
    """``pgbench -N`` in a scratch database of its own."""
    task = bar.task(f"pgbench -N c={o.baseline_clients}", 1)
    pg = await pgbench(
        o.dsn, clients=o.baseline_clients, duration=o.duration, scale=o.pgbench_scale,
        keep=o.keep,
    )
    bar.update(task, completed=1, rate=f"{pg.tps:,.0f} tps")
    yardsticks.add("pgbench", pg, pg.tps)


def _result(
    o: Options, m: Machine, phases: list[Stats], sweep: list[Stats], yardsticks: _Yardsticks
) -> Result:
    main = phases[0]
    vs_pg = yardsticks.ratios.get("core_vs_pgbench")
    vs_naive = yardsticks.ratios.get("core_vs_naive")
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
        baselines=yardsticks.baselines,
        ratios=yardsticks.ratios,
        targets=[
            target("core transfers/s", f">= {TARGET_TPS:,}", main.transfers_per_s,
                   main.transfers_per_s >= TARGET_TPS),
            target("core / pgbench -N", f">= {TARGET_VS_PGBENCH}x", vs_pg,
                   None if vs_pg is None else vs_pg >= TARGET_VS_PGBENCH),
            target("core / naive", f">= {TARGET_VS_NAIVE}x", vs_naive,
                   None if vs_naive is None else vs_naive >= TARGET_VS_NAIVE),
        ],
        notes=[],
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

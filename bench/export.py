"""``export``: ``onecard export`` of one busy campus day, timed by ``bench.export_day.run``
(which loads the day with COPY into a fresh ledger of a scratch database first)."""

from __future__ import annotations

from typing import Final

from bench.databases import scratch_database
from bench.loop import Bar
from bench.machine import CpuMeter, machine, peak_rss_mb
from bench.measure import Latencies, Stats, stats
from bench.options import Options
from bench.report import Result, now_stamp, target

TARGET_EXPORT_S: Final = 30.0
TARGET_TRANSFERS: Final = 1_000_000


async def run(o: Options, bar: Bar) -> Result:
    """Load ``--transfers`` (default 1,000,000) transfers of one day, export the day."""
    from bench import export_day

    m = await machine(o.dsn)
    cpu = CpuMeter()
    async with scratch_database(o.dsn, "export", keep=o.keep) as dsn:
        cpu.start()
        task = bar.task(f"load + export {o.transfers:,} transfers", 1)
        r = await export_day.run(dsn, transfers=o.transfers)
        bar.update(task, completed=1, rate=f"export {r['export_s']:.1f}s")
    cpu.stop(m)
    n = int(r["transfers"])
    export_s = r["export_s"]
    lat = Latencies()
    lat.add(export_s)
    phase: Stats = stats(
        f"export {n:,} transfers", concurrency=1, elapsed=export_s, transfers=n, requests=1,
        lat=lat, note=f"loaded by COPY in {r['load_s']:.1f}s (not measured)",
    )
    scaled = export_s * TARGET_TRANSFERS / n if n else None
    return Result(
        workload="export",
        started_at=now_stamp(),
        seed=o.seed,
        config={"transfers": n},
        machine=m,
        transfers_per_s=phase.transfers_per_s,
        p50_ms=phase.p50_ms,
        p99_ms=phase.p99_ms,
        peak_rss_mb={"bench+export": peak_rss_mb()},
        phases=[phase],
        baselines={"load_s": round(r["load_s"], 2)},
        targets=[
            target("export of 1,000,000 transfers (s, scaled linearly from this run)",
                   f"<= {TARGET_EXPORT_S:g} s", scaled,
                   None if scaled is None else scaled <= TARGET_EXPORT_S),
        ],
    )

"""``python -m bench <workload>`` and ``onecard bench <workload>``.

Each run builds fresh scratch databases on the server named by the maintenance DSN, loads the
campus fixture, runs a fixed-seed workload, prints transfers/s, p50/p99 latency, peak RSS and
the ratios to its yardsticks, and writes ``bench/results/<workload>-<timestamp>.json`` with a
PNG plot next to it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import uvloop

from bench.databases import DEFAULT_DSN
from bench.loop import Bar
from bench.options import Options, add_arguments, options
from bench.report import RESULTS_DIR, now_stamp, save, show
from engine.service import tune_gc

WORKLOAD_MODULES = {
    "core": "bench.core",
    "http": "bench.web",
    "terminals": "bench.terminals",
    "query": "bench.query",
    "scale": "bench.scale",
    "export": "bench.export",
    "self": "bench.selfweb",
}
HELP = "measure throughput and latency (core, http, terminals, query, scale, export, self)"


async def run_bench(o: Options) -> int:
    """Run one workload, save and print its result; exit 0 unless the harness itself failed
    (a missed target is a finding, not an error)."""
    module = importlib.import_module(WORKLOAD_MODULES[o.workload])
    stamp = now_stamp()
    bar = Bar(enabled=o.progress)
    with bar.shown():
        result = await module.run(o, bar)
    out = Path(o.results_dir) if o.results_dir else RESULTS_DIR
    save(result, out, stamp, plot=o.plot)
    show(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench``."""
    p = argparse.ArgumentParser(prog="python -m bench", description=HELP)
    add_arguments(p, with_dsn=True)
    args = p.parse_args(argv)
    dsn = args.dsn or os.environ.get("ONECARD_DSN") or DEFAULT_DSN
    tune_gc()  # as `onecard serve` runs: the in-process engine is measured as deployed
    if dsn != "embedded":
        return int(uvloop.run(run_bench(options(args, dsn))))
    from engine.db.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(args.data_dir)
    try:
        return int(uvloop.run(run_bench(options(args, pg.start()))))
    finally:
        if pg.started_here:
            pg.stop()


if __name__ == "__main__":
    sys.exit(main())

"""Tools on top of the engine: ``simulate`` (a lunch rush of ISO 8583 terminals, checked to
the fen) and ``bench`` (throughput and latency workloads). Only the CLI imports the terminal
simulator and the bench."""

from __future__ import annotations

import argparse
from typing import Final

from rich.console import Console

from bench.cli import HELP as BENCH_HELP
from bench.cli import run_bench
from bench.options import add_arguments, options
from engine.cli.base import Command, hostport_arg
from terminals.simulator import DEFAULT_WORKERS, Options, show, simulate


def _simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--terminals", type=int, default=500, help="terminals (default 500)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (default 60)")
    p.add_argument("--rate", type=float, default=2000.0,
                   help="target requests per second, all terminals together (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the traffic (default 0)")
    p.add_argument("--holders", type=int, default=None,
                   help="card holders (default 4 per terminal, at least 50)")
    p.add_argument("--ledger", type=int, default=None,
                   help="ledger to build the campus in (default: a fresh random one)")
    p.add_argument("--iso", type=hostport_arg, default=None,
                   help="drive the gateway already running at HOST:PORT on the same database "
                        "(default: an in-process gateway)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help="processes driving the terminals, apart from the gateway's "
                        f"(default {DEFAULT_WORKERS}; 0: the same process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


async def _simulate(args: argparse.Namespace, dsn: str) -> int:
    """``onecard simulate``: exit 0 when the ledger is consistent with the answers, else 1."""
    o = Options(
        terminals=args.terminals, duration=args.duration, rate=args.rate, seed=args.seed,
        holders=args.holders, ledger=args.ledger, iso=args.iso, progress=not args.no_progress,
        workers=args.workers,
    )
    console = Console()
    report = await simulate(dsn, o, console=console)
    show(report, console)
    return 0 if report.consistent else 1


def _bench_args(p: argparse.ArgumentParser) -> None:
    add_arguments(p, with_dsn=False)


async def _bench(args: argparse.Namespace, dsn: str) -> int:
    return await run_bench(options(args, dsn))


SIMULATE: Final = Command(
    "simulate", "drive a lunch rush of ISO 8583 terminals and check every balance",
    _simulate_args, _simulate,
)
BENCH: Final = Command("bench", BENCH_HELP, _bench_args, _bench)

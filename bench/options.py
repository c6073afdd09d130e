"""The bench command line: shared by ``python -m bench`` and ``onecard bench``."""

from __future__ import annotations

import argparse
import shutil
from typing import Final

import msgspec

from engine import limits

WORKLOADS: Final = ("core", "http", "terminals", "query", "scale", "export", "self")
CLIENTS: Final = ("python", "wrk")  # what drives the HTTP one-transfer phase of `terminals`

DEFAULT_DURATION_S: Final = 10.0
DEFAULT_WARMUP_S: Final = 1.0
DEFAULT_CONCURRENCY: Final = {"core": 1024, "http": 64, "terminals": 500, "query": 32,
                               "scale": 1024, "export": 1, "self": 64}
# core/scale: 1,024 submitters x 16 transfers keep two full batches in flight, so one commits
# while the next gathers; the sweep covers one-transfer requests
DEFAULT_REQUEST_SIZE: Final = {"core": 16, "scale": 16}
DEFAULT_SWEEP: Final = {"core": "64,256,1024,4096", "http": "8,32,128,512",
                        "query": "4,16,64", "scale": "", "terminals": "", "export": "",
                        "self": ""}
DEFAULT_SWEEP_SIZES: Final = "4,16,32"
DEFAULT_SWEEP_SIZE_CONCURRENCY: Final = 256
DEFAULT_SWEEP_DURATION_S: Final = 3.0
DEFAULT_BASELINE_CLIENTS: Final = 16
DEFAULT_PGBENCH_SCALE: Final = 10
DEFAULT_HTTP_BATCH: Final = 500
DEFAULT_TERMINALS: Final = 500
DEFAULT_QUERY_RATE: Final = 1000.0
DEFAULT_SELF_RATE: Final = 500.0  # page loads/s offered (issue 13's target)
DEFAULT_SINGLE_RATE: Final = 2000.0
DEFAULT_SCALE_ACCOUNTS: Final = 1_000_000
DEFAULT_SCALE_TRANSFERS: Final = 10_000_000
DEFAULT_EXPORT_TRANSFERS: Final = 1_000_000


class Options(msgspec.Struct, kw_only=True):
    """Parsed bench options."""

    workload: str
    dsn: str
    data_dir: str
    duration: float
    warmup: float
    seed: int
    concurrency: int
    request_size: int
    sweep: list[int]
    sweep_sizes: list[int]
    sweep_size_concurrency: int
    sweep_duration: float
    baselines: bool
    baseline_clients: int
    pgbench_scale: int
    purses: int
    http_batch: int
    terminals: int
    rate: float | None
    accounts: int
    transfers: int
    results_dir: str | None
    plot: bool
    progress: bool
    keep: bool
    random_ids: bool
    credentials: bool = False
    client: str = "python"
    gateway_workers: int = 1

    @property
    def transfer_ids(self) -> str:
        """The clients' transfer id kind, as results record it."""
        return "uuid4" if self.random_ids else "uuid7"


def _ints(value: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {value!r}") from e
    if any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError("sweep points must be positive")
    return out


def add_arguments(p: argparse.ArgumentParser, *, with_dsn: bool) -> None:
    """Add the bench arguments to ``p`` (``with_dsn`` for the stand-alone ``python -m bench``;
    the ``onecard`` command line provides --dsn/--data-dir itself)."""
    p.add_argument("workload", choices=WORKLOADS, help="what to measure")
    if with_dsn:
        p.add_argument(
            "--dsn",
            default=None,
            help="maintenance DSN of the PostgreSQL server that hosts the scratch databases "
            "(default: $ONECARD_DSN, else postgresql://postgres@127.0.0.1:5432/postgres; "
            "'embedded' for the embedded PostgreSQL in --data-dir)",
        )
        p.add_argument("--data-dir", default=".onecard", help="embedded PostgreSQL location")
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="seconds measured")
    p.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_S, help="seconds not measured")
    p.add_argument("--seed", type=int, default=1, help="workload seed")
    p.add_argument(
        "--concurrency", type=int, default=None,
        help="concurrent submitters/clients (default per workload: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_CONCURRENCY.items()) + ")",
    )
    p.add_argument(
        "--request-size", type=int, default=None,
        help="transfers per request (core and scale; default 16; the concurrency sweep uses it "
        "too, set 1 for one-transfer requests)",
    )
    p.add_argument(
        "--sweep", type=_ints, default=None,
        help="concurrency points for the plot (default per workload: "
        + "; ".join(f"{k} {v}" for k, v in DEFAULT_SWEEP.items() if v) + ")",
    )
    p.add_argument(
        "--sweep-sizes", type=_ints, default=_ints(DEFAULT_SWEEP_SIZES),
        help="core: request sizes swept at --sweep-size-concurrency submitters, for the "
        f"throughput-vs-batch-size plot (default {DEFAULT_SWEEP_SIZES})",
    )
    p.add_argument("--sweep-size-concurrency", type=int, default=DEFAULT_SWEEP_SIZE_CONCURRENCY)
    p.add_argument("--sweep-duration", type=float, default=DEFAULT_SWEEP_DURATION_S)
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep (and its plot points)")
    p.add_argument("--no-baselines", action="store_true", help="skip naive poster and pgbench")
    p.add_argument("--baseline-clients", type=int, default=DEFAULT_BASELINE_CLIENTS)
    p.add_argument("--pgbench-scale", type=int, default=DEFAULT_PGBENCH_SCALE)
    p.add_argument("--purses", type=int, default=10_000, help="purses in the campus fixture")
    p.add_argument("--http-batch", type=int, default=DEFAULT_HTTP_BATCH,
                   help="transfers per batched HTTP request")
    p.add_argument("--rate", type=float, default=None,
                   help="offered requests/s of paced phases (http single: "
                   f"{DEFAULT_SINGLE_RATE:g}, query: {DEFAULT_QUERY_RATE:g}, "
                   f"self: {DEFAULT_SELF_RATE:g})")
    p.add_argument("--accounts", type=int, default=DEFAULT_SCALE_ACCOUNTS, help="scale: accounts")
    p.add_argument("--transfers", type=int, default=None,
                   help=f"scale: transfers preloaded by COPY (default {DEFAULT_SCALE_TRANSFERS:,});"
                   f" export: transfers in the exported day (default {DEFAULT_EXPORT_TRANSFERS:,})")
    p.add_argument("--results-dir", default=None, help="where to write JSON and PNG "
                   "(default bench/results/)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the scratch databases")
    p.add_argument("--credentials", action="store_true",
                   help="http: also compare the admin token with an API key (role admin, its "
                   "writes in the operator log): single-transfer phases with each, interleaved")
    p.add_argument("--client", choices=CLIENTS, default="python",
                   help="terminals: what drives the HTTP one-transfer phase: the bench's own "
                   "Python clients (default), or wrk (a C client: the load generator costs "
                   "little; needs wrk on PATH)")
    p.add_argument("--gateway-workers", type=int, default=1, metavar="N",
                   help="terminals: the server's terminal gateway processes "
                   "(onecard serve --gateway-workers N; default 1)")
    p.add_argument("--random-ids", action="store_true",
                   help="clients use random UUIDv4 transfer ids (default: time-ordered UUIDv7, "
                   "as the README advises)")


def options(args: argparse.Namespace, dsn: str) -> Options:
    """Options from parsed arguments and the resolved maintenance DSN."""
    conc = args.concurrency or DEFAULT_CONCURRENCY[args.workload]
    size = args.request_size or DEFAULT_REQUEST_SIZE.get(args.workload, 1)
    sweep = args.sweep if args.sweep is not None else _ints(DEFAULT_SWEEP[args.workload])
    transfers = args.transfers
    if transfers is None:
        transfers = DEFAULT_EXPORT_TRANSFERS if args.workload == "export" else (
            DEFAULT_SCALE_TRANSFERS)
    if conc <= 0 or size <= 0 or args.duration <= 0:
        raise SystemExit("bench: --concurrency, --request-size and --duration must be positive")
    _check_terminal_options(args)
    return Options(
        workload=args.workload,
        dsn=dsn,
        data_dir=args.data_dir,
        duration=args.duration,
        warmup=max(0.0, args.warmup),
        seed=args.seed,
        concurrency=conc,
        request_size=size,
        sweep=[] if args.no_sweep else sweep,
        sweep_sizes=[] if args.no_sweep else list(args.sweep_sizes),
        sweep_size_concurrency=args.sweep_size_concurrency,
        sweep_duration=args.sweep_duration,
        baselines=not args.no_baselines,
        baseline_clients=args.baseline_clients,
        pgbench_scale=args.pgbench_scale,
        purses=args.purses,
        http_batch=args.http_batch,
        terminals=conc if args.workload == "terminals" else DEFAULT_TERMINALS,
        rate=args.rate,
        accounts=args.accounts,
        transfers=transfers,
        results_dir=args.results_dir,
        plot=not args.no_plot,
        progress=not args.no_progress,
        keep=args.keep,
        random_ids=args.random_ids,
        credentials=args.credentials,
        client=args.client,
        gateway_workers=args.gateway_workers,
    )


def _check_terminal_options(args: argparse.Namespace) -> None:
    """--client and --gateway-workers shape the terminals workload only; wrk must be there
    before any database is built."""
    if args.workload != "terminals" and (args.client != "python" or args.gateway_workers != 1):
        raise SystemExit("bench: --client and --gateway-workers apply to the terminals workload")
    if not 1 <= args.gateway_workers <= limits.GATEWAY_MAX_WORKERS:
        raise SystemExit(f"bench: --gateway-workers must be 1..{limits.GATEWAY_MAX_WORKERS}")
    if args.client == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("bench: --client wrk: wrk is not on PATH (apt-get install wrk)")

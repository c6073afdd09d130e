"""The ``onecard`` command line (contract §3)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import uvloop

from engine.config import DEFAULT_DATA_DIR, DEFAULT_HTTP, DEFAULT_ISO, parse_hostport
from engine.service import tune_gc

log = logging.getLogger("onecard")

Command = Callable[[argparse.Namespace, str], Coroutine[Any, Any, int]]
_COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    """Register an async subcommand ``fn(args, dsn) -> exit code``."""

    def register(fn: Command) -> Command:
        _COMMANDS[name] = fn
        return fn

    return register


@contextlib.contextmanager
def database(args: argparse.Namespace) -> Iterator[str]:
    """The DSN to use: ``--dsn``/``ONECARD_DSN``, else the embedded PostgreSQL in the data dir
    (started if needed; stopped on exit when this process started it)."""
    dsn = args.dsn or os.environ.get("ONECARD_DSN")
    if dsn:
        yield dsn
        return
    from engine.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(args.data_dir)
    log.info("starting embedded PostgreSQL for %s", args.data_dir)
    try:
        yield pg.start()
    finally:
        if args.command == "serve" or args.stop_embedded:
            pg.stop()


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dsn", help="PostgreSQL DSN (default: $ONECARD_DSN, else embedded)")
    common.add_argument(
        "--data-dir",
        default=os.environ.get("ONECARD_DATA_DIR", DEFAULT_DATA_DIR),
        help="where the embedded PostgreSQL and local state live (default .onecard/)",
    )
    common.add_argument(
        "--stop-embedded",
        action="store_true",
        help="stop the embedded PostgreSQL when the command ends (serve always does)",
    )
    common.add_argument("-v", "--verbose", action="store_true")
    p = argparse.ArgumentParser(prog="onecard", description="Campus one-card engine")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", parents=[common], help="run the HTTP API and terminal gateway")
    s.add_argument("--http", default=DEFAULT_HTTP, type=_hostport, help="HOST:PORT for HTTP")
    s.add_argument("--iso", default=DEFAULT_ISO, type=_hostport, help="HOST:PORT for ISO 8583")
    s.add_argument("--no-iso", action="store_true", help="do not start the terminal gateway")

    sub.add_parser("migrate", parents=[common], help="apply database migrations")
    sub.add_parser("snapshot", parents=[common], help="record balance snapshots now")
    for name, fn in _EXTRA_PARSERS:
        fn(sub.add_parser(name, parents=[common], help=_EXTRA_HELP[name]))
    return p


def _hostport(value: str) -> tuple[str, int]:
    try:
        return parse_hostport(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


_EXTRA_PARSERS: list[tuple[str, Callable[[argparse.ArgumentParser], None]]] = []
_EXTRA_HELP: dict[str, str] = {}


def subcommand(
    name: str, help_text: str
) -> Callable[
    [Callable[[argparse.ArgumentParser], None]], Callable[[argparse.ArgumentParser], None]
]:
    """Register the argument parser of a subcommand defined in another module."""

    def register(
        fn: Callable[[argparse.ArgumentParser], None],
    ) -> Callable[[argparse.ArgumentParser], None]:
        _EXTRA_PARSERS.append((name, fn))
        _EXTRA_HELP[name] = help_text
        return fn

    return register


# -- commands ------------------------------------------------------------------------------------


@command("migrate")
async def _migrate(args: argparse.Namespace, dsn: str) -> int:
    import asyncpg

    from engine.migrate import migrate

    conn = await asyncpg.connect(dsn)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


@command("snapshot")
async def _snapshot(args: argparse.Namespace, dsn: str) -> int:
    from engine.service import create_pool
    from engine.store import Store

    pool = await create_pool(dsn, max_size=2)
    try:
        store = Store(pool)
        for ledger in await store.ledgers():
            ts, count = await store.snapshot(ledger)
            print(f"ledger {ledger}: {count} accounts at timestamp {ts}")
    finally:
        await pool.close()
    return 0


@command("serve")
async def _serve(args: argparse.Namespace, dsn: str) -> int:
    from engine.server import serve

    await serve(dsn, args)
    return 0


def _load_plugins() -> None:
    # Subcommands that live with their concept register themselves on import.
    for module in _PLUGIN_MODULES:
        try:
            __import__(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the module exists but something it needs is missing
                raise


_PLUGIN_MODULES: tuple[str, ...] = (
    "engine.export",
    "engine.reconcile",
    "engine.verify",
    "engine.statement",
    "engine.subsidy",
    "terminals.simulator",
    "bench.cli",
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``onecard`` console script."""
    _load_plugins()
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    fn = _COMMANDS[args.command]
    try:
        with database(args) as dsn:
            tune_gc()
            code = uvloop.run(fn(args, dsn))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a clear message, not a traceback, for operators
        if args.verbose:
            raise
        print(f"onecard {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return int(code)


if __name__ == "__main__":
    # Plugin modules register with `engine.cli`, not with this `__main__` copy: use that one.
    from engine.cli import main as _main

    sys.exit(_main())

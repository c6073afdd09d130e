"""What every ``onecard`` command shares: its shape, the database it runs on, argument types
and the operator's console (rich). Only the CLI imports this module."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from datetime import date, datetime
from typing import Any

import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.calendar import parse_day, parse_instant, parse_month
from engine.config import DEFAULT_DATA_DIR, parse_hostport

log = logging.getLogger("onecard")

Run = Callable[[argparse.Namespace, str], Coroutine[Any, Any, int]]


class Command(msgspec.Struct, frozen=True):
    """One subcommand: its name and help, how it reads its arguments and what it runs
    (``run(args, dsn) -> exit code``, on the database of ``--dsn`` or the embedded one).
    A command with ``database=False`` makes its own (``restore``): it runs with ``dsn=""``
    and no server is started for it."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Run
    database: bool = True


def common_options(*, suppress: bool = False) -> argparse.ArgumentParser:
    """The flags every subcommand takes (contract §3). ``suppress``: for the actions of a
    command with actions of its own (``onecard apikey revoke --dsn ...``): a flag left out
    there does not reset one given before the action."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dsn", default=default(None),
                        help="PostgreSQL DSN (default: $ONECARD_DSN, else embedded)")
    common.add_argument(
        "--data-dir",
        default=default(os.environ.get("ONECARD_DATA_DIR", DEFAULT_DATA_DIR)),
        help="where the embedded PostgreSQL and local state live (default .onecard/)",
    )
    common.add_argument(
        "--stop-embedded",
        action="store_true",
        default=default(False),
        help="stop the embedded PostgreSQL when the command ends (serve always does)",
    )
    common.add_argument("-v", "--verbose", action="store_true", default=default(False))
    return common


def no_arguments(p: argparse.ArgumentParser) -> None:
    """For a command that takes only the common flags."""


@contextlib.contextmanager
def database(args: argparse.Namespace) -> Iterator[str]:
    """The DSN to use: ``--dsn``/``ONECARD_DSN``, else the embedded PostgreSQL in the data dir
    (started if needed; stopped on exit when this process started it)."""
    dsn = args.dsn or os.environ.get("ONECARD_DSN")
    if dsn:
        yield dsn
        return
    from engine.db.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(args.data_dir)
    log.info("starting embedded PostgreSQL for %s", args.data_dir)
    try:
        yield pg.start()
    finally:
        if args.command == "serve" or args.stop_embedded:
            pg.stop()


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return convert


day_arg: Callable[[str], date] = _typed(parse_day)
month_arg: Callable[[str], date] = _typed(parse_month)
hostport_arg: Callable[[str], tuple[str, int]] = _typed(parse_hostport)
instant_arg: Callable[[str], datetime] = _typed(parse_instant)


def console(*, stderr: bool = False) -> Console:
    """The operator's console; 120 columns when not a terminal (no cropped columns in logs)."""
    if stderr:
        return Console(stderr=True)
    return Console(width=None if sys.stdout.isatty() else 120)


def progress(*, enabled: bool = True) -> Progress:
    """A progress bar on standard error (what standard output carries stays clean)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )

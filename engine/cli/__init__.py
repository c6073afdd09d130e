"""The ``onecard`` command line (contract §3).

The CLI is the top of the house: it imports the commands (an explicit table, in help order)
and through them the domain, the HTTP and terminal edges and the bench; nothing imports it.
Each command lives in the module of its concept: ``serve``, ``ledger`` (migrate, snapshot),
``finance`` (export, reconcile, verify, statement), ``campus`` (subsidy), ``ops`` (backup,
restore), ``access`` (operator, apikey, rotate-secret), ``tools`` (simulate, bench).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Final

import uvloop

from engine.access import secretbox
from engine.cli import access, campus, finance, ledger, ops, serve, tools
from engine.cli.base import Command, common_options, database
from engine.service import tune_gc

COMMANDS: Final[tuple[Command, ...]] = (
    serve.SERVE,
    ledger.MIGRATE,
    ledger.SNAPSHOT,
    finance.EXPORT,
    finance.RECONCILE,
    finance.VERIFY,
    finance.STATEMENT,
    campus.SUBSIDY,
    ops.BACKUP,
    ops.RESTORE,
    access.OPERATOR,
    access.APIKEY,
    access.ROTATE_SECRET,
    tools.SIMULATE,
    tools.BENCH,
)


def _parser() -> argparse.ArgumentParser:
    common = common_options()
    p = argparse.ArgumentParser(prog="onecard", description="Campus one-card engine")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        c.arguments(sub.add_parser(c.name, parents=[common], help=c.help))
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``onecard`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    command = {c.name: c for c in COMMANDS}[args.command]
    # PINs and MAC keys are sealed under the key of this data directory (or ONECARD_SECRET_KEY)
    secretbox.configure(args.data_dir)
    try:
        with database(args) if command.database else contextlib.nullcontext("") as dsn:
            tune_gc()
            code = uvloop.run(command.run(args, dsn))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a clear message, not a traceback, for operators
        if args.verbose:
            raise
        print(f"onecard {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return int(code)

"""Campus commands: ``subsidy`` (credit subsidy purses from a CSV file, or clear unused
subsidy down at the end of a month)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Final

from rich.console import Console
from rich.table import Table

from engine.calendar import campus_tz, campus_tz_name, parse_month
from engine.campus.subsidies import (
    FileError,
    FundMissing,
    Grant,
    clear_down,
    grant_subsidies,
    read_grants,
)
from engine.cli.base import Command, console, progress
from engine.service import Engine


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", type=Path, help="CSV: holder_id,amount_fen[,ledger]")
    p.add_argument("--ledger", type=int, help="ledger of rows without a ledger column")
    p.add_argument("--batch-id", help="idempotency id of this run (default: from the content)")
    p.add_argument("--clear-down", action="store_true",
                   help="return unused subsidy of --month to the fund")
    p.add_argument("--month", help="YYYY-MM (campus time) for --clear-down")
    p.add_argument("--tz", default=campus_tz_name(),
                   help="campus time zone (default $ONECARD_TZ or Asia/Shanghai)")


async def _subsidy(args: argparse.Namespace, dsn: str) -> int:
    """``onecard subsidy``: exit 0 all done, 1 some rows not credited, 2 bad input."""
    err = console(stderr=True)
    if bool(args.file) == bool(args.clear_down):
        err.print("onecard subsidy: give either --file F.csv or --clear-down --month YYYY-MM")
        return 2
    if args.clear_down and (not args.month or args.ledger is None):
        err.print("onecard subsidy --clear-down needs --month YYYY-MM and --ledger L")
        return 2
    grants: list[Grant] = []
    if args.file:
        try:
            batch, grants = read_grants(args.file.read_bytes(), ledger=args.ledger,
                                        batch_id=args.batch_id)
        except (OSError, FileError) as e:
            err.print(f"onecard subsidy: {args.file}: {e}")
            return 2
    else:
        try:
            parse_month(args.month)
        except ValueError:
            err.print(f"onecard subsidy: --month must be YYYY-MM, not {args.month!r}")
            return 2
        try:
            campus_tz(args.tz)
        except ValueError as e:
            err.print(f"onecard subsidy: --tz: {e}")
            return 2
    engine = Engine(dsn)
    await engine.start()
    try:
        if args.file:
            return await _run_grants(engine, grants, batch)
        return await _run_clear_down(engine, args.ledger, args.month, args.tz)
    except FundMissing as e:
        err.print(f"onecard subsidy: {e}")
        return 2
    finally:
        await engine.stop()


async def _run_grants(engine: Engine, grants: list[Grant], batch: str) -> int:
    with progress() as bar:
        task = bar.add_task(f"subsidy {batch}", total=len(grants))
        results = await grant_subsidies(
            engine, grants, on_progress=lambda n: bar.advance(task, n)
        )
    _summary(f"subsidy batch {batch}", [(r.status, r.amount) for r in results])
    return 0 if all(r.ok for r in results) else 1


async def _run_clear_down(engine: Engine, ledger: int, month: str, tz: str) -> int:
    with progress() as bar:
        task = bar.add_task(f"clear-down {month}", total=None)
        results = await clear_down(
            engine, ledger, month, tz=tz,
            on_total=lambda n: bar.update(task, total=n),
            on_progress=lambda n: bar.advance(task, n),
        )
    _summary(f"clear-down {month}, ledger {ledger}",
             [(str(r.status), r.amount) for r in results])
    return 0 if all(r.status.ok for r in results) else 1


def _summary(title: str, rows: list[tuple[str, int]]) -> None:
    count: Counter[str] = Counter()
    fen: Counter[str] = Counter()
    for status, amount in rows:
        count[status] += 1
        fen[status] += amount
    table = Table(title=title)
    table.add_column("status")
    table.add_column("rows", justify="right")
    table.add_column("amount_fen", justify="right")
    for status in sorted(count):
        table.add_row(status, str(count[status]), str(fen[status]))
    table.add_row("total", str(sum(count.values())), str(sum(fen.values())), style="bold")
    Console(file=sys.stdout, width=100).print(table)


SUBSIDY: Final = Command(
    "subsidy", "credit subsidy purses from a CSV file, or clear unused subsidy down",
    _arguments, _subsidy,
)

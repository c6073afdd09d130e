"""Finance commands: ``export``, ``reconcile``, ``statement`` and ``verify`` (contract §3),
and how their results are shown to an operator."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Final

from rich.console import Console
from rich.table import Table

from engine.cli.base import Command, console, day_arg, month_arg, progress
from engine.db.pool import create_pool
from engine.finance.export import ExportResult, export_day
from engine.finance.export_files import fen
from engine.finance.reconcile import (
    ProviderFileError,
    ReconcileError,
    Reconciliation,
    Result,
    reconcile,
)
from engine.finance.statements import MonthStatement, Subject, UnknownSubject, monthly_statement
from engine.finance.verify import verify
from ledger.types import AccountKind

SHOW_UNMATCHED: Final = 20  # unmatched reconcile lines printed in the summary
SHOW_SUBJECTS: Final = 50  # rows of the printed statement summary; the CSV has them all
SHOW_PROBLEMS: Final = 10  # verify problems printed after the first one


# -- export ------------------------------------------------------------------------------------


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--date", required=True, type=day_arg, help="campus-local day YYYY-MM-DD")
    p.add_argument("--out", required=True, type=Path, help="directory to write the files in")
    p.add_argument(
        "--ledger", type=int, action="append", help="export only this ledger (repeatable)"
    )


async def _export(args: argparse.Namespace, dsn: str) -> int:
    pool = await create_pool(dsn, max_size=1)
    try:
        with progress() as bar:
            task = bar.add_task(f"export {args.date.isoformat()}", total=None)
            result = await export_day(
                pool, args.date, args.out, ledgers=args.ledger,
                on_progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    finally:
        await pool.close()
    out = console()
    print_trial_balance(out, result)
    for p in result.files:
        out.print(f"wrote {p}")
    return 0 if result.ok else 1


def print_trial_balance(console: Console, result: ExportResult) -> None:
    """The trial balance by kind as a table, with the debits = credits check."""
    table = Table(title=f"Trial balance {result.day.isoformat()} (CNY)")
    table.add_column("kind")
    table.add_column("normal side")
    table.add_column("accounts", justify="right")
    for col in ("opening", "debits", "credits", "closing"):
        table.add_column(col, justify="right")
    for t in result.by_kind:
        side = "credit" if AccountKind(t.kind).credit_normal else "debit"
        table.add_row(
            t.kind, side, str(t.accounts), fen(t.opening), fen(t.debits), fen(t.credits),
            fen(t.closing),
        )
    table.add_section()
    table.add_row(
        "total", "", str(result.accounts), "", fen(result.total_debits),
        fen(result.total_credits), "",
    )
    console.print(table)
    balanced = result.total_debits == result.total_credits
    console.print(
        f"{result.postings} postings; total debits {fen(result.total_debits)} "
        f"{'==' if balanced else '!='} total credits {fen(result.total_credits)}: "
        + ("[green]balanced[/green]" if balanced else "[red]NOT BALANCED[/red]")
    )
    for p in result.problems:
        console.print(f"[red]{p}[/red]")


# -- reconcile ---------------------------------------------------------------------------------


def _reconcile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--date", required=True, type=day_arg, help="campus-local day YYYY-MM-DD")
    p.add_argument("--clearing", required=True, type=int, help="the clearing account id")
    p.add_argument(
        "--statement", required=True, type=Path, help="CSV provider_ref,amount_fen,time"
    )
    p.add_argument("--out", type=Path, default=Path("."), help="where reconcile-D.csv goes")


async def _reconcile(args: argparse.Namespace, dsn: str) -> int:
    pool = await create_pool(dsn, max_size=1)
    try:
        rec = await reconcile(pool, args.date, args.clearing, args.statement, out=args.out)
    except (ProviderFileError, ReconcileError) as e:
        print(f"onecard reconcile: {e}", file=sys.stderr)
        return 2
    finally:
        await pool.close()
    print_summary(console(), rec)
    return 0 if rec.ok else 1


def print_summary(console: Console, rec: Reconciliation) -> None:
    """Counts and amounts per result, then the first unmatched lines."""
    table = Table(title=f"Reconciliation of clearing account {rec.clearing} on {rec.day}")
    table.add_column("result")
    table.add_column("lines", justify="right")
    table.add_column("ledger CNY", justify="right")
    table.add_column("statement CNY", justify="right")
    for res in Result:
        xs = [x for x in rec.lines if x.result is res]
        style = "green" if res is Result.MATCHED else ("red" if xs else "")
        table.add_row(
            f"[{style}]{res}[/{style}]" if style else str(res),
            str(len(xs)),
            fen(sum(x.ledger_amount or 0 for x in xs)),
            fen(sum(x.statement_amount or 0 for x in xs)),
        )
    console.print(table)
    if rec.ignored_rows:
        console.print(f"{rec.ignored_rows} statement row(s) outside {rec.day} ignored")
    bad = [x for x in rec.lines if x.result is not Result.MATCHED]
    for x in bad[:SHOW_UNMATCHED]:
        console.print(
            f"  {x.result}: ref {x.provider_ref or '(none)'} transfer {x.transfer_id or '-'} "
            f"ledger {x.ledger_amount if x.ledger_amount is not None else '-'} "
            f"statement {x.statement_amount if x.statement_amount is not None else '-'}"
        )
    if len(bad) > SHOW_UNMATCHED:
        console.print(f"  ... {len(bad) - SHOW_UNMATCHED} more in the CSV")
    if rec.path is not None:
        console.print(f"wrote {rec.path}")
    console.print("[green]all matched[/green]" if rec.ok else f"[red]{len(bad)} unmatched[/red]")


# -- monthly statements ------------------------------------------------------------------------


def _statement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--month", required=True, type=month_arg, help="campus-local YYYY-MM")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--room", help="one room's statement")
    who.add_argument("--holder", help="one holder's statement")
    p.add_argument("--ledger", type=int, help="only this ledger (campus)")
    p.add_argument("--out", type=Path, default=Path("."), help="where the CSV files go")


async def _statement(args: argparse.Namespace, dsn: str) -> int:
    pool = await create_pool(dsn, max_size=1)
    try:
        st = await monthly_statement(
            pool, args.month, room=args.room, holder=args.holder, ledger=args.ledger,
            out=args.out,
        )
    except UnknownSubject as e:
        print(f"onecard statement: {e}", file=sys.stderr)
        return 2
    finally:
        await pool.close()
    print_statement(console(), st)
    return 0 if st.ok else 1


def print_statement(console: Console, st: MonthStatement) -> None:
    """A summary table per room and per holder (CNY)."""
    m = f"{st.month.year:04d}-{st.month.month:02d}"
    if st.rooms:
        t = Table(title=f"Electricity by room, {m} (CNY)")
        for col in ("room", "opening", "purchases", "consumption", "reversals", "other",
                    "closing"):
            t.add_column(col, justify="left" if col == "room" else "right")
        for s in st.rooms[:SHOW_SUBJECTS]:
            t.add_row(
                s.id, fen(s.opening), fen(s.total("purchase")), fen(s.total("consumption")),
                fen(s.total("reversal")), fen(s.total("other")), _closing(s),
            )
        console.print(t)
    if st.holders:
        t = Table(title=f"Hot water and electricity by holder, {m} (CNY)")
        for col in ("holder", "opening", "hot water", "electricity", "reversals", "other",
                    "closing"):
            t.add_column(col, justify="left" if col == "holder" else "right")
        for s in st.holders[:SHOW_SUBJECTS]:
            t.add_row(
                s.id, fen(s.opening), fen(s.total("hot_water")), fen(s.total("electricity")),
                fen(s.total("reversal")), fen(s.other), _closing(s),
            )
        console.print(t)
    shown = len(st.rooms[:SHOW_SUBJECTS]) + len(st.holders[:SHOW_SUBJECTS])
    if shown < len(st.rooms) + len(st.holders):
        console.print(f"({len(st.rooms) + len(st.holders) - shown} more in the CSV files)")
    for s in (*st.rooms, *st.holders):
        if not s.adds_up:
            console.print(f"[red]{s.label}: the lines do not add up to the closing balance; "
                          "run onecard verify[/red]")
    for p in st.files:
        console.print(f"wrote {p}")


def _closing(s: Subject) -> str:
    return fen(s.closing) if s.adds_up else f"[red]{fen(s.closing)}[/red]"


# -- verify ------------------------------------------------------------------------------------


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ledger", type=int, action="append", help="check only this ledger (repeatable)"
    )


async def _verify(args: argparse.Namespace, dsn: str) -> int:
    pool = await create_pool(dsn, max_size=1)
    try:
        report = await verify(pool, ledgers=args.ledger)
    finally:
        await pool.close()
    first = report.first()
    if first is None:
        print(
            f"OK: {report.ledgers} ledgers, {report.transfers} transfers in {report.batches} "
            f"audit batches, {report.snapshots} snapshots, {report.accounts} accounts, "
            f"{report.expired_holds} expired holds, {report.operator_log} operator log entries"
        )
        return 0
    print(f"FAILED: {first}")
    rest = [p for p in report.ordered() if p is not first]
    total = len(rest) + report.more_problems
    if total:
        shown = rest if args.verbose else rest[:SHOW_PROBLEMS]
        print(f"{total} further problem(s):")
        for p in shown:
            print(f"  {p}")
        if total > len(shown):
            print(f"  ... {total - len(shown)} more (-v lists the kept ones)")
    return 1


EXPORT: Final = Command(
    "export", "write a business day's settlement, trial balance and journals", _export_args,
    _export,
)
RECONCILE: Final = Command(
    "reconcile", "match a clearing account's top-ups with a provider statement",
    _reconcile_args, _reconcile,
)
VERIFY: Final = Command(
    "verify", "check the audit chain, snapshots, invariants and the operator log", _verify_args,
    _verify
)
STATEMENT: Final = Command(
    "statement", "monthly electricity and hot-water statements by room and holder",
    _statement_args, _statement,
)

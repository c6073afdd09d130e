"""What the operator sees: the progress line during the rush, and the report after it (the
answers by message type and response code, throughput, latency quantiles and the check)."""

from __future__ import annotations

import msgspec
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from terminals.simulator.books import Op, Stats
from terminals.simulator.checks import Check
from terminals.simulator.options import Options
from terminals.simulator.world import World


def progress_bar(console: Console, o: Options) -> Progress:
    """The lunch rush's progress line (hidden without ``o.progress``)."""
    return Progress(
        TextColumn("[bold]lunch rush"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not o.progress,
    )


class Report(msgspec.Struct, frozen=True):
    """The outcome of a run."""

    ledger: int
    terminals: int
    holders: int
    duration_s: float
    answered: int
    throughput: float
    p50_ms: float
    p99_ms: float
    codes: dict[str, dict[str, int]]
    accounts_checked: int
    mismatched_accounts: int
    pending_left: int
    zero_sum: bool
    unresolved: int
    retransmit_mismatch: int
    unexpected: int
    problems: list[str]

    @property
    def consistent(self) -> bool:
        """True when the ledger matches the books and every answer was as expected."""
        return (
            self.mismatched_accounts == 0 and self.pending_left == 0 and self.zero_sum
            and self.unresolved == 0 and self.retransmit_mismatch == 0 and self.unexpected == 0
        )


def quantile(sorted_values: list[float], q: float) -> float:
    """The ``q``-quantile of values sorted ascending (0.0 when there are none)."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarize(world: World, stats: Stats, check: Check, elapsed: float) -> Report:
    """The report of a run: what was built, how the answers came back, what the check found."""
    lat = sorted(stats.latencies)
    codes: dict[str, dict[str, int]] = {}
    for (op, code), n in sorted(stats.codes.items()):
        codes.setdefault(str(op), {})[code] = n
    return Report(
        ledger=world.ledger,
        terminals=len(world.terminals),
        holders=len(world.holders),
        duration_s=elapsed,
        answered=stats.answered,
        throughput=stats.answered / elapsed if elapsed else 0.0,
        p50_ms=quantile(lat, 0.50) * 1000,
        p99_ms=quantile(lat, 0.99) * 1000,
        codes=codes,
        accounts_checked=check.accounts,
        mismatched_accounts=check.mismatched,
        pending_left=check.pending,
        zero_sum=check.zero_sum,
        unresolved=stats.unresolved,
        retransmit_mismatch=stats.retransmit_mismatch,
        unexpected=stats.unexpected,
        problems=stats.problems,
    )


def show(report: Report, console: Console) -> None:
    """Print the answers by message type and code, the figures, and the check."""
    all_codes = sorted({c for per in report.codes.values() for c in per})
    table = Table(title="answers by message type and response code")
    table.add_column("message")
    for c in all_codes:
        table.add_column(c, justify="right")
    table.add_column("total", justify="right", style="bold")
    for op in Op:
        per = report.codes.get(str(op))
        if per:
            table.add_row(str(op), *(str(per.get(c, "")) for c in all_codes),
                          str(sum(per.values())))
    console.print(table)
    ok, bad = "[green]ok[/]", "[red]FAILED[/]"

    def verdict(n: int) -> str:
        return ok if n == 0 else f"{bad} ({n})"

    summary = Table(title="run", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    for what, value in (
        ("ledger", str(report.ledger)),
        ("terminals / holders", f"{report.terminals} / {report.holders}"),
        ("traffic time", f"{report.duration_s:.1f} s"),
        ("answers", f"{report.answered:,}"),
        ("throughput", f"{report.throughput:,.0f} answers/s"),
        ("latency p50 / p99", f"{report.p50_ms:.1f} / {report.p99_ms:.1f} ms"),
        ("accounts checked", f"{report.accounts_checked:,}"),
        ("balances as expected", verdict(report.mismatched_accounts)),
        ("nothing left pending", verdict(report.pending_left)),
        ("debits = credits", ok if report.zero_sum else bad),
        ("every request answered", verdict(report.unresolved)),
        ("retransmissions identical", verdict(report.retransmit_mismatch)),
        ("response codes as expected", verdict(report.unexpected)),
    ):
        summary.add_row(what, value)
    console.print(summary)
    for p in report.problems[:20]:
        console.print(f"[red]- {p}", highlight=False)
    console.print("[green bold]consistent[/]" if report.consistent else "[red bold]INCONSISTENT[/]")

"""``onecard export --date D --out DIR``: a campus-local business day for the finance office.

Writes, in DIR (contract §3; CSV with a header row, no total rows, amounts in fen):

* ``settlement-D.csv`` ``account_id,name,kind,count,gross_fen,reversed_fen,net_fen``: one row
  per merchant and utility account. ``count``/``gross`` are the postings crediting the account
  on D; ``reversed`` the reversals (code 7) and refunds (code 6) debiting it; ``net`` = gross -
  reversed.
* ``trial-balance-D.csv`` ``account_id,kind,opening_fen,debits_fen,credits_fen,closing_fen``:
  every account that existed by the end of D; opening and closing are posted balances signed by
  the kind's normal side (credit-normal: credits - debits; clearing and fund: the reverse).
* ``journal-D.csv`` ``transfer_id,timestamp,time,code,account_id,side,amount_fen,user_data``:
  two rows (debit, credit) per posting of D, in timestamp order; ``time`` is RFC 3339 in the
  campus zone with microseconds.
* ``journal-D.beancount``: open directives, the opening balances (one transaction on D-1), one
  transaction per posting of D, and a ``balance`` assertion per account on D+1 whose amount is
  computed independently of the journal (the nearest snapshot run and the transfers between it
  and the end of D), exact to the fen (``~ 0.00``), so ``bean-check`` proves the journal adds up
  to the ledger.

What counts as a posting: money that moved. A plain transfer posts its amount; a
``post_pending`` posts the amount it settled (the stored amount, which may be less than the
hold), on its own timestamp and with the hold's id as ``pending_id`` metadata. A pending
transfer (a hold) is not a posting, nor a ``void_pending`` or an expiry: they only reserve and
release money, and the trial balance is of posted balances. The journal CSV and the beancount
file hold exactly the same postings.

"The day D" is ``[00:00, 24:00)`` local time in ``ONECARD_TZ``. Everything is read in one
REPEATABLE READ transaction (a consistent view beside a live engine); the day's transfers are
streamed through a server-side cursor, so memory grows with the number of accounts, not of
transfers.
"""


from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import msgspec

from engine.calendar import campus_tz, day_window
from engine.db.stream import stream
from engine.finance.day_reads import (
    SQL_DAY_COUNT,
    SQL_DAY_POSTINGS,
    SQL_LEDGERS,
    AccountDay,
    accounts_day,
    existed,
)
from engine.finance.export_files import (
    JOURNAL_HEADER,
    DayClock,
    Outputs,
    Writers,
    bean_head,
    bean_tail,
    beancount_account,
    write_settlement,
    write_trial_balance,
)
from ledger.types import AccountKind


class KindTotal(msgspec.Struct, kw_only=True):
    """Trial-balance totals of one account kind (signed balances)."""

    kind: str
    accounts: int = 0
    opening: int = 0
    debits: int = 0
    credits: int = 0
    closing: int = 0


class ExportResult(msgspec.Struct, kw_only=True):
    """What an export wrote and what it checked."""

    day: date
    files: list[Path]
    postings: int
    accounts: int
    by_kind: list[KindTotal]
    total_debits: int
    total_credits: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        """Debits equal credits and the journal reproduces the independent closing balances."""
        return self.total_debits == self.total_credits and not self.problems


async def export_day(
    pool: asyncpg.Pool,
    day: date,
    out: Path,
    *,
    tz: ZoneInfo | None = None,
    ledgers: Sequence[int] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write the four files of campus-local day ``day`` into ``out`` (see the module doc).

    ``ledgers`` limits the export to those ledgers (default: all). ``on_progress(done, total)``
    is called as postings are written (the CLI draws a progress bar with it). Files appear
    complete or not at all (written aside, then renamed).
    """
    zone = tz or campus_tz()
    start, end = day_window(day, zone)
    clock = DayClock(day, start, end, zone)
    postings = 0
    with Outputs(out, day) as files:
        async with pool.acquire() as conn, conn.transaction(
            isolation="repeatable_read", readonly=True
        ):
            chosen = [r["ledger"] for r in await conn.fetch(SQL_LEDGERS, ledgers)]
            per_ledger = [
                [a for a in await accounts_day(conn, lg, start, end) if existed(a, end)]
                for lg in chosen
            ]
            total = sum([await conn.fetchval(SQL_DAY_COUNT, lg, start, end) for lg in chosen])
            names = {a.id: beancount_account(a.kind, a.id) for accs in per_ledger for a in accs}
            files.journal.write(",".join(JOURNAL_HEADER) + "\n")
            bean_head(files.bean, day, per_ledger, names)
            writers = Writers(files.journal, files.bean, day, clock, names)
            for lg, accs in zip(chosen, per_ledger, strict=True):
                by_id = {a.id: a for a in accs}
                async for chunk in stream(conn, SQL_DAY_POSTINGS, lg, start, end):
                    writers.chunk(chunk, by_id)
                    postings += len(chunk)
                    if on_progress is not None:
                        on_progress(postings, total)
        accounts = [a for accs in per_ledger for a in accs]
        bean_tail(files.bean, day, accounts, names)
        write_settlement(files.tmp["settlement"], accounts)
        write_trial_balance(files.tmp["trial"], accounts)
        files.commit()
    problems = [
        f"account {a.id}: opening + the day's postings give posted fields "
        f"({a.open_dp + a.debits}, {a.open_cp + a.credits}) but the closing ones are "
        f"({a.close_dp}, {a.close_cp}); run onecard verify"
        for a in accounts
        if (a.open_dp + a.debits, a.open_cp + a.credits) != (a.close_dp, a.close_cp)
    ]
    return ExportResult(
        day=day,
        files=list(files.paths.values()),
        postings=postings,
        accounts=len(accounts),
        by_kind=_by_kind(accounts),
        total_debits=sum(a.debits for a in accounts),
        total_credits=sum(a.credits for a in accounts),
        problems=problems,
    )


def _by_kind(accounts: list[AccountDay]) -> list[KindTotal]:
    totals = {k: KindTotal(kind=str(k)) for k in AccountKind}
    for a in accounts:
        t = totals[a.kind]
        t.accounts += 1
        t.opening += a.signed(a.open_dp, a.open_cp)
        t.debits += a.debits
        t.credits += a.credits
        t.closing += a.signed(a.close_dp, a.close_cp)
    return [t for t in totals.values() if t.accounts]

"""The four files of an export (contract §3): the settlement and trial-balance CSVs, the
journal CSV and the beancount journal, written aside and renamed together."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import IO, Final
from zoneinfo import ZoneInfo

import asyncpg

from engine.calendar import from_ns
from engine.finance.day_reads import AccountDay
from ledger.types import AccountKind, TransferCode, TransferFlags

_AMOUNT_CACHE: Final = 100_000  # distinct amounts whose yuan text is kept
CURRENCY: Final = "CNY"

_POST: Final = int(TransferFlags.POST_PENDING)
_REVERSING: Final = frozenset({int(TransferCode.REFUND), int(TransferCode.REVERSAL)})
_SETTLED_KINDS: Final = frozenset({AccountKind.MERCHANT, AccountKind.UTILITY})

SETTLEMENT_HEADER: Final = (
    "account_id", "name", "kind", "count", "gross_fen", "reversed_fen", "net_fen"
)
TRIAL_BALANCE_HEADER: Final = (
    "account_id", "kind", "opening_fen", "debits_fen", "credits_fen", "closing_fen"
)
JOURNAL_HEADER: Final = (
    "transfer_id", "timestamp", "time", "code", "account_id", "side", "amount_fen", "user_data"
)

# Beancount roots: credit-normal balances are liabilities (money the school holds for holders
# and merchants) or income (utilities); clearing channels are assets; the subsidy fund's
# debit balance is what the school has spent on subsidies.
BEANCOUNT_ACCOUNT: Final = {
    AccountKind.PURSE: "Liabilities:Purse",
    AccountKind.SUBSIDY: "Liabilities:Subsidy",
    AccountKind.ROOM: "Liabilities:Room",
    AccountKind.MERCHANT: "Liabilities:Merchant",
    AccountKind.SUSPENSE: "Liabilities:Suspense",
    AccountKind.UTILITY: "Income:Utility",
    AccountKind.CLEARING: "Assets:Clearing",
    AccountKind.FUND: "Expenses:Subsidy",
}
BEANCOUNT_EQUITY: Final = "Equity:Opening-Balances"

def fen(amount: int) -> str:
    """Fen as a decimal yuan string (exact: integer arithmetic), e.g. -1250 -> '-12.50'."""
    sign = "-" if amount < 0 else ""
    q, r = divmod(abs(amount), 100)
    return f"{sign}{q}.{r:02d}"


def beancount_account(kind: AccountKind, account_id: int) -> str:
    """The beancount account name of a ledger account."""
    return f"{BEANCOUNT_ACCOUNT[kind]}:A{account_id}"


def _bc_str(value: str) -> str:
    """A beancount string literal body: escaped, on one line."""
    return "".join(
        " " if ord(ch) < 32 else ("\\" + ch if ch in '"\\' else ch) for ch in value
    )


class DayClock:
    """Formats engine timestamps of one local day as RFC 3339 with microseconds.

    Integer arithmetic when the day has one UTC offset (always, in Asia/Shanghai): the export
    formats two million of these for a busy day.
    """

    def __init__(self, day: date, start: int, end: int, tz: ZoneInfo) -> None:
        self.tz = tz
        a = from_ns(start, tz).utcoffset()
        b = from_ns(end - 1000, tz).utcoffset()
        self.fixed = a is not None and a == b
        off = a or timedelta(0)
        self.off_ns = (off // timedelta(microseconds=1)) * 1000
        sign = "-" if off < timedelta(0) else "+"
        mins = abs(off) // timedelta(minutes=1)
        self.suffix = f"{sign}{mins // 60:02d}:{mins % 60:02d}"
        self.prefix = f"{day.isoformat()}T"
        self.last_sec = -1
        self.last_text = ""

    def __call__(self, ts: int) -> str:
        if not self.fixed:
            return from_ns(ts, self.tz).isoformat(timespec="microseconds")
        secs, frac = divmod((ts + self.off_ns) // 1000, 1_000_000)
        if secs != self.last_sec:  # a busy day has many transfers per second
            h, rem = divmod(secs % 86_400, 3600)
            m, s = divmod(rem, 60)
            self.last_sec = secs
            self.last_text = f"{self.prefix}{h:02d}:{m:02d}:{s:02d}."
        return f"{self.last_text}{frac:06d}{self.suffix}"


class Writers:
    """The two journal files, written a chunk at a time."""

    def __init__(
        self,
        journal: IO[str],
        bean: IO[str],
        day: date,
        clock: DayClock,
        names: dict[int, str],
    ) -> None:
        self.journal = journal
        self.bean = bean
        self.day = day.isoformat()
        self.clock = clock
        self.names = names
        self.amounts: dict[int, str] = {}  # fen -> yuan text: amounts repeat all day

    def chunk(self, rows: Sequence[asyncpg.Record], accounts: dict[int, AccountDay]) -> None:
        journal: list[str] = []
        bean: list[str] = []
        day, clock, names, codes = self.day, self.clock, self.names, _CODE_NAMES
        amounts = self.amounts
        for tid, ts, code, dr, cr, amount, user_data, pending_id, flags in rows:
            t = clock(ts)
            ud = _csv_field(user_data) if user_data else ""
            journal.append(
                f"{tid},{ts},{t},{code},{dr},debit,{amount},{ud}\n"
                f"{tid},{ts},{t},{code},{cr},credit,{amount},{ud}\n"
            )
            d, c = accounts[dr], accounts[cr]
            d.debits += amount
            c.credits += amount
            c.count += 1
            if code in _REVERSING:
                d.reversed += amount
            a = amounts.get(amount)
            if a is None:
                a = fen(amount)
                if len(amounts) < _AMOUNT_CACHE:
                    amounts[amount] = a
            extra = ""
            if flags & _POST:
                extra = f'  pending_id: "{pending_id}"\n'
            if user_data:
                extra += f'  user_data: "{_bc_str(user_data)}"\n'
            bean.append(
                f'{day} * "{codes.get(code) or code}"\n'
                f'  transfer_id: "{tid}"\n  timestamp: "{ts}"\n{extra}'
                f"  {names[dr]}  {a} CNY\n  {names[cr]}  -{a} CNY\n\n"
            )
        self.journal.write("".join(journal))
        self.bean.write("".join(bean))


def _csv_field(value: str) -> str:
    """A CSV field, quoted only when it must be (RFC 4180)."""
    if any(ch in value for ch in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


_CODE_NAMES: Final = {int(c): c.name.lower() for c in TransferCode}


class Outputs:
    """The four files, written under temporary names and renamed together on ``commit``."""

    def __init__(self, out: Path, day: date) -> None:
        out.mkdir(parents=True, exist_ok=True)
        d = day.isoformat()
        self.paths = {
            "settlement": out / f"settlement-{d}.csv",
            "trial": out / f"trial-balance-{d}.csv",
            "journal": out / f"journal-{d}.csv",
            "bean": out / f"journal-{d}.beancount",
        }
        self.tmp = {k: p.with_name(p.name + ".tmp") for k, p in self.paths.items()}
        self.journal = open(self.tmp["journal"], "w", encoding="utf-8", newline="")  # noqa: SIM115
        self.bean = open(self.tmp["bean"], "w", encoding="utf-8")  # noqa: SIM115
        self.done = False

    def __enter__(self) -> Outputs:
        return self

    def commit(self) -> None:
        self.journal.close()
        self.bean.close()
        for k, p in self.paths.items():
            os.replace(self.tmp[k], p)
        self.done = True

    def __exit__(self, *exc: object) -> None:
        self.journal.close()
        self.bean.close()
        if not self.done:
            for p in self.tmp.values():
                p.unlink(missing_ok=True)


def bean_head(
    f: IO[str], day: date, per_ledger: list[list[AccountDay]], names: dict[int, str]
) -> None:
    """Options, open directives and the opening balances (dated the day before)."""
    before = (day - timedelta(days=1)).isoformat()
    f.write(f'option "title" "onecard journal {day.isoformat()}"\n')
    f.write(f'option "operating_currency" "{CURRENCY}"\n\n')
    f.write(f"{before} open {BEANCOUNT_EQUITY} {CURRENCY}\n")
    for accs in per_ledger:
        for a in accs:
            f.write(
                f"{before} open {names[a.id]} {CURRENCY}\n"
                f'  ledger: "{a.ledger}"\n  account_id: "{a.id}"\n'
            )
    f.write("\n")
    for accs in per_ledger:
        lines = [(a, a.open_dp - a.open_cp) for a in accs if a.open_dp != a.open_cp]
        if not lines:
            continue
        residual = -sum(v for _, v in lines)
        f.write(f'{before} * "opening balances" "ledger {accs[0].ledger}"\n')
        for a, v in lines:
            f.write(f"  {names[a.id]}  {fen(v)} {CURRENCY}\n")
        if residual:  # only if double entry is already broken; verify says where
            f.write(f"  {BEANCOUNT_EQUITY}  {fen(residual)} {CURRENCY}\n")
        f.write("\n")


def bean_tail(f: IO[str], day: date, accounts: list[AccountDay], names: dict[int, str]) -> None:
    """Closing balance assertions, from balances computed without the journal."""
    after = (day + timedelta(days=1)).isoformat()
    for a in accounts:
        # `~ 0.00`: exact to the fen (beancount's inferred tolerance would let 0.01 pass)
        amount = fen(a.close_dp - a.close_cp)
        f.write(f"{after} balance {names[a.id]}  {amount} ~ 0.00 {CURRENCY}\n")


def write_settlement(path: Path, accounts: list[AccountDay]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(SETTLEMENT_HEADER)
        for a in accounts:
            if a.kind in _SETTLED_KINDS:
                gross = a.credits
                w.writerow(
                    (a.id, a.name or "", a.kind, a.count, gross, a.reversed, gross - a.reversed)
                )


def write_trial_balance(path: Path, accounts: list[AccountDay]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(TRIAL_BALANCE_HEADER)
        for a in accounts:
            w.writerow(
                (
                    a.id,
                    a.kind,
                    a.signed(a.open_dp, a.open_cp),
                    a.debits,
                    a.credits,
                    a.signed(a.close_dp, a.close_cp),
                )
            )

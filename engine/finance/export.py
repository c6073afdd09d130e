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

import csv
import os
from collections.abc import Callable, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final
from zoneinfo import ZoneInfo

import asyncpg
import msgspec

from engine.calendar import campus_tz, day_window, from_ns
from engine.db.stream import stream
from ledger.types import UNPOSTED_FLAGS, AccountKind, TransferCode, TransferFlags

if TYPE_CHECKING:
    from engine.db.stream import Conn

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

SQL_LEDGERS = """
SELECT ledger FROM ledgers WHERE $1::int[] IS NULL OR ledger = ANY($1::int[]) ORDER BY ledger
"""
# Posted fields of the accounts of ledger $1 (all, or those in $3) just before instant $2,
# from the snapshot run nearest to it: the latest before it plus the postings in between, or
# the first after it minus the postings in between (with the end-of-day scheduler that window
# is tiny). Without a run the "snapshot" is all zeros at timestamp 0. The window is [lo, hi):
# no transfer shares a snapshot's timestamp, and a transfer at $2 itself is after the instant.
# The bounds are scalar subqueries so that they are index conditions, not join filters.
SQL_POSTED_BEFORE = f"""
WITH r AS (
    SELECT ts, sign FROM (
        (SELECT timestamp AS ts, 1 AS sign FROM snapshot_runs
         WHERE ledger = $1 AND timestamp < $2 ORDER BY timestamp DESC LIMIT 1)
        UNION ALL
        (SELECT timestamp, -1 FROM snapshot_runs
         WHERE ledger = $1 AND timestamp > $2 ORDER BY timestamp LIMIT 1)
        UNION ALL
        SELECT 0::bigint, 1
    ) c ORDER BY abs(ts - $2), sign DESC LIMIT 1
), w AS (
    SELECT least(r.ts, $2) AS lo, greatest(r.ts, $2) AS hi, r.ts, r.sign FROM r
), d AS (
    SELECT t.debit_account_id AS id, sum(t.amount)::bigint AS s FROM transfers t
    WHERE t.ledger = $1 AND t.timestamp >= (SELECT lo FROM w) AND t.timestamp < (SELECT hi FROM w)
      AND t.flags & {UNPOSTED_FLAGS} = 0
      AND ($3::bigint[] IS NULL OR t.debit_account_id = ANY($3::bigint[]))
    GROUP BY 1
), c AS (
    SELECT t.credit_account_id AS id, sum(t.amount)::bigint AS s FROM transfers t
    WHERE t.ledger = $1 AND t.timestamp >= (SELECT lo FROM w) AND t.timestamp < (SELECT hi FROM w)
      AND t.flags & {UNPOSTED_FLAGS} = 0
      AND ($3::bigint[] IS NULL OR t.credit_account_id = ANY($3::bigint[]))
    GROUP BY 1
)
SELECT a.id, a.kind, a.name, a.created_at,
       coalesce(b.debits_posted, 0) + w.sign * coalesce(d.s, 0) AS dp,
       coalesce(b.credits_posted, 0) + w.sign * coalesce(c.s, 0) AS cp
FROM accounts a CROSS JOIN w
LEFT JOIN balance_snapshots b
       ON b.ledger = a.ledger AND b.account_id = a.id AND b.timestamp = w.ts
LEFT JOIN d ON d.id = a.id
LEFT JOIN c ON c.id = a.id
WHERE a.ledger = $1 AND ($3::bigint[] IS NULL OR a.id = ANY($3::bigint[]))
ORDER BY a.id
"""
SQL_DAY_COUNT = f"""
SELECT count(*) FROM transfers
WHERE ledger = $1 AND timestamp >= $2 AND timestamp < $3 AND flags & {UNPOSTED_FLAGS} = 0
"""
SQL_DAY_POSTINGS = f"""
SELECT id::text, timestamp, code, debit_account_id, credit_account_id, amount, user_data,
       pending_id::text, flags
FROM transfers
WHERE ledger = $1 AND timestamp >= $2 AND timestamp < $3 AND flags & {UNPOSTED_FLAGS} = 0
ORDER BY timestamp
"""


class AccountDay(msgspec.Struct, kw_only=True):
    """One account over the day, raw posted fields (not signed)."""

    ledger: int
    id: int
    kind: AccountKind
    name: str | None
    created_at: int
    open_dp: int
    open_cp: int
    close_dp: int
    close_cp: int
    debits: int = 0
    credits: int = 0
    count: int = 0  # postings crediting it
    reversed: int = 0  # refunds and reversals debiting it

    def signed(self, dp: int, cp: int) -> int:
        """A balance signed by the kind's normal side."""
        return cp - dp if self.kind.credit_normal else dp - cp


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


class _DayClock:
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


async def _accounts_day(conn: Conn, ledger: int, start: int, end: int) -> list[AccountDay]:
    opening = await conn.fetch(SQL_POSTED_BEFORE, ledger, start, None)
    closing = {r["id"]: r for r in await conn.fetch(SQL_POSTED_BEFORE, ledger, end, None)}
    out = []
    for o in opening:
        c = closing[o["id"]]
        out.append(
            AccountDay(
                ledger=ledger,
                id=o["id"],
                kind=AccountKind(o["kind"]),
                name=o["name"],
                created_at=o["created_at"],
                open_dp=o["dp"],
                open_cp=o["cp"],
                close_dp=c["dp"],
                close_cp=c["cp"],
            )
        )
    return out


class _Writers:
    """The two journal files, written a chunk at a time."""

    def __init__(
        self,
        journal: IO[str],
        bean: IO[str],
        day: date,
        clock: _DayClock,
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
    clock = _DayClock(day, start, end, zone)
    postings = 0
    with _Outputs(out, day) as files:
        async with pool.acquire() as conn, conn.transaction(
            isolation="repeatable_read", readonly=True
        ):
            chosen = [r["ledger"] for r in await conn.fetch(SQL_LEDGERS, ledgers)]
            per_ledger = [
                [a for a in await _accounts_day(conn, lg, start, end) if _existed(a, end)]
                for lg in chosen
            ]
            total = sum([await conn.fetchval(SQL_DAY_COUNT, lg, start, end) for lg in chosen])
            names = {a.id: beancount_account(a.kind, a.id) for accs in per_ledger for a in accs}
            files.journal.write(",".join(JOURNAL_HEADER) + "\n")
            _bean_head(files.bean, day, per_ledger, names)
            writers = _Writers(files.journal, files.bean, day, clock, names)
            for lg, accs in zip(chosen, per_ledger, strict=True):
                by_id = {a.id: a for a in accs}
                async for chunk in stream(conn, SQL_DAY_POSTINGS, lg, start, end):
                    writers.chunk(chunk, by_id)
                    postings += len(chunk)
                    if on_progress is not None:
                        on_progress(postings, total)
        accounts = [a for accs in per_ledger for a in accs]
        _bean_tail(files.bean, day, accounts, names)
        _write_settlement(files.tmp["settlement"], accounts)
        _write_trial_balance(files.tmp["trial"], accounts)
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


class _Outputs:
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

    def __enter__(self) -> _Outputs:
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


def _existed(a: AccountDay, end: int) -> bool:
    # accounts opened after the day are not part of it (unless they hold money by then)
    return a.created_at < end or bool(a.close_dp or a.close_cp)


def _bean_head(
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


def _bean_tail(f: IO[str], day: date, accounts: list[AccountDay], names: dict[int, str]) -> None:
    """Closing balance assertions, from balances computed without the journal."""
    after = (day + timedelta(days=1)).isoformat()
    for a in accounts:
        # `~ 0.00`: exact to the fen (beancount's inferred tolerance would let 0.01 pass)
        amount = fen(a.close_dp - a.close_cp)
        f.write(f"{after} balance {names[a.id]}  {amount} ~ 0.00 {CURRENCY}\n")


def _write_settlement(path: Path, accounts: list[AccountDay]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(SETTLEMENT_HEADER)
        for a in accounts:
            if a.kind in _SETTLED_KINDS:
                gross = a.credits
                w.writerow(
                    (a.id, a.name or "", a.kind, a.count, gross, a.reversed, gross - a.reversed)
                )


def _write_trial_balance(path: Path, accounts: list[AccountDay]) -> None:
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

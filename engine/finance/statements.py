"""``onecard statement --month YYYY-MM [--room ROOM_ID | --holder HOLDER_ID] [--out DIR]``:
the monthly electricity and hot-water statement of dorm rooms and card holders.

* **Rooms** (``statement-rooms-M.csv``): the room purse's opening balance, every posting on it
  in the campus-local month (``purchase``: electricity bought for the room, code 3 credit;
  ``consumption``: the meter's use, code 3 debit; ``reversal``: code 7 either way; ``other``:
  anything else), each with the running balance, and the closing balance.
* **Holders** (``statement-holders-M.csv``): opening and closing of the holder's two purses
  together (cash + subsidy), the ``hot_water`` postings (code 2: a completed shower posts what
  it used; a hold is not a posting), the ``electricity`` bought for a room (code 3), the
  ``reversal`` of either (code 7 with a utility or room account), and one ``other`` line with
  the net of everything else (meals, top-ups, subsidies) so that the statement adds up.

Both files have the columns
``subject,ledger,item,transfer_id,timestamp,time,account_id,counterparty_id,amount_fen,balance_fen``
(``subject`` is ``room:ID`` or ``holder:ID``; amounts signed from the subject's side, + in and
- out; ``balance_fen`` on opening and closing rows, and running on room lines). Opening and
closing are computed independently of the lines (nearest snapshot plus the window between);
a statement whose lines do not add up to them is reported and the command exits 1.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Final
from zoneinfo import ZoneInfo

import asyncpg
import msgspec

from engine.calendar import campus_tz, from_ns, month_window
from engine.db.stream import stream
from engine.finance.day_reads import SQL_POSTED_BEFORE
from ledger.types import UNPOSTED_FLAGS, AccountKind, TransferCode

if TYPE_CHECKING:
    from engine.db.stream import Conn

STATEMENT_HEADER: Final = (
    "subject", "ledger", "item", "transfer_id", "timestamp", "time", "account_id",
    "counterparty_id", "amount_fen", "balance_fen",
)

_HOT_WATER: Final = int(TransferCode.HOT_WATER)
_ELECTRICITY: Final = int(TransferCode.ELECTRICITY)
_REVERSAL: Final = int(TransferCode.REVERSAL)
_UTILITY_KINDS: Final = frozenset({AccountKind.UTILITY.value, AccountKind.ROOM.value})

SQL_ROOMS = """
SELECT ledger, room_id, account_id FROM rooms
WHERE ($1::text IS NULL OR room_id = $1) AND ($2::int IS NULL OR ledger = $2)
ORDER BY ledger, room_id
"""
SQL_HOLDERS = """
SELECT ledger, id, purse_account_id, subsidy_account_id FROM holders
WHERE ($1::text IS NULL OR id = $1) AND ($2::int IS NULL OR ledger = $2)
ORDER BY ledger, id
"""
SQL_KINDS = "SELECT id, kind FROM accounts WHERE ledger = $1 AND id = ANY($2::bigint[])"
# The month's postings touching the given accounts, in timestamp order.
SQL_MONTH = f"""
SELECT id::text, timestamp, code, debit_account_id, credit_account_id, amount FROM transfers
WHERE ledger = $1 AND timestamp >= $2 AND timestamp < $3 AND flags & {UNPOSTED_FLAGS} = 0
  AND (debit_account_id = ANY($4::bigint[]) OR credit_account_id = ANY($4::bigint[]))
ORDER BY timestamp
"""


class Item(msgspec.Struct, frozen=True):
    """One line of a statement."""

    item: str
    transfer_id: str
    timestamp: int
    account_id: int
    counterparty_id: int
    amount: int  # signed from the subject's side
    balance: int | None = None  # running balance (rooms)


class Subject(msgspec.Struct, kw_only=True):
    """A room or a holder over the month."""

    kind: str  # "room" | "holder"
    id: str
    ledger: int
    accounts: tuple[int, ...]
    opening: int = 0
    closing: int = 0
    items: list[Item] = msgspec.field(default_factory=list)
    other: int = 0  # holders: the net of the postings not listed

    @property
    def label(self) -> str:
        """``room:ID`` or ``holder:ID``."""
        return f"{self.kind}:{self.id}"

    def total(self, *items: str) -> int:
        """The sum of the lines of the given kinds."""
        return sum(i.amount for i in self.items if i.item in items)

    @property
    def adds_up(self) -> bool:
        """Opening plus every line (and ``other``) is the closing balance."""
        return self.opening + sum(i.amount for i in self.items) + self.other == self.closing


class MonthStatement(msgspec.Struct, frozen=True):
    """What ``statement`` produced."""

    month: date
    rooms: list[Subject]
    holders: list[Subject]
    files: list[Path]

    @property
    def ok(self) -> bool:
        """Every statement adds up."""
        return all(s.adds_up for s in (*self.rooms, *self.holders))


class UnknownSubject(ValueError):
    """The room or holder asked for does not exist."""


async def _balances(conn: Conn, ledger: int, at: int, ids: list[int]) -> dict[int, int]:
    """Credit-normal posted balance (credits - debits) of ``ids`` just before ``at``."""
    rows = await conn.fetch(SQL_POSTED_BEFORE, ledger, at, ids)
    return {r["id"]: r["cp"] - r["dp"] for r in rows}


async def _fill(conn: Conn, ledger: int, subjects: list[Subject], start: int, end: int) -> None:
    """Opening, closing and the month's lines of the subjects of one ledger."""
    owner: dict[int, Subject] = {a: s for s in subjects for a in s.accounts}
    ids = sorted(owner)
    opening = await _balances(conn, ledger, start, ids)
    closing = await _balances(conn, ledger, end, ids)
    for s in subjects:
        s.opening = sum(opening.get(a, 0) for a in s.accounts)
        s.closing = sum(closing.get(a, 0) for a in s.accounts)
    running = {s.label: s.opening for s in subjects if s.kind == "room"}
    kinds: dict[int, str] = {}
    async for chunk in stream(conn, SQL_MONTH, ledger, start, end, ids):
        unknown = {x for r in chunk for x in (r[3], r[4]) if x not in kinds}
        if unknown:
            for k in await conn.fetch(SQL_KINDS, ledger, sorted(unknown)):
                kinds[k["id"]] = k["kind"]
        for tid, ts, code, dr, cr, amount in chunk:
            for account, other, sign in ((dr, cr, -1), (cr, dr, 1)):
                who = owner.get(account)
                if who is None or owner.get(other) is who:  # between a holder's own purses: net 0
                    continue
                value = sign * amount
                if who.kind == "room":
                    item = _room_item(code, sign)
                    running[who.label] += value
                    who.items.append(Item(item, tid, ts, account, other, value, running[who.label]))
                else:
                    holder_item = _holder_item(code, kinds.get(other, ""))
                    if holder_item is None:
                        who.other += value
                    else:
                        who.items.append(Item(holder_item, tid, ts, account, other, value))


def _room_item(code: int, sign: int) -> str:
    if code == _ELECTRICITY:
        return "purchase" if sign > 0 else "consumption"
    return "reversal" if code == _REVERSAL else "other"


def _holder_item(code: int, counterparty_kind: str) -> str | None:
    if code == _HOT_WATER:
        return "hot_water"
    if code == _ELECTRICITY:
        return "electricity"
    if code == _REVERSAL and counterparty_kind in _UTILITY_KINDS:
        return "reversal"
    return None


async def monthly_statement(
    pool: asyncpg.Pool,
    month: date,
    *,
    room: str | None = None,
    holder: str | None = None,
    ledger: int | None = None,
    out: Path | None = None,
    tz: ZoneInfo | None = None,
) -> MonthStatement:
    """Statements of ``month`` for one room, one holder, or (neither given) every room and
    every holder; CSV files written into ``out`` when given. UnknownSubject when the room or
    holder asked for does not exist."""
    if room is not None and holder is not None:
        raise ValueError("a room or a holder, not both")
    zone = tz or campus_tz()
    start, end = month_window(month, zone)
    rooms: list[Subject] = []
    holders: list[Subject] = []
    async with pool.acquire() as conn, conn.transaction(
        isolation="repeatable_read", readonly=True
    ):
        if holder is None:
            rooms = [
                Subject(kind="room", id=r["room_id"], ledger=r["ledger"],
                        accounts=(r["account_id"],))
                for r in await conn.fetch(SQL_ROOMS, room, ledger)
            ]
        if room is None:
            holders = [
                Subject(kind="holder", id=r["id"], ledger=r["ledger"],
                        accounts=(r["purse_account_id"], r["subsidy_account_id"]))
                for r in await conn.fetch(SQL_HOLDERS, holder, ledger)
            ]
        if room is not None and not rooms:
            raise UnknownSubject(f"room {room!r} not found")
        if holder is not None and not holders:
            raise UnknownSubject(f"holder {holder!r} not found")
        by_ledger: dict[int, list[Subject]] = {}
        for s in (*rooms, *holders):
            by_ledger.setdefault(s.ledger, []).append(s)
        for lg, subjects in sorted(by_ledger.items()):
            await _fill(conn, lg, subjects, start, end)
    files: list[Path] = []
    if out is not None:
        m = f"{month.year:04d}-{month.month:02d}"
        if holder is None:
            files.append(_write(out / f"statement-rooms-{m}.csv", rooms, zone))
        if room is None:
            files.append(_write(out / f"statement-holders-{m}.csv", holders, zone))
    return MonthStatement(month=month, rooms=rooms, holders=holders, files=files)


def _write(path: Path, subjects: Sequence[Subject], tz: ZoneInfo) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(STATEMENT_HEADER)
        for s in subjects:
            w.writerow((s.label, s.ledger, "opening", "", "", "", "", "", "", s.opening))
            for i in s.items:
                w.writerow(
                    (
                        s.label, s.ledger, i.item, i.transfer_id, i.timestamp,
                        from_ns(i.timestamp, tz).isoformat(timespec="microseconds"),
                        i.account_id, i.counterparty_id, i.amount,
                        "" if i.balance is None else i.balance,
                    )
                )
            if s.kind == "holder":
                w.writerow((s.label, s.ledger, "other", "", "", "", "", "", s.other, ""))
            w.writerow((s.label, s.ledger, "closing", "", "", "", "", "", "", s.closing))
    return path

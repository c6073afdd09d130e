"""What a subsidy file would do, before anything moves (the console's preview, contract §8).

The file is the one ``onecard subsidy --file`` reads (engine/campus/subsidies.py): the same
columns, the same rules, the same batch id (from the file's content) and so the same transfer
ids. ``read_grants`` refuses a malformed file as a whole at its first bad line; a preview
instead reads every row and lists each one that would be refused, so the card office fixes
the file once: rows the file's own rules refuse (``bad_holder``, ``bad_amount``,
``bad_ledger``, ``no_ledger``, ``duplicate``), and rows the database would refuse
(``holder_not_found``, ``fund_not_found``). Rows an earlier run already credited are counted
(``already``): confirming grants them nothing twice.

Reads only; posts nothing.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Final

import msgspec

from engine.campus.subsidies import (
    FUND_NOT_FOUND,
    HOLDER_NOT_FOUND,
    MAX_HOLDER_ID_LEN,
    SQL_EXISTING,
    SQL_SUBSIDY_PURSES,
    funded,
    grant_transfer_id,
    open_file,
)
from engine.store import Store
from ledger.types import INT32_MAX, INT64_MAX

BAD_HOLDER: Final = "bad_holder"
BAD_AMOUNT: Final = "bad_amount"
BAD_LEDGER: Final = "bad_ledger"
NO_LEDGER: Final = "no_ledger"
DUPLICATE: Final = "duplicate"
# The reasons that make the file malformed (``onecard subsidy`` would refuse all of it).
MALFORMED: Final = frozenset({BAD_HOLDER, BAD_AMOUNT, BAD_LEDGER, NO_LEDGER, DUPLICATE})


class Row(msgspec.Struct, frozen=True):
    """One data row of the file as read (``amount`` 0 when it is not a valid amount)."""

    line: int
    ledger: int | None
    holder_id: str
    amount_text: str
    amount: int
    reason: str | None = None  # why it would be refused; None: it would be credited


class Preview(msgspec.Struct, frozen=True):
    """What confirming the file would do."""

    batch_id: str
    rows: list[Row]
    already: int  # rows credited by an earlier run of the same batch

    @property
    def malformed(self) -> bool:
        """The file breaks its own rules: nothing may be confirmed until it is fixed."""
        return any(r.reason in MALFORMED for r in self.rows)

    @property
    def refused(self) -> list[Row]:
        """The rows that would not be credited."""
        return [r for r in self.rows if r.reason is not None]

    @property
    def total(self) -> int:
        """Fen the rows that would be credited add up to (earlier runs' included)."""
        return sum(r.amount for r in self.rows if r.reason is None)

    @property
    def count(self) -> int:
        """How many rows would be credited."""
        return sum(1 for r in self.rows if r.reason is None)


def batch_of(data: bytes) -> str:
    """The batch id ``onecard subsidy`` gives a file without ``--batch-id``."""
    return "file-" + hashlib.sha256(data).hexdigest()[:16]


def _number(raw: str, top: int) -> int | None:
    # ASCII digits only, as read_grants: isdigit() alone takes "\u00b2"
    if raw.isascii() and raw.isdigit() and 0 < int(raw) <= top:
        return int(raw)
    return None


def read_rows(data: bytes, *, ledger: int | None) -> list[Row]:
    """Every data row with the reason the file's own rules refuse it, if any. FileError when
    the file as a whole is unreadable (not UTF-8, a header without the columns)."""
    reader, _ = open_file(data)
    rows: list[Row] = []
    seen: set[tuple[int, str]] = set()
    for n, rec in enumerate(reader, start=2):
        holder = (rec.get("holder_id") or "").strip()
        raw_amount = (rec.get("amount_fen") or "").strip()
        raw_ledger = (rec.get("ledger") or "").strip()
        amount = _number(raw_amount, INT64_MAX)
        row_ledger = _number(raw_ledger, INT32_MAX) if raw_ledger else ledger
        reason: str | None = None
        if not 0 < len(holder) <= MAX_HOLDER_ID_LEN or "\x00" in holder:
            reason = BAD_HOLDER
        elif amount is None:
            reason = BAD_AMOUNT
        elif row_ledger is None:
            reason = BAD_LEDGER if raw_ledger else NO_LEDGER
        elif (row_ledger, holder) in seen:
            reason = DUPLICATE
        if row_ledger is not None and reason != BAD_HOLDER:
            seen.add((row_ledger, holder))
        rows.append(Row(n, row_ledger, holder[:MAX_HOLDER_ID_LEN], raw_amount[:32],
                        amount or 0, reason))
    return rows


async def preview(store: Store, data: bytes, *, ledger: int | None) -> Preview:
    """What ``grant_subsidies`` would do with the file (reads only). FileError as
    ``read_rows``."""
    batch = batch_of(data)
    rows = read_rows(data, ledger=ledger)
    good = [r for r in rows if r.reason is None and r.ledger is not None]
    async with store.pool.acquire() as conn:
        found = await conn.fetch(
            SQL_SUBSIDY_PURSES, [r.ledger for r in good], [r.holder_id for r in good]
        )
    holders = {(x["ledger"], x["id"]) for x in found}
    funds = await funded(store, [lg for lg, _ in holders])
    checked = {
        (r.ledger, r.holder_id): HOLDER_NOT_FOUND if (r.ledger, r.holder_id) not in holders
        else None if r.ledger in funds else FUND_NOT_FOUND
        for r in good
    }
    out = [
        msgspec.structs.replace(r, reason=checked[(r.ledger, r.holder_id)])
        if r.reason is None and r.ledger is not None else r
        for r in rows
    ]
    return Preview(batch, out, await _already(store, batch, out))


async def _already(store: Store, batch: str, rows: list[Row]) -> int:
    """How many of the rows an earlier run of the batch credited."""
    ids = sorted(
        ((r.ledger, grant_transfer_id(r.ledger, batch, r.holder_id)) for r in rows
         if r.reason is None and r.ledger is not None),
        key=lambda x: x[0],
    )
    done = 0
    async with store.pool.acquire() as conn:
        for lg, group in itertools.groupby(ids, key=lambda x: x[0]):
            found = await conn.fetch(SQL_EXISTING, lg, [tid for _, tid in group])
            done += len(found)
    return done

"""A holder's own statement (contract §7 ``/self/statement``): every transfer that touched the
holder's cash or subsidy purse, newest first, a page at a time, and one such transfer alone.

Each line carries the amount as the holder sees it, signed: what came in is positive, what
left is negative, a transfer between the holder's own two purses nets to zero. A hold (a
shower's pending transfer) moves no money while it holds: its line is 0 with the amount held
beside it, and the completion that posts it is its own line; a released hold's line (a void)
is 0 as well. So the lines of a statement add up to the change of the purses' posted balance.

Pages are cut by timestamp (``before``): engine timestamps are unique within a ledger, so a
page never repeats or skips a line, whatever is posted meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final
from uuid import UUID

import asyncpg
import msgspec

from engine import limits
from engine.db.coalesce import Coalescer, Connection
from engine.selfservice.holders import HolderRef
from ledger.types import TransferFlags, TransferState

_PENDING: Final = int(TransferFlags.PENDING)
_VOID: Final = int(TransferFlags.VOID_PENDING)
_COLS: Final = (
    "t.id, t.debit_account_id, t.credit_account_id, t.amount, t.code, t.flags, t.timestamp"
)

# The pages of a batch of page loads ($2..$4: each one's two purses and its `before`; one
# purse is named twice when only it is shown), each its own LATERAL: four index range scans
# (transfers_debit / transfers_credit of each purse), each stopping at $5 rows; UNION drops
# the second copy of a transfer between the two purses.
SQL_PAGES: Final = f"""
SELECT q.i, x.*, hd.state
FROM unnest($2::bigint[], $3::bigint[], $4::bigint[]) WITH ORDINALITY AS q(a, b, before, i)
CROSS JOIN LATERAL (
    SELECT u.* FROM (
        (SELECT {_COLS} FROM transfers t WHERE t.ledger = $1 AND t.debit_account_id = q.a
         AND t.timestamp < q.before ORDER BY t.timestamp DESC LIMIT $5)
        UNION
        (SELECT {_COLS} FROM transfers t WHERE t.ledger = $1 AND t.credit_account_id = q.a
         AND t.timestamp < q.before ORDER BY t.timestamp DESC LIMIT $5)
        UNION
        (SELECT {_COLS} FROM transfers t WHERE t.ledger = $1 AND t.debit_account_id = q.b
         AND t.timestamp < q.before ORDER BY t.timestamp DESC LIMIT $5)
        UNION
        (SELECT {_COLS} FROM transfers t WHERE t.ledger = $1 AND t.credit_account_id = q.b
         AND t.timestamp < q.before ORDER BY t.timestamp DESC LIMIT $5)
    ) u ORDER BY u.timestamp DESC LIMIT $5
) x
LEFT JOIN holds hd ON hd.ledger = $1 AND hd.id = x.id
ORDER BY q.i, x.timestamp DESC
"""
# One transfer, only if it touched one of the holder's purses.
SQL_ONE: Final = f"""
SELECT {_COLS}, hd.state FROM transfers t
LEFT JOIN holds hd ON hd.ledger = t.ledger AND hd.id = t.id
WHERE t.ledger = $1 AND t.id = $2
  AND (t.debit_account_id IN ($3, $4) OR t.credit_account_id IN ($3, $4))
"""
# Later than any engine timestamp (int64 nanoseconds): the first page.
NEWEST: Final = 2**63 - 1


class Line(msgspec.Struct, frozen=True):
    """One transfer as the holder sees it."""

    transfer_id: UUID
    timestamp: int
    code: int
    fen: int  # signed from the holder's side; 0 for a hold and for a released hold
    held: int  # what a hold holds (or held); 0 for every other transfer
    state: TransferState
    released: bool  # a void: what a hold held is free again

    @property
    def is_hold(self) -> bool:
        """A pending transfer (a hold), whatever became of it."""
        return self.held > 0


class Page(msgspec.Struct, frozen=True):
    """A page of the statement; ``next_before`` names the next older page, if there is one."""

    lines: list[Line]
    next_before: int | None


def _line(r: asyncpg.Record, ref: HolderRef) -> Line:
    mine = ref.purses
    flags, amount = r["flags"], r["amount"]
    signed = (amount if r["credit_account_id"] in mine else 0) - (
        amount if r["debit_account_id"] in mine else 0)
    hold = bool(flags & _PENDING)
    void = bool(flags & _VOID)
    state = TransferState.POSTED if r["state"] is None else TransferState(r["state"])
    return Line(
        transfer_id=r["id"],
        timestamp=r["timestamp"],
        code=r["code"],
        fen=0 if hold or void else signed,
        held=abs(signed) if hold else 0,
        state=state,
        released=void,
    )


class _PageQuery(msgspec.Struct, frozen=True):
    ref: HolderRef
    first: int
    second: int
    before: int


class StatementReads:
    """Statement pages of concurrent page loads, one statement per batch (a
    :class:`Coalescer`, as the home page's reads)."""

    def __init__(
        self, pool: Callable[[], asyncpg.Pool], *, size: int = limits.SELF_STATEMENT_PAGE,
        max_batch: int = limits.SELF_COALESCE_MAX_BATCH,
    ) -> None:
        self.size = size
        self._reads: Coalescer[_PageQuery, list[asyncpg.Record]] = Coalescer(
            pool, self._read, max_batch=max_batch, name="onecard-self-statements")

    @property
    def statements(self) -> int:
        """Statements run so far (each serves a batch of page loads)."""
        return self._reads.statements

    async def page(
        self, ref: HolderRef, *, before: int | None, accounts: tuple[int, ...] | None = None
    ) -> Page:
        """The newest lines older than ``before`` (engine ns; None: the newest), of both
        purses or of ``accounts`` (one or both of the holder's purses: the caller checked)."""
        first, second = (accounts or ref.purses)[0], (accounts or ref.purses)[-1]
        assert {first, second} <= set(ref.purses), "only the holder's own purses"
        start = NEWEST if before is None else before
        rows = await self._reads.ask(ref.ledger, _PageQuery(ref, first, second, start))
        lines = [_line(r, ref) for r in rows[: self.size]]
        return Page(lines, lines[-1].timestamp if len(rows) > self.size else None)

    async def _read(
        self, conn: Connection, ledger: int, qs: list[_PageQuery]
    ) -> list[list[asyncpg.Record]]:
        rows = await conn.fetch(SQL_PAGES, ledger, [q.first for q in qs],
                                [q.second for q in qs], [q.before for q in qs], self.size + 1)
        out: list[list[asyncpg.Record]] = [[] for _ in qs]
        for r in rows:
            out[r["i"] - 1].append(r)
        return out


async def statement_line(pool: asyncpg.Pool, ref: HolderRef, transfer_id: UUID) -> Line | None:
    """One transfer of the holder's, or None (unknown, or someone else's)."""
    async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
        r = await conn.fetchrow(SQL_ONE, ref.ledger, transfer_id, ref.purse_id, ref.subsidy_id)
    return None if r is None else _line(r, ref)

"""The ledger as the HTTP API reads it: one account, one transfer, an account's transfers page
by page, and an account's balance as of any instant (from the latest snapshot before it).

:class:`Lookups` holds the pool; :class:`~engine.store.Store` is one, with the writes. Each
lookup is one statement on a connection of its own, outside any batch's transaction.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg
import msgspec
from asyncpg.pool import PoolAcquireContext

from engine import limits
from engine.rows import ACCOUNT_COLS, TRANSFER_COLS, account_of, check_read, state_of, transfer_of
from ledger.account import AccountState
from ledger.transfer import StoredTransfer
from ledger.types import TransferFlags, TransferState

# -- named statements --------------------------------------------------------------------------

SQL_GET_TRANSFER = f"""
SELECT {TRANSFER_COLS}, h.state FROM transfers t
LEFT JOIN holds h ON h.id = t.id AND h.ledger = t.ledger
WHERE t.id = $1 ORDER BY t.ledger LIMIT 1
"""
SQL_GET_ACCOUNT = f"SELECT {ACCOUNT_COLS}, holder_id, name FROM accounts WHERE id = $1"
SQL_ACCOUNT_TRANSFERS = f"""
SELECT * FROM (
    (SELECT {TRANSFER_COLS}, h.state FROM transfers t
     LEFT JOIN holds h ON h.id = t.id AND h.ledger = t.ledger
     WHERE t.ledger = $1 AND t.debit_account_id = $2 AND t.timestamp < $3
     ORDER BY t.timestamp DESC LIMIT $4)
    UNION ALL
    (SELECT {TRANSFER_COLS}, h.state FROM transfers t
     LEFT JOIN holds h ON h.id = t.id AND h.ledger = t.ledger
     WHERE t.ledger = $1 AND t.credit_account_id = $2 AND t.timestamp < $3
     ORDER BY t.timestamp DESC LIMIT $4)
) x ORDER BY timestamp DESC LIMIT $4
"""

# Balance as of $3: the latest snapshot at or before it plus what happened since. Posted
# amounts come from plain and post_pending transfers; pending from holds created minus holds
# released in the window. Every range is an index range scan bounded by the window: the lower
# bound is a scalar subquery (an InitPlan parameter the index condition can use; joining `w`
# only filters after scanning from the start of history), and `resolved_at > 0` repeats the
# holds indexes' partial predicate so the planner may use them. The sums are numeric (sum of
# bigint): holds created and released in the window may add up far past the bigint range
# (two voided holds of 6e18 fen) although each field at any instant fits; the result, a field
# as it was at $3, is cast back to bigint, which also checks that it fits.
_PENDING_FLAG = int(TransferFlags.PENDING)
_VOID_FLAG = int(TransferFlags.VOID_PENDING)
SQL_BALANCE_AT = f"""
WITH s AS (
    SELECT timestamp, debits_posted, credits_posted, debits_pending, credits_pending
    FROM balance_snapshots WHERE ledger = $1 AND account_id = $2 AND timestamp <= $3
    ORDER BY timestamp DESC LIMIT 1
), w AS (SELECT coalesce((SELECT timestamp FROM s), 0) AS lo)
SELECT
  (coalesce((SELECT debits_posted FROM s), 0)
    + coalesce((SELECT sum(amount) FROM transfers t
    WHERE t.ledger = $1 AND t.debit_account_id = $2 AND t.timestamp > (SELECT lo FROM w)
      AND t.timestamp <= $3 AND t.flags & {_PENDING_FLAG | _VOID_FLAG} = 0), 0))::bigint AS dp,
  (coalesce((SELECT credits_posted FROM s), 0)
    + coalesce((SELECT sum(amount) FROM transfers t
    WHERE t.ledger = $1 AND t.credit_account_id = $2 AND t.timestamp > (SELECT lo FROM w)
      AND t.timestamp <= $3 AND t.flags & {_PENDING_FLAG | _VOID_FLAG} = 0), 0))::bigint AS cp,
  (coalesce((SELECT debits_pending FROM s), 0)
    + coalesce((SELECT sum(amount) FROM transfers t
        WHERE t.ledger = $1 AND t.debit_account_id = $2 AND t.timestamp > (SELECT lo FROM w)
          AND t.timestamp <= $3 AND t.flags & {_PENDING_FLAG} <> 0), 0)
    - coalesce((SELECT sum(amount) FROM holds h
        WHERE h.ledger = $1 AND h.debit_account_id = $2 AND h.resolved_at > 0
          AND h.resolved_at > (SELECT lo FROM w)
          AND h.resolved_at <= $3), 0))::bigint AS dq,
  (coalesce((SELECT credits_pending FROM s), 0)
    + coalesce((SELECT sum(amount) FROM transfers t
        WHERE t.ledger = $1 AND t.credit_account_id = $2 AND t.timestamp > (SELECT lo FROM w)
          AND t.timestamp <= $3 AND t.flags & {_PENDING_FLAG} <> 0), 0)
    - coalesce((SELECT sum(amount) FROM holds h
        WHERE h.ledger = $1 AND h.credit_account_id = $2 AND h.resolved_at > 0
          AND h.resolved_at > (SELECT lo FROM w)
          AND h.resolved_at <= $3), 0))::bigint AS cq
"""


class AccountRecord(msgspec.Struct, frozen=True):
    """An account with its live fields, as read."""

    state: AccountState
    holder_id: str | None
    name: str | None


class TransferRecord(msgspec.Struct, frozen=True):
    """A stored transfer with its lifecycle state."""

    transfer: StoredTransfer
    state: TransferState


class BalanceFields(msgspec.Struct, frozen=True):
    """The four balance fields of an account at some instant."""

    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int


class Lookups:
    """The API's reads of the ledger over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def _acquire(self) -> PoolAcquireContext:
        # Every wait is bounded: a pool exhausted for this long answers 503 (or, for a batch,
        # counts as a retryable fault) instead of queueing without end.
        return self.pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S)

    async def get_account(self, account_id: int) -> AccountRecord | None:
        """The live account, or None."""
        async with self._acquire() as conn:
            r = await conn.fetchrow(SQL_GET_ACCOUNT, account_id)
        if r is None:
            return None
        a = account_of(r)
        check_read(a)
        return AccountRecord(state=a, holder_id=r["holder_id"], name=r["name"])


    async def get_transfer(self, transfer_id: UUID) -> TransferRecord | None:
        """A transfer and its state, or None."""
        async with self._acquire() as conn:
            r = await conn.fetchrow(SQL_GET_TRANSFER, transfer_id)
        return None if r is None else TransferRecord(transfer=transfer_of(r), state=state_of(r))

    async def account_transfers(
        self, ledger: int, account_id: int, *, before: int, limit: int
    ) -> tuple[list[TransferRecord], bool]:
        """Up to ``limit`` transfers of an account older than ``before``, newest first, and
        whether older ones exist."""
        async with self._acquire() as conn:
            rows = await conn.fetch(SQL_ACCOUNT_TRANSFERS, ledger, account_id, before, limit + 1)
        records = [TransferRecord(transfer=transfer_of(r), state=state_of(r)) for r in rows]
        return records[:limit], len(records) > limit

    async def balance_at(self, ledger: int, account_id: int, at: int) -> BalanceFields:
        """The account's four balance fields as of engine timestamp ``at`` (inclusive)."""
        async with self._acquire() as conn:
            r = await conn.fetchrow(SQL_BALANCE_AT, ledger, account_id, at)
        assert r is not None, "an aggregate query answers one row"
        b = BalanceFields(r["dp"], r["cp"], r["dq"], r["cq"])
        assert min(b.debits_posted, b.credits_posted, b.debits_pending, b.credits_pending) >= 0
        return b

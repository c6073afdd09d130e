"""Reading what a batch names: its accounts, transfers and holds (engine/writing.py writes).

In the batch's transaction the accounts are locked in id order; a preparation (``clocks``)
reads without locks and collects the ledger's clock as each read saw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from engine import limits
from engine.rows import (
    ACCOUNT_COLS,
    HOLD_COLS,
    TRANSFER_COLS,
    account_of,
    check_read,
    hold_of,
    pg_array,
    transfer_of,
)
from ledger.account import AccountState
from ledger.transfer import Hold, StoredTransfer, Transfer

__all__ = ["SQL_DUE_HOLDS", "SQL_FOREIGN_ACCOUNTS", "SQL_LOAD_TRANSFERS", "Known", "load"]


class Known(Protocol):
    """What a previous batch of the ledger left (``engine.writing.Tip``), as ``load`` reads it."""

    accounts: dict[int, AccountState]
    transfers: dict[UUID, StoredTransfer]
    holds: dict[UUID, Hold]

# The id lists arrive as array literals (see engine.rows.pg_array). `ANY(ARRAY(SELECT unnest(..)))`
# parses the literal once (an init plan) and keeps the index scans `= ANY(array)` gets; a bare
# `= ANY(text::uuid[])` cannot be folded and would be re-parsed for every row scanned.
SQL_LOAD_TRANSFERS = f"""
SELECT {TRANSFER_COLS}, {HOLD_COLS}
FROM transfers t LEFT JOIN holds h ON h.id = t.id AND h.ledger = t.ledger AND h.ledger = $2
WHERE t.id = ANY(ARRAY(SELECT unnest($1::text::uuid[])))
"""
# The same, of one ledger only: on a Citus cluster a read by id alone visits every shard.
SQL_LOAD_LEDGER_TRANSFERS = f"""
SELECT {TRANSFER_COLS}, {HOLD_COLS}
FROM transfers t LEFT JOIN holds h ON h.id = t.id AND h.ledger = $2
WHERE t.ledger = $2 AND t.id = ANY(ARRAY(SELECT unnest($1::text::uuid[])))
"""
SQL_DUE_HOLDS = f"""
SELECT {HOLD_COLS} FROM holds h
WHERE h.ledger = $1 AND h.state = 'pending' AND h.expires_at > 0 AND h.expires_at <= $2
ORDER BY h.expires_at LIMIT $3
"""
SQL_LOCK_ACCOUNTS = f"""
SELECT {ACCOUNT_COLS} FROM accounts
WHERE ledger = $1 AND id = ANY(ARRAY(SELECT unnest($2::text::bigint[])))
ORDER BY id FOR UPDATE
"""
# A preparation's reads take no lock; each also answers the ledger's clock as of the same
# snapshot (on every row; one row of NULLs but the clock if nothing matched), so a write that
# lands between them, or after the tip they extend, is seen and the preparation given up.
SQL_PEEK_TRANSFERS = f"""
SELECT x.*, c.last_timestamp AS clock_last, c.chain_head AS clock_head
FROM ledgers c LEFT JOIN LATERAL ({SQL_LOAD_TRANSFERS}) x ON true
WHERE c.ledger = $2
"""
SQL_PEEK_LEDGER_TRANSFERS = f"""
SELECT x.*, c.last_timestamp AS clock_last, c.chain_head AS clock_head
FROM ledgers c LEFT JOIN LATERAL ({SQL_LOAD_LEDGER_TRANSFERS}) x ON true
WHERE c.ledger = $2
"""
SQL_PEEK_ACCOUNTS = f"""
SELECT a.*, c.last_timestamp AS clock_last, c.chain_head AS clock_head
FROM ledgers c LEFT JOIN LATERAL (
    SELECT {ACCOUNT_COLS} FROM accounts
    WHERE ledger = $1 AND id = ANY(ARRAY(SELECT unnest($2::text::bigint[])))
) a ON true
WHERE c.ledger = $1
"""
# Accounts named by a batch but living in another ledger: read (never written) so the batch
# can answer accounts_must_have_the_same_ledger rather than *_not_found.
SQL_FOREIGN_ACCOUNTS = f"SELECT {ACCOUNT_COLS} FROM accounts WHERE id = ANY($1::bigint[])"
# (peek, one ledger) -> the read of a batch's transfers by id
_TRANSFER_READS = {
    (False, False): SQL_LOAD_TRANSFERS,
    (True, False): SQL_PEEK_TRANSFERS,
    (False, True): SQL_LOAD_LEDGER_TRANSFERS,
    (True, True): SQL_PEEK_LEDGER_TRANSFERS,
}



async def load(
    conn: asyncpg.Connection | PoolConnectionProxy,
    ledger: int,
    batch: Sequence[Transfer],
    *,
    known: Known | None,
    due_before: int | None,
    clocks: set[tuple[int, str]] | None = None,
    one_ledger: bool = False,
) -> tuple[dict[int, AccountState], dict[UUID, StoredTransfer], dict[UUID, Hold]]:
    """Every account, transfer and hold ``batch`` names (by id, pending_id, account and the
    holds' accounts). Without ``clocks``: read in the batch's transaction, this ledger's
    accounts locked in id order. With ``known`` (a previous batch's tip): the transfers and
    holds it holds are taken from it, the rest read; accounts are all read, with the balances
    it holds. ``due_before``: also the holds overdue then. ``clocks``: read without
    locks, collecting the ledger's clock (last timestamp, chain head) as each read saw it.
    ``one_ledger``: transfers are read from this ledger only (a Citus cluster)."""
    ids = {t.id for t in batch}
    ids.update(t.pending_id for t in batch if t.pending_id is not None)
    transfers, holds = _from_known(ids, known)
    if ids:
        for r in await conn.fetch(_TRANSFER_READS[clocks is not None, one_ledger],
                                  pg_array(list(ids)), ledger):
            if clocks is not None:
                clocks.add((r["clock_last"], r["clock_head"]))
                if r["id"] is None:
                    continue  # the clock's row: nothing matched
            st = transfer_of(r)
            # a uuid collision across ledgers: prefer this ledger's row
            if st.id not in transfers or st.ledger == ledger:
                transfers[st.id] = st
            if r["h_id"] is not None:
                holds[st.id] = hold_of(r)
    if due_before is not None:
        for r in await conn.fetch(SQL_DUE_HOLDS, ledger, due_before, limits.MAX_EXPIRED_PER_RUN):
            h = hold_of(r)
            holds.setdefault(h.id, h)

    account_ids = _account_ids(batch, holds)
    accounts: dict[int, AccountState] = {}
    if account_ids or clocks is not None:  # a peek reads the clock even with no accounts
        sql = SQL_LOCK_ACCOUNTS if clocks is None else SQL_PEEK_ACCOUNTS
        for r in await conn.fetch(sql, ledger, pg_array(sorted(account_ids))):
            if clocks is not None:
                clocks.add((r["clock_last"], r["clock_head"]))
                if r[0] is None:
                    continue  # the clock's row: nothing matched
            a = _as_known(account_of(r), known)
            check_read(a)
            accounts[a.id] = a
        missing = account_ids - accounts.keys()
        if missing:
            for r in await conn.fetch(SQL_FOREIGN_ACCOUNTS, list(missing)):
                a = account_of(r)
                check_read(a)
                accounts[a.id] = a
    return accounts, transfers, holds


def _from_known(
    ids: set[UUID], known: Known | None
) -> tuple[dict[UUID, StoredTransfer], dict[UUID, Hold]]:
    """The transfers (and their holds) among ``ids`` that ``known`` holds, taken out of
    ``ids`` (what is left is read)."""
    transfers: dict[UUID, StoredTransfer] = {}
    holds: dict[UUID, Hold] = {}
    if known is not None:
        for tid in list(ids):
            st = known.transfers.get(tid)
            if st is not None:
                transfers[tid] = st
                h = known.holds.get(tid)
                if h is not None:
                    holds[tid] = h
                ids.discard(tid)
    return transfers, holds


def _account_ids(batch: Sequence[Transfer], holds: dict[UUID, Hold]) -> set[int]:
    """Every account the batch and the holds it reads name (0, no account, left out)."""
    account_ids = {t.debit_account_id for t in batch} | {t.credit_account_id for t in batch}
    for h in holds.values():
        account_ids.add(h.debit_account_id)
        account_ids.add(h.credit_account_id)
    account_ids.discard(0)
    return account_ids


def _as_known(a: AccountState, known: Known | None) -> AccountState:
    """``a`` with the balances ``known`` holds for it, if any."""
    if known is not None:
        # Balances as the previous batch left them (it may not have committed yet);
        # flags as they are now (they change without the clock).
        k = known.accounts.get(a.id)
        if k is not None:
            a.debits_posted, a.credits_posted = k.debits_posted, k.credits_posted
            a.debits_pending, a.credits_pending = k.debits_pending, k.credits_pending
    return a

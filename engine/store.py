"""PostgreSQL access: the one place that reads and writes ledger rows.

A batch is one transaction: reserve timestamps on the ledger's clock row (which also serialises
every writer of that ledger, across engine processes), load and lock what the batch touches
(accounts in id order), run the pure ``ledger.apply``, write everything back set-based with
arrays and ``unnest`` in one statement, commit. Six round trips whatever the batch size.
A ledger's clock row is created with its first account, never by a transfer: a batch of a
ledger without one (without accounts) cannot create anything, so it is answered from what it
read and writes nothing (:meth:`Store.answer_unclocked` answers many such ledgers at once).

Under load the batcher also *prepares* the next batch while the previous one is still being
written (:meth:`Store.prepare`): it reads, without locks, what the batch needs and is not
already known from the previous batch's :class:`Tip`, applies the batch to that state, and
builds the write. :meth:`Store.commit_prepared` then advances the ledger's clock only if it
still reads exactly what the preparation assumed (the previous batch's last timestamp and
chain head) and sends the prepared write. Every change to balances, holds and transfers takes
and advances the ledger's clock (batches, the expirer), so an unchanged clock proves the
balances the batch was applied to are the ones it commits on; a changed one sends the batch
down the locked path instead. Account flags change without the clock (an operator may flip
them in SQL), so a preparation always reads them afresh, after its requests arrived: a flag
change committed before a transfer was submitted is always seen, and one committing while the
batch is prepared is ordered after it (the two were concurrent).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final
from uuid import UUID

import asyncpg
import msgspec
from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

from engine import limits
from engine.db.delegated import Delegated
from engine.faults import RETRYABLE
from engine.loading import SQL_FOREIGN_ACCOUNTS, SQL_LOAD_TRANSFERS, load
from engine.rows import (
    ACCOUNT_COLS,
    TRANSFER_COLS,
    account_of,
    check_read,
    pg_array,
    state_of,
    transfer_of,
)
from ledger import audit
from ledger.account import Account, AccountState, create_accounts
from ledger.apply import BatchOutcome, apply_transfers, timestamps_needed
from ledger.status import AccountStatus
from ledger.transfer import Hold, StoredTransfer, Transfer
from ledger.types import TransferFlags, TransferState

# -- named statements --------------------------------------------------------------------------

# Reserve `$3` timestamps on the ledger's clock and lock its row for the transaction. No row,
# no answer: a ledger's clock is created with its first account (SQL_ENSURE_LEDGERS), never by
# a transfer, so a transfer naming a ledger without accounts leaves nothing behind.
SQL_RESERVE = """
UPDATE ledgers AS l SET last_timestamp = greatest($2::bigint, l.last_timestamp + 1) + $3 - 1
WHERE l.ledger = $1
RETURNING last_timestamp - $3 + 1 AS first, chain_head
"""

# A prepared batch commits only on the clock it was prepared on. The row lock this takes (or
# waits for, while the previous batch commits) serialises the ledger's writers as SQL_RESERVE.
SQL_ADVANCE = """
UPDATE ledgers SET last_timestamp = $4
WHERE ledger = $1 AND last_timestamp = $2 AND chain_head = $3
RETURNING ledger
"""
# Array parameters of numbers and UUIDs travel as array literals (text, see engine.rows.pg_array);
# only the free-text columns (user_data, hold state) use asyncpg's binary arrays.
# The batch's writes: one statement's CTEs here, a delegated function's steps on a cluster.
_WRITES = (
    ("ins", """
    INSERT INTO transfers (ledger, id, debit_account_id, credit_account_id, amount, pending_id,
                           code, flags, timeout_s, user_data, timestamp)
    SELECT $1, * FROM unnest($2::text::uuid[], $3::text::bigint[], $4::text::bigint[],
                             $5::text::bigint[], $6::text::uuid[], $7::text::int[],
                             $8::text::int[], $9::text::int[], $10::text[], $11::text::bigint[])
    {where}"""),
    ("acc", """
    UPDATE accounts a
    SET debits_posted = u.dp, credits_posted = u.cp, debits_pending = u.dq,
        credits_pending = u.cq
    FROM unnest($12::text::bigint[], $13::text::bigint[], $14::text::bigint[],
                $15::text::bigint[], $16::text::bigint[]) AS u(id, dp, cp, dq, cq)
    WHERE a.ledger = $1 AND a.id = u.id {and_}"""),
    ("hld", """
    INSERT INTO holds (ledger, id, debit_account_id, credit_account_id, amount, code,
                       expires_at, created_at, state, resolved_at)
    SELECT $1, * FROM unnest($17::text::uuid[], $18::text::bigint[], $19::text::bigint[],
                             $20::text::bigint[], $21::text::int[], $22::text::bigint[],
                             $23::text::bigint[], $24::text[], $25::text::bigint[])
    {where}
    ON CONFLICT (id, ledger) DO UPDATE
        SET state = EXCLUDED.state, resolved_at = EXCLUDED.resolved_at"""),
    ("aud", """
    INSERT INTO audit_batches (ledger, first_timestamp, last_timestamp, transfer_count,
                               prev_head, head)
    SELECT $1, $26, $27, $28, $29, $30 WHERE $28 > 0 {and_}"""),
)
_WRITE_CTES = ", ".join(f"{name} AS ({sql}\n)" for name, sql in _WRITES)
_WRITE_STEPS = tuple(sql.format(where="", and_="") for _, sql in _WRITES)
SQL_SET_HEAD = "UPDATE ledgers SET chain_head = $30 WHERE ledger = $1"
# The locked path's write, inside the batch's transaction (the clock row is already locked).
SQL_WRITE_BATCH = "WITH " + _WRITE_CTES.format(where="", and_="") + "\n" + SQL_SET_HEAD
# A prepared batch's commit: one statement, so one round trip and its own transaction. The
# clock advances only if it still reads what the preparation assumed ($32 and the chain head
# $29); every write is conditional on that, so a moved clock writes nothing (answers 0). The
# clock row is locked first (the other parts wait for `clk`): the batches' lock order.
SQL_ADVANCE_CLOCK = """
    UPDATE ledgers SET last_timestamp = $31, chain_head = $30
    WHERE ledger = $1 AND last_timestamp = $32 AND chain_head = $29"""
SQL_COMMIT_PREPARED = (
    f"WITH clk AS ({SQL_ADVANCE_CLOCK}\n    RETURNING 1\n), "
    + _WRITE_CTES.format(
        where="WHERE EXISTS (SELECT FROM clk)", and_="AND EXISTS (SELECT FROM clk)"
    )
    + "\nSELECT count(*) FROM clk"
)
# On a Citus cluster both writes run as a function on the worker owning the ledger
# (engine/db/delegated.py): one call, one worker, whatever the batch's size. The prepared
# commit's function advances the clock first and writes nothing if it had moved.
WRITE_BATCH: Final = Delegated(
    name="write_batch", sql=SQL_WRITE_BATCH, steps=(*_WRITE_STEPS, SQL_SET_HEAD))
COMMIT_PREPARED: Final = Delegated(
    name="commit_prepared", sql=SQL_COMMIT_PREPARED, guard=SQL_ADVANCE_CLOCK,
    steps=_WRITE_STEPS)
DELEGATED: Final = (WRITE_BATCH, COMMIT_PREPARED)

SQL_ACCOUNTS_BY_ID = f"SELECT {ACCOUNT_COLS} FROM accounts WHERE id = ANY($1::bigint[])"
SQL_LOCK_ACCOUNT_IDS = (
    "SELECT pg_advisory_xact_lock(x) FROM unnest($1::bigint[]) AS x ORDER BY x"
)
SQL_INSERT_ACCOUNTS = """
INSERT INTO accounts (ledger, id, kind, code, flags, holder_id, name, created_at)
SELECT * FROM unnest($1::int[], $2::bigint[], $3::text[], $4::int[], $5::int[], $6::text[],
                     $7::text[], $8::bigint[])
"""
SQL_ENSURE_LEDGERS = """
INSERT INTO ledgers (ledger) SELECT DISTINCT x FROM unnest($1::int[]) AS x
ON CONFLICT (ledger) DO NOTHING
"""
SQL_SET_FLAGS = """
UPDATE accounts SET flags = (flags | $3::int) & ~$4::int WHERE ledger = $1 AND id = $2
RETURNING flags
"""

SQL_GET_TRANSFER = f"""
SELECT {TRANSFER_COLS}, h.state FROM transfers t
LEFT JOIN holds h ON h.id = t.id AND h.ledger = t.ledger
WHERE t.id = $1 ORDER BY t.ledger LIMIT 1
"""
SQL_GET_ACCOUNT = f"SELECT {ACCOUNT_COLS}, holder_id, name FROM accounts WHERE id = $1"
SQL_LEDGER_CLOCK = "SELECT last_timestamp FROM ledgers WHERE ledger = $1"
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
SQL_SNAPSHOT = """
WITH snap AS (
    INSERT INTO balance_snapshots (ledger, account_id, timestamp, debits_posted, credits_posted,
                                   debits_pending, credits_pending)
    SELECT ledger, id, $2, debits_posted, credits_posted, debits_pending, credits_pending
    FROM accounts WHERE ledger = $1
    RETURNING 1
)
INSERT INTO snapshot_runs (ledger, timestamp, accounts) SELECT $1, $2, count(*) FROM snap
RETURNING accounts
"""
SQL_LEDGERS = "SELECT ledger FROM ledgers ORDER BY ledger"
# Which of these ledgers have a clock row (that is, accounts).
SQL_CLOCKED = "SELECT ledger FROM ledgers WHERE ledger = ANY($1::int[])"
# The expirer's one question per pass, for every ledger at once: an index range scan over the
# pending holds already due (holds_expiry, migration 0005), however many ledgers exist.
SQL_DUE_LEDGERS = """
SELECT DISTINCT ledger FROM holds
WHERE state = 'pending' AND expires_at > 0 AND expires_at <= $1
ORDER BY ledger
"""
# The same question on a Citus cluster with a worker down (the statement above then fails as
# a whole): asked of each shard on its own, the unreachable ones answering nothing, so the
# ledgers on the other workers still get their holds released. Each answer is a list.
SQL_DUE_LEDGERS_REACHABLE = """
SELECT result FROM run_command_on_placements('holds', format(
    'SELECT string_agg(DISTINCT ledger::text, '','') FROM %%s '
    'WHERE state = ''pending'' AND expires_at > 0 AND expires_at <= %s', $1::bigint))
WHERE success AND result <> ''
"""


class Tip:
    """A ledger right after a batch: its clock, its chain head, and every account, transfer and
    hold the batch read or wrote, as the batch left them. The next batch of the ledger may be
    prepared on it; it is only trusted once the clock proves nothing else happened between."""

    __slots__ = ("accounts", "head", "holds", "last", "ledger", "pending_from", "transfers")

    def __init__(
        self,
        ledger: int,
        last: int,
        head: str,
        accounts: dict[int, AccountState],
        transfers: dict[UUID, StoredTransfer],
        holds: dict[UUID, Hold],
        *,
        pending_from: tuple[int, str] | None = None,
    ) -> None:
        self.ledger = ledger
        self.last = last  # the last engine timestamp the batch reserved
        self.head = head
        self.accounts = accounts
        self.transfers = transfers
        self.holds = holds
        # for a prepared batch maybe not committed yet: the clock (last, head) it extends
        self.pending_from = pending_from


class Prepared:
    """A batch applied ahead of its commit: its outcome, its write, and what it assumed."""

    __slots__ = ("after", "after_head", "args", "outcome", "tip")

    def __init__(
        self,
        *,
        outcome: BatchOutcome,
        tip: Tip,
        after: int,
        after_head: str,
        args: list[object] | None,
    ) -> None:
        self.outcome = outcome
        self.tip = tip
        self.after = after  # the clock's last timestamp the batch was applied after...
        self.after_head = after_head  # ...and the chain head with it
        self.args = args  # SQL_WRITE_BATCH's parameters; None when it writes nothing


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


def now_ns() -> int:
    """Wall clock in ns: the engine clock never runs behind it (but may run ahead of it)."""
    return time.time_ns()


class Store:
    """The ledger's PostgreSQL store over an asyncpg pool.

    ``distributed``: the database is a Citus coordinator (engine/db/distribute.py). A batch
    then reads only its own ledger's transfers and writes through the delegated functions,
    so its transaction is on the one worker owning the ledger; everything else is the same
    statements. A read of transfer ids across ledgers would visit every shard on every
    worker for every batch, and stop every ledger's batches while any worker is down: on a
    cluster a transfer id is therefore checked within its ledger (the same id sent to another
    ledger is a transfer of that ledger, not ``exists_with_different_ledger``; a
    ``pending_id`` of another ledger's hold is ``pending_transfer_not_found``). Accounts
    named from another ledger are still found (``accounts_must_have_the_same_ledger``): only
    a request that names one pays for that read."""

    def __init__(self, pool: asyncpg.Pool, *, distributed: bool = False) -> None:
        self.pool = pool
        self.distributed = distributed
        self._write_sql = WRITE_BATCH.call if distributed else SQL_WRITE_BATCH
        self._commit_sql = COMMIT_PREPARED.call if distributed else SQL_COMMIT_PREPARED

    def _acquire(self) -> PoolAcquireContext:
        # Every wait is bounded: a pool exhausted for this long answers 503 (or, for a batch,
        # counts as a retryable fault) instead of queueing without end.
        return self.pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S)

    # -- accounts ------------------------------------------------------------------------------

    async def create_accounts(self, batch: Sequence[Account]) -> list[AccountStatus]:
        """Create accounts in order; one transaction, set-based."""
        ids = sorted({a.id for a in batch if a.id})
        async with self._acquire() as conn, conn.transaction():
            # Account ids are unique across ledgers; serialise creators of the same ids.
            await conn.execute(SQL_LOCK_ACCOUNT_IDS, ids)
            existing = {r["id"]: account_of(r) for r in await conn.fetch(SQL_ACCOUNTS_BY_ID, ids)}
            statuses, created = create_accounts(list(batch), existing)
            if created:
                meta = {a.id: a for a in batch}
                ts = now_ns()
                await conn.execute(SQL_ENSURE_LEDGERS, [a.ledger for a in created])
                await conn.execute(
                    SQL_INSERT_ACCOUNTS,
                    [a.ledger for a in created],
                    [a.id for a in created],
                    [str(a.kind) for a in created],
                    [a.code for a in created],
                    [a.flags for a in created],
                    [meta[a.id].holder_id for a in created],
                    [meta[a.id].name for a in created],
                    [ts] * len(created),
                )
        return statuses

    async def set_account_flags(
        self, ledger: int, account_id: int, *, add: int, remove: int
    ) -> int | None:
        """Set and clear account flag bits at once; returns the new flags, None if unknown."""
        async with self._acquire() as conn:
            flags: int | None = await conn.fetchval(SQL_SET_FLAGS, ledger, account_id, add, remove)
        return flags

    async def get_account(self, account_id: int) -> AccountRecord | None:
        """The live account, or None."""
        async with self._acquire() as conn:
            r = await conn.fetchrow(SQL_GET_ACCOUNT, account_id)
        if r is None:
            return None
        a = account_of(r)
        check_read(a)
        return AccountRecord(state=a, holder_id=r["holder_id"], name=r["name"])

    # -- the batch -----------------------------------------------------------------------------

    async def post_batch(
        self,
        ledger: int,
        batch: Sequence[Transfer],
        *,
        request_ends: Sequence[int] = (),
        expire_due: bool = False,
        on_write: Callable[[], None] | None = None,
    ) -> BatchOutcome:
        """Apply a batch of one ledger's transfers in one transaction.

        With ``expire_due`` the batch also releases up to ``MAX_EXPIRED_PER_RUN`` holds whose
        timeout has passed (the expirer runs an empty batch this way). ``on_write`` is called
        once the batch's write has been sent, while the server executes it (not at all when
        the batch writes nothing); an exception from it fails the batch after the write ends.
        """
        outcome, _ = await self.post_locked(
            ledger, batch, request_ends=request_ends, expire_due=expire_due, on_write=on_write
        )
        return outcome

    async def post_locked(
        self,
        ledger: int,
        batch: Sequence[Transfer],
        *,
        request_ends: Sequence[int] = (),
        expire_due: bool = False,
        on_write: Callable[[], None] | None = None,
    ) -> tuple[BatchOutcome, Tip | None]:
        """:meth:`post_batch`, also returning the ledger's :class:`Tip` after the batch; None
        for a ledger without a clock (no accounts): its batch was answered, nothing written."""
        async with self._acquire() as conn, conn.transaction():
            return await self._post_tip(conn, ledger, batch, request_ends, expire_due, on_write)

    async def _post_tip(
        self,
        conn: asyncpg.Connection | PoolConnectionProxy,
        ledger: int,
        batch: Sequence[Transfer],
        request_ends: Sequence[int],
        expire_due: bool,
        on_write: Callable[[], None] | None,
    ) -> tuple[BatchOutcome, Tip | None]:
        slots = timestamps_needed(len(batch))
        clock = await conn.fetchrow(SQL_RESERVE, ledger, now_ns(), slots)
        if clock is None:
            # No clock, so no accounts: every transfer fails, nothing is written. Should the
            # ledger's first accounts commit between the two reads, the batch would create
            # something: the clock exists by then (same transaction as the accounts), so it
            # is posted the ordinary way.
            accounts, transfers, _ = await load(
                conn, ledger, batch, known=None, due_before=None, one_ledger=self.distributed
            )
            outcome = _answer_unclocked(ledger, batch, request_ends, accounts, transfers)
            if outcome is not None:
                return outcome, None
            clock = await conn.fetchrow(SQL_RESERVE, ledger, now_ns(), slots)
            assert clock is not None, f"ledger {ledger}: accounts without a clock row"
        first: int = clock["first"]
        prev_head: str = clock["chain_head"]
        accounts, transfers, holds = await load(
            conn, ledger, batch, known=None, due_before=first if expire_due else None,
            one_ledger=self.distributed,
        )
        outcome, args, head = _apply(
            ledger, batch, request_ends, accounts, transfers, holds, first, prev_head
        )
        tip = Tip(ledger, first + slots - 1, head, accounts, transfers, holds)
        if args is not None:
            await _send(conn, self._write_sql, args, on_write)
        return outcome, tip

    # -- the next batch, prepared while the previous one commits -------------------------------

    async def prepare(
        self,
        ledger: int,
        batch: Sequence[Transfer],
        *,
        request_ends: Sequence[int] = (),
        tip: Tip | None = None,
    ) -> Prepared | None:
        """Apply ``batch`` to the state ``tip`` leaves (the previous batch of this ledger, maybe
        still being written), or else to the ledger's committed state, without taking a lock.

        Returns None when the ledger has no clock yet, or its reads show that the ledger moved
        (another writer) while they ran or since ``tip``: the batch then takes the locked path.
        Nothing is written: the result is only good for :meth:`commit_prepared`, which checks
        the assumption it rests on once more, under the clock's lock.
        """
        seen: set[tuple[int, str]] = set()
        async with self._acquire() as conn:
            accounts, transfers, holds = await load(
                conn, ledger, batch, known=tip, due_before=None, clocks=seen,
                one_ledger=self.distributed,
            )
        if tip is None:
            if len(seen) != 1:
                return None  # no clock yet, or a write landed between the two reads
            ((last, prev_head),) = seen
        else:
            assert tip.ledger == ledger, (tip.ledger, ledger)
            expected = {(tip.last, tip.head)}
            if tip.pending_from is not None:
                expected.add(tip.pending_from)  # the tip's own batch not committed yet
            if not seen <= expected:
                return None  # the ledger moved on without the tip: prepare nothing on it
            last, prev_head = tip.last, tip.head
        slots = timestamps_needed(len(batch))
        first = max(now_ns(), last + 1)
        outcome, args, head = _apply(
            ledger, batch, request_ends, accounts, transfers, holds, first, prev_head
        )
        return Prepared(
            outcome=outcome,
            tip=Tip(
                ledger, first + slots - 1, head, accounts, transfers, holds,
                pending_from=(last, prev_head),
            ),
            after=last,
            after_head=prev_head,
            args=args,
        )

    async def commit_prepared(
        self, p: Prepared, *, on_write: Callable[[], None] | None = None
    ) -> bool:
        """Commit a prepared batch if the ledger is still exactly where it was prepared;
        False (nothing written) if anything changed it in between."""
        async with self._acquire() as conn:
            if p.args is None:  # nothing to write: the clock still moves (it reserved stamps)
                advanced = await conn.fetchval(
                    SQL_ADVANCE, p.tip.ledger, p.after, p.after_head, p.tip.last
                )
                return advanced is not None
            n = await _send(conn, self._commit_sql, [*p.args, p.tip.last, p.after], on_write)
        assert n in (0, 1), n
        return n == 1

    # -- reads ---------------------------------------------------------------------------------

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

    async def ledgers_with_due_holds(self, at: int) -> list[int]:
        """The ledgers that have a pending hold past its timeout at ``at``: one indexed
        statement for all ledgers (the expirer asks it every second). On a cluster with a
        worker down: those of the reachable workers."""
        async with self._acquire() as conn:
            try:
                return [r["ledger"] for r in await conn.fetch(SQL_DUE_LEDGERS, at)]
            except RETRYABLE:
                if not self.distributed:
                    raise
                rows = await conn.fetch(SQL_DUE_LEDGERS_REACHABLE, at)
        return sorted({int(x) for r in rows for x in r["result"].split(",")})

    async def clocked(self, ledgers: Iterable[int]) -> set[int]:
        """Which of ``ledgers`` have a clock row, i.e. accounts (rows are never deleted)."""
        async with self._acquire() as conn:
            return {r["ledger"] for r in await conn.fetch(SQL_CLOCKED, list(ledgers))}

    async def answer_unclocked(
        self, groups: Sequence[tuple[int, Sequence[Transfer], Sequence[int]]]
    ) -> list[BatchOutcome | None]:
        """Answer batches of ledgers that have no clock row (no accounts) without a
        transaction: two reads for all of them (transfers by id and accounts by id, across
        ledgers, so ``exists_with_different_ledger`` and ``accounts_must_have_the_same_ledger``
        answer as they would anywhere), nothing written. Each of ``groups`` is (ledger,
        transfers, request ends); its answer is None if it would create something after all
        (the ledger's first accounts committed meanwhile): post it the ordinary way."""
        ids = {t.id for _, batch, _ in groups for t in batch}
        ids.update(t.pending_id for _, batch, _ in groups for t in batch if t.pending_id)
        aids = {a for _, batch, _ in groups for t in batch
                for a in (t.debit_account_id, t.credit_account_id)}
        aids.discard(0)
        async with self._acquire() as conn:
            # ledger 0 never exists: no hold joins (a clockless ledger has none of its own)
            # ids across ledgers; on a cluster a transfer id names a transfer of its own ledger
            # only (Store's docstring), and a ledger without a clock has none
            rows = (await conn.fetch(SQL_LOAD_TRANSFERS, pg_array(list(ids)), 0)
                    if ids and not self.distributed else [])
            arows = await conn.fetch(SQL_FOREIGN_ACCOUNTS, list(aids)) if aids else []
        stored: dict[UUID, StoredTransfer] = {}
        for r in rows:
            st = transfer_of(r)
            stored.setdefault(st.id, st)
        found = {r[0]: r for r in arows}
        out: list[BatchOutcome | None] = []
        for ledger, batch, ends in groups:
            # each group gets its own account states (one that would create something mutates
            # them) and transfers: only those it names, so the work is linear in the batch
            accounts = {
                aid: account_of(found[aid])
                for t in batch
                for aid in (t.debit_account_id, t.credit_account_id)
                if aid in found
            }
            named = {k: stored[k] for t in batch for k in (t.id, t.pending_id) if k in stored}
            out.append(_answer_unclocked(ledger, batch, ends, accounts, named))
        return out

    async def ledgers(self) -> list[int]:
        """Every ledger that has a clock row (that is, accounts)."""
        async with self._acquire() as conn:
            return [r["ledger"] for r in await conn.fetch(SQL_LEDGERS)]

    # -- snapshots -----------------------------------------------------------------------------

    async def snapshot(self, ledger: int) -> tuple[int, int]:
        """Record every account's balance fields at a fresh timestamp on the ledger's clock.

        Taken under the ledger's clock lock, so it is exactly the state between two batches.
        Returns (timestamp, accounts recorded).
        """
        async with self._acquire() as conn, conn.transaction():
            clock = await conn.fetchrow(SQL_RESERVE, ledger, now_ns(), 1)
            if clock is None:
                raise LookupError(f"ledger {ledger} has no accounts")
            ts: int = clock["first"]
            count: int = await conn.fetchval(SQL_SNAPSHOT, ledger, ts)
        return ts, count


def _apply(
    ledger: int,
    batch: Sequence[Transfer],
    request_ends: Sequence[int],
    accounts: dict[int, AccountState],
    transfers: dict[UUID, StoredTransfer],
    holds: dict[UUID, Hold],
    first: int,
    prev_head: str,
) -> tuple[BatchOutcome, list[object] | None, str]:
    """Apply a loaded batch (the dicts are updated in place); its outcome, its write's
    parameters (None if it changes nothing) and the chain head after it."""
    before = _totals(accounts.values())
    outcome = apply_transfers(
        batch,
        accounts=accounts,
        transfers=transfers,
        holds=holds,
        first_timestamp=first,
        request_ends=request_ends,
    )
    # Double entry, checked apart from the rules that should guarantee it: the batch moves
    # as much onto debits as onto credits (untouched accounts add nothing to the difference).
    _check_zero_sum(before, _totals(accounts.values()), ledger)
    args, head = _write_args(ledger, outcome, accounts, prev_head)
    return outcome, args, head


def _answer_unclocked(
    ledger: int,
    batch: Sequence[Transfer],
    request_ends: Sequence[int],
    accounts: dict[int, AccountState],
    transfers: dict[UUID, StoredTransfer],
) -> BatchOutcome | None:
    """The answers of a batch of a ledger without a clock row: the same rules as any batch,
    applied to what was read (other ledgers' accounts and transfers). Nothing can be created
    where no account exists; None if something would be after all (accounts appeared)."""
    outcome = apply_transfers(
        batch,
        accounts=accounts,
        transfers=transfers,
        holds={},
        first_timestamp=now_ns(),
        request_ends=request_ends,
    )
    if outcome.created or outcome.holds_changed:
        return None
    return outcome


def _write_args(
    ledger: int, outcome: BatchOutcome, accounts: dict[int, AccountState], prev_head: str
) -> tuple[list[object] | None, str]:
    """SQL_WRITE_BATCH's parameters for an applied batch (None if it changed nothing) and the
    chain head after it."""
    if not outcome.created and not outcome.holds_changed:
        return None, prev_head
    c = outcome.created
    # One pass builds the audit rows; the insert's columns are the same tuples transposed.
    rows = [_astuple(t) for t in c]
    head = audit.extend(prev_head, rows) if c else prev_head
    cols = _columns(rows, 11)  # the audit row's order; [1] is the ledger, [9] user_data
    tcols = [pg_array(col) if i not in (1, 9) else "" for i, col in enumerate(cols)]
    acols = [
        pg_array(col)
        for col in _columns(
            [
                (a.id, a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending)
                for a in (accounts[aid] for aid in outcome.touched_accounts)
            ],
            5,
        )
    ]
    hc = outcome.holds_changed
    args: list[object] = [
        ledger,
        tcols[0], tcols[2], tcols[3], tcols[4], tcols[5], tcols[6], tcols[7], tcols[8],
        cols[9],
        tcols[10],
        *acols,
        pg_array([h.id for h in hc]),
        pg_array([h.debit_account_id for h in hc]),
        pg_array([h.credit_account_id for h in hc]),
        pg_array([h.amount for h in hc]),
        pg_array([h.code for h in hc]),
        pg_array([h.expires_at for h in hc]),
        pg_array([h.created_at for h in hc]),
        [h.state.value for h in hc],
        pg_array([h.resolved_at for h in hc]),
        c[0].timestamp if c else 0,
        c[-1].timestamp if c else 0,
        len(c),
        prev_head,
        head,
    ]
    return args, head


async def _send(
    conn: asyncpg.Connection | PoolConnectionProxy,
    sql: str,
    args: list[object],
    on_write: Callable[[], None] | None,
) -> object:
    """Run ``sql`` (its first column of its first row is answered); ``on_write`` runs once it
    has been sent, while the server executes it."""
    query = conn.fetchval(sql, *args)
    if on_write is None:
        return await query
    sent = asyncio.ensure_future(query)
    try:
        await asyncio.sleep(0)  # the statement goes out...
        on_write()  # ...and the caller's other work runs while the server executes it
    finally:
        result = await sent
    return result


def _totals(accounts: Iterable[AccountState]) -> tuple[int, int, int, int]:
    """Sums of the four balance fields over ``accounts``."""
    dp = cp = dq = cq = 0
    for a in accounts:
        dp += a.debits_posted
        cp += a.credits_posted
        dq += a.debits_pending
        cq += a.credits_pending
    return dp, cp, dq, cq


def _check_zero_sum(
    before: tuple[int, int, int, int], after: tuple[int, int, int, int], ledger: int
) -> None:
    """Double entry: a batch moves as much onto debits as onto credits, posted and pending."""
    d = [x - y for x, y in zip(after, before, strict=True)]
    assert d[0] == d[1] and d[2] == d[3], f"ledger {ledger}: batch breaks double entry {d}"


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> list[Sequence[object]]:
    """Transpose rows into ``width`` columns (empty for no rows)."""
    if not rows:
        return [() for _ in range(width)]
    return list(zip(*rows, strict=True))


# A stored transfer's fields are in the audit row's order: ``astuple`` is its audit row.
_astuple: Final = msgspec.structs.astuple

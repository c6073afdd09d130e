"""PostgreSQL access to the ledger: :class:`Store` creates accounts, posts batches and takes
snapshots (what a batch reads is in ``engine.loading``, how it is written in
``engine.writing``, the HTTP API's reads in ``engine.lookups``).

A batch is one transaction: reserve timestamps on the ledger's clock row (which also serialises
every writer of that ledger, across engine processes), load and lock what the batch touches
(accounts in id order, ``engine.loading``), run the pure ``ledger.apply``, write everything
back set-based with arrays and ``unnest`` in one statement (``engine.writing``), commit. Six
round trips whatever the batch size.
A ledger's clock row is created with its first account, never by a transfer: a batch of a
ledger without one (without accounts) cannot create anything, so it is answered from what it
read and writes nothing (:meth:`Store.answer_unclocked` answers many such ledgers at once).

Under load the batcher also *prepares* the next batch while the previous one is still being
written (:meth:`Store.prepare`): it reads, without locks, what the batch needs and is not
already known from the previous batch's :class:`~engine.writing.Tip`, applies the batch to that
state, and builds the write. :meth:`Store.commit_prepared` then advances the ledger's clock
only if it still reads exactly what the preparation assumed (the previous batch's last
timestamp and chain head) and sends the prepared write. Every change to balances, holds and
transfers takes and advances the ledger's clock (batches, the expirer), so an unchanged clock
proves the balances the batch was applied to are the ones it commits on; a changed one sends
the batch down the locked path instead. Account flags change without the clock (an operator may
flip them in SQL), so a preparation always reads them afresh, after its requests arrived: a
flag change committed before a transfer was submitted is always seen, and one committing while
the batch is prepared is ordered after it (the two were concurrent).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from engine.faults import RETRYABLE
from engine.loading import SQL_FOREIGN_ACCOUNTS, SQL_LOAD_TRANSFERS, load
from engine.lookups import Lookups
from engine.rows import ACCOUNT_COLS, account_of, pg_array, transfer_of
from engine.writing import (
    COMMIT_PREPARED,
    SQL_COMMIT_PREPARED,
    SQL_WRITE_BATCH,
    WRITE_BATCH,
    Prepared,
    Tip,
    apply_loaded,
    send,
)
from ledger.account import Account, AccountState, create_accounts
from ledger.apply import BatchOutcome, apply_transfers, timestamps_needed
from ledger.status import AccountStatus
from ledger.transfer import StoredTransfer, Transfer

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


def now_ns() -> int:
    """Wall clock in ns: the engine clock never runs behind it (but may run ahead of it)."""
    return time.time_ns()


class Store(Lookups):
    """The ledger's PostgreSQL store over an asyncpg pool: accounts, batches, snapshots, and
    (from :class:`~engine.lookups.Lookups`) the reads the HTTP API answers with.

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
        super().__init__(pool)
        self.distributed = distributed
        self._write_sql = WRITE_BATCH.call if distributed else SQL_WRITE_BATCH
        self._commit_sql = COMMIT_PREPARED.call if distributed else SQL_COMMIT_PREPARED

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
        outcome, args, head = apply_loaded(
            ledger, batch, request_ends, accounts, transfers, holds, first, prev_head
        )
        tip = Tip(ledger, first + slots - 1, head, accounts, transfers, holds)
        if args is not None:
            await send(conn, self._write_sql, args, on_write)
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
        outcome, args, head = apply_loaded(
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
            n = await send(conn, self._commit_sql, [*p.args, p.tip.last, p.after], on_write)
        assert n in (0, 1), n
        return n == 1

    # -- what the batcher and the expirer ask ------------------------------------------------

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

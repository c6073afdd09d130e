"""A batch after its reads: applied, its write built and sent, and what it leaves behind.

``engine.store`` owns the transaction, the ledger's clock and the reads (``engine.loading``);
this module is the part in between. :func:`apply_loaded` runs the pure ``ledger.apply`` on
the loaded state, checks double entry apart from the rules that should guarantee it, and
builds the parameters of one set-based statement (arrays and ``unnest``: transfers, balances,
holds and the audit chain at once), written inside the batch's transaction
(:data:`SQL_WRITE_BATCH`) or, for a prepared batch, as its own (:data:`SQL_COMMIT_PREPARED`);
:func:`send` runs it, letting the caller work meanwhile. A batch leaves a :class:`Tip` the
next one may be prepared on, or, applied ahead of its commit, a :class:`Prepared`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Final
from uuid import UUID

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from engine.db.delegated import Delegated
from engine.rows import pg_array
from ledger import audit
from ledger.account import AccountState
from ledger.apply import BatchOutcome, apply_transfers
from ledger.transfer import Hold, StoredTransfer, Transfer

# -- named statements --------------------------------------------------------------------------

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


def apply_loaded(
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


async def send(
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

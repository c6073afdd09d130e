"""Reversals: undoing what an operation posted, exactly once however the messages race.

A reversal is remembered in ``reversals`` before anything else happens, and every original
re-reads that memory after it posted (:func:`finish`): whichever of the two comes second sees
the other, and both undo with the same derived transfer ids, so an original and its reversal
racing on two connections (or two processes) always net to zero. :func:`withdraw` takes back a
request the gateway gave up on (answered 96) the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Final
from uuid import UUID

import asyncpg

from engine import limits
from engine.batcher import Overloaded, Unavailable
from engine.campus.accounts import ALL_PARTS, CASH_PART, SUBSIDY_PART, part_id, reversal_id
from engine.campus.model import Outcome, PaymentResult, PurseBalances, Terminal
from engine.campus.posting import chain, outcome_of
from engine.campus.reads import Part
from engine.campus.shared import Shared, connection
from engine.faults import RETRYABLE
from ledger.transfer import Transfer
from ledger.types import TransferCode, TransferFlag, TransferFlags

log = logging.getLogger(__name__)

_PENDING: Final = int(TransferFlags.PENDING)
_VOID: Final = int(TransferFlags.VOID_PENDING)

SQL_REMEMBER_REVERSAL = """
INSERT INTO reversals (ledger, original_key, key, terminal_id, created_at)
VALUES ($1, $2, $3, $4, $5) ON CONFLICT (ledger, original_key) DO NOTHING
"""


async def reverse(s: Shared, term: Terminal, original_key: UUID, key: UUID) -> PaymentResult:
    """Remember the reversal of ``original_key``, then undo what it posted (see the module)."""
    async with connection(s.engine) as conn:
        await conn.execute(SQL_REMEMBER_REVERSAL, term.ledger, original_key, key,
                           term.terminal_id, time.time_ns())
    ts = await undo(s, term.ledger, original_key)
    return PaymentResult(Outcome.APPROVED, timestamp=ts)


async def withdraw(s: Shared, ledger: int, key: UUID, hold_key: UUID | None) -> bool:
    """Take back what the operation ``key`` posted (and release the hold ``hold_key`` of a
    completion); True when nothing is left to take back, False when that could not be
    established yet (the caller tries again). Never raises for database trouble."""
    ids = [part_id(key, p) for p in ALL_PARTS]
    if hold_key is not None:
        ids += [part_id(hold_key, p) for p in (SUBSIDY_PART, CASH_PART)]
    try:
        done, _ = await _undo_parts(s, ledger, key, ids)
    except Overloaded:
        return False
    except (Unavailable, *RETRYABLE, asyncpg.PostgresError) as e:
        log.warning("campus: could not take back %s yet: %s", key, e)
        return False
    return done


async def finish(
    s: Shared,
    ledger: int,
    key: UUID,
    outcome: Outcome,
    timestamp: int | None,
    *,
    purses: tuple[int, int] | None,
    room: int | None = None,
) -> PaymentResult:
    """The answer of an operation: the balances after it. If a reversal of it was remembered
    while it ran, it is undone now (the reversal may have looked before this posted)."""
    ids = [*(purses or ()), *((room,) if room is not None else ())]
    available, reversed_ = await s.reads.after(ledger, key, ids)
    if outcome is Outcome.APPROVED and reversed_:
        await undo(s, ledger, key)
        available, _ = await s.reads.after(ledger, key, ids)
    return PaymentResult(
        outcome,
        purses=(
            PurseBalances(cash=available.get(purses[0], 0), subsidy=available.get(purses[1], 0))
            if purses is not None
            else None
        ),
        room_balance=available.get(room) if room is not None else None,
        timestamp=timestamp,
    )


async def undo(s: Shared, ledger: int, original_key: UUID) -> int | None:
    """Post the undo of every transfer the operation ``original_key`` posted (once: the
    ids are derived); returns the first undo's timestamp, if anything was undone."""
    ids = [part_id(original_key, p) for p in ALL_PARTS]
    return (await _undo_parts(s, ledger, original_key, ids))[1]


async def _undo_parts(
    s: Shared, ledger: int, label: UUID, ids: Sequence[UUID]
) -> tuple[bool, int | None]:
    """Undo those of the transfers ``ids`` that exist: a pending hold is voided, anything
    else posted is paid back; one linked chain, with derived ids (an undo already posted is
    read, not posted again). Returns (nothing is left to undo, the first undo's timestamp);
    ``label`` names the operation in the log."""
    undo_ids = {reversal_id(i): i for i in ids}
    for _ in range(limits.UNDO_ATTEMPTS):
        got = (await s.reads.parts(ledger, [*ids, *undo_ids])).parts
        undone = {undo_ids[p.id]: p.timestamp for p in got if p.id in undo_ids}
        parts = [p for p in got if p.id not in undo_ids]
        stamps = [undone[p.id] for p in parts if p.id in undone]
        transfers = _undo_transfers(ledger, parts, undone)
        if not transfers:
            return True, min(stamps, default=None)
        try:
            results = await s.engine.batcher.submit(chain(transfers))
        finally:  # spending given back no longer counts: today's sum is read again
            for p in parts:
                s.spending.drop(ledger, p.debit_account_id)
        outcome, ts = outcome_of(results)
        if outcome is Outcome.APPROVED:
            return True, min([*stamps, *([ts] if ts else [])], default=None)
        # a completion may have settled the hold between our read and our void: re-read
        log.warning("campus: undo of %s failed (%s); retrying", label,
                    [r.status.value for r in results])
    log.error("campus: could not undo %s", label)
    return False, None


def _undo_transfers(ledger: int, parts: Sequence[Part], undone: dict[UUID, int]) -> list[Transfer]:
    """What undoes ``parts`` (``undone``: those undone already): a hold still pending is
    voided, a settled or voided hold is left alone, a posting is paid back."""
    transfers: list[Transfer] = []
    for p in parts:
        if p.flags & _PENDING:
            if p.state == "pending":
                transfers.append(Transfer(id=reversal_id(p.id), ledger=ledger, pending_id=p.id,
                                          flags=(TransferFlag.VOID_PENDING,)))
        elif not p.flags & _VOID and p.id not in undone:
            # money back, even out of a room purse already burnt down: it was never due
            transfers.append(Transfer(
                id=reversal_id(p.id), ledger=ledger,
                debit_account_id=p.credit_account_id, credit_account_id=p.debit_account_id,
                amount=p.amount, code=TransferCode.REVERSAL, flags=(TransferFlag.FORCE,),
                user_data=str(p.id)))
    return transfers

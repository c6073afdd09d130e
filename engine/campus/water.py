"""Hot water: completing a shower's hold (payments.spend with ``hold`` placed it).

A completion gathers the hold's transfers, its own (a retransmission) and the reversal memory
of both in one shared read, decides (pure: which hold, whether it can still be settled, how the
amount splits over its parts, the subsidy part first), posts the settlement as one linked
chain and finishes (reversals.finish).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final
from uuid import UUID

from engine.campus.accounts import CASH_PART, SUBSIDY_PART, part_id
from engine.campus.model import Outcome, PaymentResult, Terminal
from engine.campus.posting import HOLD_KINDS, chain, outcome_of
from engine.campus.reads import Part
from engine.campus.reversals import finish
from engine.campus.shared import Shared
from ledger.transfer import Transfer
from ledger.types import TransferFlag, TransferFlags

_PENDING: Final = int(TransferFlags.PENDING)
_POST: Final = int(TransferFlags.POST_PENDING)


async def complete(
    s: Shared, term: Terminal, hold_key: UUID, amount: int, key: UUID, card_no: str | None
) -> PaymentResult:
    """Settle the hold ``hold_key`` for ``amount``, the rest released (0: all released)."""
    if term.kind not in HOLD_KINDS:
        return PaymentResult(Outcome.INVALID_TRANSACTION)
    if not 0 <= amount <= s.max_amount:  # 0 releases the whole hold
        return PaymentResult(Outcome.INVALID_AMOUNT)
    held_ids = {part_id(hold_key, p): p for p in (SUBSIDY_PART, CASH_PART)}
    done_ids = [part_id(key, p) for p in (SUBSIDY_PART, CASH_PART)]
    got = await s.reads.parts(term.ledger, [*held_ids, *done_ids], [hold_key, key])
    parts, rev = got.parts, got.reversed
    holds = [p for p in parts if p.id in held_ids and p.flags & _PENDING]
    done = [p for p in parts if p.id in done_ids]
    if not holds:
        if hold_key in rev and not done:  # the hold was reversed before it arrived
            return PaymentResult(Outcome.APPROVED)
        return PaymentResult(Outcome.ORIGINAL_NOT_FOUND)
    if any(h.credit_account_id != term.account_id for h in holds):
        return PaymentResult(Outcome.ORIGINAL_NOT_FOUND)  # not this terminal's hold
    purses = holds[0].purses
    if card_no is not None:
        ref = await s.reads.card_ref(term.ledger, card_no)
        if ref is None:
            return PaymentResult(Outcome.INVALID_CARD)
        if purses != (ref.purse_id, ref.subsidy_id):
            return PaymentResult(Outcome.INVALID_TRANSACTION)
    if done:  # a retransmission
        outcome, ts = _completed_again(done, holds, amount)
        return await finish(s, term.ledger, key, outcome, ts, purses=purses)
    if key in rev:  # the completion was reversed before it arrived
        return await finish(s, term.ledger, key, Outcome.APPROVED, None, purses=purses)
    refusal = _settle_refusal(holds, amount)
    if refusal is not None:
        return PaymentResult(refusal)
    holds.sort(key=lambda h: held_ids[h.id] != SUBSIDY_PART)  # settle the subsidy part first
    transfers = _settlement(term.ledger, key, holds, held_ids, amount)
    try:
        results = await s.engine.batcher.submit(chain(transfers))
    finally:  # the hold stops counting, its post counts: today's spending is read again
        for h in holds:
            s.spending.drop(term.ledger, h.debit_account_id)
    outcome, ts = outcome_of(results)
    return await finish(s, term.ledger, key, outcome, ts, purses=purses)


def _completed_again(
    done: Sequence[Part], holds: Sequence[Part], amount: int
) -> tuple[Outcome, int | None]:
    """A retransmitted completion: APPROVED when the first attempt settled these holds for
    ``amount``, else DUPLICATE_DIFFERENT."""
    posted = sum(p.amount for p in done if p.flags & _POST)
    pids = {p.pending_id for p in done}
    if posted == amount and pids <= {h.id for h in holds}:
        return Outcome.APPROVED, done[0].timestamp
    return Outcome.DUPLICATE_DIFFERENT, None


def _settle_refusal(holds: Sequence[Part], amount: int) -> Outcome | None:
    """Why the holds cannot be settled for ``amount`` (None: they can)."""
    if any(h.state == "expired" for h in holds):
        return Outcome.ORIGINAL_NOT_FOUND
    if any(h.state != "pending" for h in holds):
        return Outcome.INVALID_TRANSACTION  # settled or released by another completion
    if amount > sum(h.amount for h in holds):
        return Outcome.INVALID_AMOUNT
    return None


def _settlement(
    ledger: int, key: UUID, holds: Sequence[Part], held_ids: dict[UUID, str], amount: int
) -> list[Transfer]:
    """Post ``amount`` from the holds in their order and void the rest, one transfer per hold
    part (id: the completion's ``key`` and the part's name)."""
    rest = amount
    transfers = []
    for h in holds:
        take = min(rest, h.amount)
        rest -= take
        # post_pending with amount 0 would mean "the full hold": a zero part is a void
        transfers.append(
            Transfer(id=part_id(key, held_ids[h.id]), ledger=ledger, pending_id=h.id,
                     amount=take, flags=(TransferFlag.POST_PENDING,))
            if take
            else Transfer(id=part_id(key, held_ids[h.id]), ledger=ledger,
                          pending_id=h.id, flags=(TransferFlag.VOID_PENDING,))
        )
    return transfers

"""Card payments at a terminal: a purchase (meal or shop, or its offline advice), a hot-water
hold, and a balance inquiry.

A payment gathers (the card's holder and purses, then under the holder's lock its state,
today's spending and whether it exists or was reversed, all in shared statements), decides
(posting.py: the card's state, the PIN, the daily limit, the split across the purses), posts
(one linked chain through the batcher) and finishes (reversals.finish: the balances after,
undoing it if a reversal arrived meanwhile).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final
from uuid import UUID

from engine import limits
from engine.campus.accounts import CASH_PART, SUBSIDY_PART, part_id
from engine.campus.model import Outcome, PaymentResult, PurseBalances, Terminal
from engine.campus.posting import (
    HOLD_KINDS,
    INQUIRY_KINDS,
    PURCHASE_KINDS,
    answer_again,
    card_refusal,
    outcome_of,
    showable,
    split_subsidy_first,
)
from engine.campus.reads import CardRef
from engine.campus.reversals import finish
from engine.campus.shared import Shared
from ledger.transfer import Transfer
from ledger.types import NIL_UUID, TransferCode, TransferFlag, TransferFlags

_PENDING: Final = int(TransferFlags.PENDING)
_FORCE: Final = int(TransferFlags.FORCE)


async def spend(
    s: Shared,
    term: Terminal,
    card_no: str,
    amount: int,
    key: UUID,
    pin_block: bytes | None,
    *,
    force: bool,
    hold: bool,
    attempts: int = limits.PAYMENT_ATTEMPTS,
) -> PaymentResult:
    """A purchase (``force``: its offline advice) or, with ``hold``, a hot-water hold;
    ``attempts``: how often in all it is decided, should other processes keep spending from
    the purses between its read and its posting."""
    if term.kind not in (HOLD_KINDS if hold else PURCHASE_KINDS):
        return PaymentResult(Outcome.INVALID_TRANSACTION)
    if not s.amount_ok(amount):
        return PaymentResult(Outcome.INVALID_AMOUNT)
    ref = await s.reads.card_ref(term.ledger, card_no)
    if ref is None:
        return PaymentResult(Outcome.INVALID_CARD)
    code = TransferCode.HOT_WATER if hold else TransferCode.MEAL
    ids = (part_id(key, SUBSIDY_PART), part_id(key, CASH_PART))
    purses = (ref.purse_id, ref.subsidy_id)
    async with s.holder_locks.hold((ref.ledger, ref.holder_id)):
        day = s.today()
        st, spent = await s.spending.state_and_spending(ref, key, ids, day=day,
                                                        want_spent=not force)
        if st.existing:  # a retransmission: answer from what the first attempt posted
            parts = (await s.reads.parts(ref.ledger, ids)).parts
            outcome, ts = answer_again(parts, credit=term.account_id, code=code, amount=amount,
                                       flags=_PENDING if hold else _FORCE if force else 0)
            return await finish(s, ref.ledger, key, outcome, ts, purses=purses)
        if st.reversed:  # reversed before it arrived: approve, move nothing
            return PaymentResult(Outcome.APPROVED, purses=PurseBalances(st.cash, st.subsidy))
        refusal = card_refusal(st.status)
        if refusal is None and not force:
            refusal = await s.pins.refusal(term, card_no, st.pin, day[0], pin_block,
                                           required=amount > (st.pin_threshold or 0))
        if refusal is not None:
            return PaymentResult(refusal)
        if not force and st.daily_limit is not None and spent + amount > st.daily_limit:
            return PaymentResult(Outcome.DAILY_LIMIT_EXCEEDED,
                                 purses=PurseBalances(st.cash, st.subsidy))
        from_subsidy, from_cash = split_subsidy_first(amount, st.subsidy)
        # Without force the ledger keeps each purse between 0 and where it was; an advice
        # posts past zero, so it is refused (13) where its answer could not show the rest.
        if force and not showable(st.cash - from_cash, st.subsidy - from_subsidy,
                                  st.cash + st.subsidy - amount):
            return PaymentResult(Outcome.INVALID_AMOUNT)
        transfers = _spend_transfers(
            term, ref, card_no, ids, from_subsidy, from_cash, code=code,
            flags=(TransferFlag.PENDING,) if hold else (TransferFlag.FORCE,) if force else (),
            timeout=s.hold_timeout_s if hold else None)
        outcome, ts = outcome_of(await s.spending.post(ref.ledger, transfers))
    if outcome is Outcome.INSUFFICIENT_FUNDS and st.cash + st.subsidy >= amount and attempts > 1:
        # The holder lock is this process's only: another engine process (or a raw transfer)
        # spent from the purses after the read, and the split made on it was refused. The
        # money was there: read again and split again.
        return await spend(s, term, card_no, amount, key, pin_block, force=force, hold=hold,
                           attempts=attempts - 1)
    return await finish(s, ref.ledger, key, outcome, ts, purses=purses)


def _spend_transfers(
    term: Terminal,
    ref: CardRef,
    card_no: str,
    ids: Sequence[UUID],
    from_subsidy: int,
    from_cash: int,
    *,
    code: TransferCode,
    flags: tuple[TransferFlag, ...],
    timeout: int | None,
) -> list[Transfer]:
    """The transfers of a payment split across the purses: one per purse that pays (the
    subsidy part first), each to the terminal's account."""
    return [
        Transfer(id=tid, ledger=ref.ledger, debit_account_id=debit,
                 credit_account_id=term.account_id, amount=part, code=code, flags=flags,
                 timeout_s=timeout, user_data=f"{term.terminal_id}:{card_no}")
        for tid, debit, part in (
            (ids[0], ref.subsidy_id, from_subsidy),
            (ids[1], ref.purse_id, from_cash),
        )
        if part > 0
    ]


async def balance(s: Shared, term: Terminal, card_no: str, pin_block: bytes | None
                  ) -> PaymentResult:
    """A balance inquiry: the purses' available fen (a PIN block sent is a PIN check)."""
    if term.kind not in INQUIRY_KINDS:
        return PaymentResult(Outcome.INVALID_TRANSACTION)
    ref = await s.reads.card_ref(term.ledger, card_no)
    if ref is None:
        return PaymentResult(Outcome.INVALID_CARD)
    day = s.today()
    st = await s.reads.card_state(ref, NIL_UUID, (), day=day, want_spent=False)
    refusal = card_refusal(st.status)
    if refusal is None:  # a PIN block that is sent is a PIN check: it counts, and 75 applies
        refusal = await s.pins.refusal(term, card_no, st.pin, day[0], pin_block,
                                       required=pin_block is not None)
    if refusal is not None:
        return PaymentResult(refusal)
    return PaymentResult(Outcome.APPROVED, purses=PurseBalances(st.cash, st.subsidy))

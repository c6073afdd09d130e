"""Electricity: a card buys it for a dorm room (card -> room purse), a room meter uses it
(room purse -> the meter's utility account, cutting the power at zero).

Both read as gather (shared reads: the card's state and today's spending, the room's balance,
an earlier attempt) -> decide (posting.py) -> post -> finish (reversals.finish).
"""

from __future__ import annotations

import asyncio
from typing import Final
from uuid import UUID

import msgspec

from engine.campus.accounts import CASH_PART, ROOM_PART, part_id, room_account_id
from engine.campus.model import Outcome, PaymentResult, PurseBalances, Terminal, TerminalKind
from engine.campus.posting import (
    ELECTRICITY_KINDS,
    answer_again,
    card_refusal,
    matches,
    outcome_of,
    showable,
)
from engine.campus.reversals import finish
from engine.campus.shared import Shared
from ledger.transfer import Transfer
from ledger.types import TransferCode, TransferFlag, TransferFlags

_FORCE: Final = int(TransferFlags.FORCE)


async def buy(
    s: Shared,
    term: Terminal,
    card_no: str,
    room_id: str,
    amount: int,
    key: UUID,
    pin_block: bytes | None,
    *,
    pin_waived: bool = False,
) -> PaymentResult:
    """The card's cash purse pays the room purse ``amount`` (code 3); ``pin_waived``: no PIN
    is asked for (the holder logged in with their password at /self)."""
    if term.kind not in ELECTRICITY_KINDS:
        return PaymentResult(Outcome.INVALID_TRANSACTION)
    if not s.amount_ok(amount):
        return PaymentResult(Outcome.INVALID_AMOUNT)
    ref = await s.reads.card_ref(term.ledger, card_no)
    if ref is None:
        return PaymentResult(Outcome.INVALID_CARD)
    room = room_account_id(term.ledger, room_id)
    tid = part_id(key, CASH_PART)
    purses = (ref.purse_id, ref.subsidy_id)
    async with s.holder_locks.hold((ref.ledger, ref.holder_id)):
        day = s.today()
        # the room's balance is read beside the card's: the answer must be able to show it
        (st, spent), (rooms, _) = await asyncio.gather(
            s.spending.state_and_spending(ref, key, (tid,), day=day, want_spent=True),
            s.reads.after(ref.ledger, key, (room,)),
        )
        if st.existing:
            parts = (await s.reads.parts(ref.ledger, (tid,))).parts
            outcome, ts = answer_again(parts, credit=room, code=TransferCode.ELECTRICITY,
                                       amount=amount, flags=0)
            return await finish(s, ref.ledger, key, outcome, ts, purses=purses, room=room)
        if st.reversed:
            return await finish(s, ref.ledger, key, Outcome.APPROVED, None, purses=purses,
                                room=room)
        refusal = card_refusal(st.status)
        if refusal is None and not pin_waived:
            refusal = await s.pins.refusal(term, card_no, st.pin, day[0], pin_block,
                                           required=amount > (st.pin_threshold or 0))
        if refusal is not None:
            return PaymentResult(refusal)
        if st.daily_limit is not None and spent + amount > st.daily_limit:
            return PaymentResult(Outcome.DAILY_LIMIT_EXCEEDED,
                                 purses=PurseBalances(st.cash, st.subsidy))
        # the cash purse stays between 0 and where it was (no force); the room could grow
        # past what its answer can show
        if not showable(rooms.get(room, 0) + amount):
            return PaymentResult(Outcome.INVALID_AMOUNT)
        transfer = Transfer(id=tid, ledger=ref.ledger, debit_account_id=ref.purse_id,
                            credit_account_id=room, amount=amount, code=TransferCode.ELECTRICITY,
                            user_data=f"{term.terminal_id}:{card_no}")
        outcome, ts = outcome_of(await s.spending.post(ref.ledger, [transfer]))
    return await finish(s, ref.ledger, key, outcome, ts, purses=purses, room=room)


async def meter_usage(
    s: Shared, term: Terminal, room_id: str, amount: int, key: UUID
) -> PaymentResult:
    """The room purse pays the meter's account ``amount`` (code 3, force); APPROVED while the
    room's balance after it is above zero, else INSUFFICIENT_FUNDS (cut the power)."""
    if term.kind is not TerminalKind.METER:
        return PaymentResult(Outcome.INVALID_TRANSACTION)
    if not s.amount_ok(amount):
        return PaymentResult(Outcome.INVALID_AMOUNT)
    room = room_account_id(term.ledger, room_id)
    tid = part_id(key, ROOM_PART)
    # A room's advices take turns (in this process): each posts against the balance it
    # checked, which its answer must be able to show (force posts past zero, unbounded).
    async with s.holder_locks.hold(("room", term.ledger, room)):
        got, (rooms, _) = await asyncio.gather(s.reads.parts(term.ledger, [tid], [key]),
                                               s.reads.after(term.ledger, key, (room,)))
        if got.parts:
            ok = matches(got.parts, credit=term.account_id, code=TransferCode.ELECTRICITY,
                         amount=amount, flags=_FORCE) and got.parts[0].debit_account_id == room
            if not ok:
                return PaymentResult(Outcome.DUPLICATE_DIFFERENT)
            ts = got.parts[0].timestamp
        elif got.reversed:
            ts = None
        elif not showable(rooms.get(room, 0) - amount):
            return PaymentResult(Outcome.INVALID_AMOUNT)
        else:
            transfer = Transfer(id=tid, ledger=term.ledger, debit_account_id=room,
                                credit_account_id=term.account_id, amount=amount,
                                code=TransferCode.ELECTRICITY, flags=(TransferFlag.FORCE,),
                                user_data=f"{term.terminal_id}:{room_id}")
            outcome, ts = outcome_of(await s.engine.batcher.submit([transfer]))
            if outcome is not Outcome.APPROVED:
                return PaymentResult(outcome)
    r = await finish(s, term.ledger, key, Outcome.APPROVED, ts, purses=None, room=room)
    if r.room_balance is None:
        return PaymentResult(Outcome.INVALID_TRANSACTION)
    return msgspec.structs.replace(
        r, outcome=Outcome.APPROVED if r.room_balance > 0 else Outcome.INSUFFICIENT_FUNDS
    )

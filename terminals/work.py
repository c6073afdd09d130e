"""The work of a terminal request: its Operation handed to the campus, the result its answer."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from engine.campus import Outcome
from terminals.iso8583 import ResponseCode
from terminals.operations import (
    MOVES_MONEY,
    NEEDS_POSITIVE_AMOUNT,
    Operation,
    amounts_for,
    auth_id_for,
    original_key,
    response_code_for,
)

if TYPE_CHECKING:
    from uuid import UUID

    from engine.campus import Campus, PaymentResult, Terminal
    from terminals.flight import Flight
    from terminals.iso8583 import Message
    from terminals.replies import Replier

__all__ = ["run_business", "work"]

log = logging.getLogger(__name__)


async def run_business(
    campus: Campus, term: Terminal, op: Operation, key: UUID, msg: Message
) -> PaymentResult:
    """What the campus makes of ``op`` (a request past the gateway's checks): its result."""
    card, amount, pin = msg.card_no or "", msg.amount or 0, msg.pin_data
    match op:
        case Operation.PURCHASE:
            return await campus.purchase(
                term, card_no=card, amount=amount, key=key, pin_block=pin
            )
        case Operation.ADVICE:
            return await campus.purchase(
                term, card_no=card, amount=amount, key=key, pin_block=pin, force=True
            )
        case Operation.INQUIRY:
            return await campus.balance(term, card_no=card, pin_block=pin)
        case Operation.HOLD:
            return await campus.hold(term, card_no=card, amount=amount, key=key, pin_block=pin)
        case Operation.COMPLETION:
            return await campus.complete(
                term,
                hold_key=original_key(term, msg),
                amount=amount,
                key=key,
                card_no=msg.card_no,
            )
        case Operation.ELECTRICITY:
            return await campus.buy_electricity(
                term,
                card_no=card,
                room_id=msg.room_id or "",
                amount=amount,
                key=key,
                pin_block=pin,
            )
        case Operation.METER:
            return await campus.meter_usage(
                term, room_id=msg.room_id or "", amount=amount, key=key
            )
        case Operation.REVERSAL:
            return await campus.reverse(
                term, original_key=original_key(term, msg), key=key
            )
    raise AssertionError(f"no business rule for {op}")


async def work(campus: Campus, replier: Replier, flight: Flight) -> Message | None:
    """The answer the business rules give ``flight``'s request (not stored yet), or None
    when the work of a money-moving request failed without saying what it did.

    The campus answers UNAVAILABLE (or raises) when the database failed under the work:
    maybe before anything was posted, maybe after the posting committed (the read after
    it failed, or the last retry of a commit whose outcome the batcher could not learn).
    For an operation that moves money that is no 96 yet: the gateway gives it up first
    (``Gateway._execute``, terminals/giveup.py).
    OVERLOADED is a plain 96 and stays cheap: the batcher's queue was full, nothing was
    queued. An inquiry moves nothing. A reversal (0400) keeps its plain 96, not stored: it
    only ever gives money back, it is remembered before it undoes anything and cannot be
    revoked once remembered, so its 96 means "not confirmed yet" and the terminal repeats
    it until it gets its 00 (each repetition undoes nothing twice: the undo ids are
    derived). Making that 96 "true" would mean charging again what the terminal asked to
    cancel; at worst a reversal's money comes back before the terminal hears of it.
    """
    term, op, key, msg = flight.term, flight.op, flight.key, flight.msg
    result: PaymentResult | None = None
    if op is Operation.UNSUPPORTED:
        code = ResponseCode.INVALID_TRANSACTION
    elif op in NEEDS_POSITIVE_AMOUNT and not msg.amount:
        code = ResponseCode.INVALID_AMOUNT
    else:
        try:
            result = await run_business(campus, term, op, key, msg)
        except Exception:
            log.exception("gateway: campus failed on %s %s", op.value, key)
            if op in MOVES_MONEY:
                return None
            return replier.reply(msg, ResponseCode.SYSTEM_ERROR)
        if result.outcome is Outcome.UNAVAILABLE and op in MOVES_MONEY:
            return None
        code = response_code_for(result.outcome)
    return replier.reply(
        msg,
        code,
        auth_id=auth_id_for(key) if code == ResponseCode.APPROVED else None,
        amounts=None if result is None else amounts_for(op, result),
        timestamp=None if result is None else result.timestamp,
    )

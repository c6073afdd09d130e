"""What a terminal request is and the pure facts derived from it (contract §5).

The operation a message asks for (``classify``), its idempotency key (``message_key``) and
business digest (``request_digest``), the RRN and authorisation id derived from the key, field
39 for a campus Outcome, and field 54 for a result. Which operations move money (and so are
given up rather than answered with a plain 96, see terminals/giveup.py) lives here too.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from typing import TYPE_CHECKING, Final
from uuid import UUID

import msgspec

from engine.campus import Outcome, PaymentResult
from ledger.ids import ordered
from terminals.iso8583 import (
    AccountType,
    AmountBlock,
    FormatError,
    Message,
    Mti,
    ProcessingCode,
    ResponseCode,
    encode_amounts,
    is_digits,
    parse_original,
)

if TYPE_CHECKING:
    from engine.campus import Terminal

__all__ = [
    "KEY_NAMESPACE",
    "MOVES_MONEY",
    "NEEDS_POSITIVE_AMOUNT",
    "NOT_REMEMBERED",
    "Operation",
    "amounts_for",
    "auth_id_for",
    "classify",
    "is_request_mti",
    "message_key",
    "original_key",
    "request_digest",
    "response_code_for",
    "rrn_for",
]

log = logging.getLogger(__name__)

KEY_NAMESPACE: Final = UUID("27550517-1e7c-5e53-939a-ff7d64c3588b")
"""Hashed into every request key; fixed forever (stored keys and transfer ids depend on it)."""

_RRN_LEN: Final = 12
_AUTH_ID_LEN: Final = 6
_BASE36: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Operation(enum.Enum):
    """What a request message asks for, from its MTI, processing code and fields."""

    SIGN_ON = "sign_on"
    PURCHASE = "purchase"
    INQUIRY = "inquiry"
    ADVICE = "advice"
    HOLD = "hold"
    COMPLETION = "completion"
    ELECTRICITY = "electricity"
    METER = "meter"
    REVERSAL = "reversal"
    UNSUPPORTED = "unsupported"  # a well-formed request the profile does not offer: 12


def message_key(terminal_id: str, stan: str, transmission_dt: str) -> UUID:
    """The idempotency key of a request, derived from terminal id, STAN and field 7 only.

    Its first 48 bits are field 7 read as the number MMDDhhmmss (which grows with time within
    a year), so the transfers of the same minute sit together in the ledger's index
    (``ledger.ids``); the other 74 are a hash of all three fields. Nothing else (no year, no
    clock) enters: a retransmission or reversal months later derives the same key.
    """
    dt = transmission_dt
    prefix = int(dt) if is_digits(dt, 10) else 0
    return ordered(prefix, KEY_NAMESPACE.bytes, terminal_id.encode(), stan.encode(), dt.encode())


def request_digest(msg: Message) -> bytes:
    """SHA-256 of a request's business content (MTI and fields 2, 3, 4, 42, 52, 90, 102).

    Fields 12/13 are left out on purpose: a terminal may restamp its local clock when it
    retransmits, and that does not make it a different transaction.
    """
    content = (
        msg.mti,
        msg.card_no,
        msg.processing_code,
        msg.amount,
        msg.merchant_id,
        msg.pin_data,
        msg.original_data,
        msg.room_id,
    )
    return hashlib.sha256(msgspec.msgpack.encode(content)).digest()


# Two base-36 digits per step (least significant first, as one digit per step would give):
# RRNs and authorisation ids are stored, so the output must never change, only its cost.
_BASE36_PAIRS: Final = tuple(_BASE36[q % 36] + _BASE36[q // 36] for q in range(36 * 36))


def _base36(data: bytes, length: int) -> str:
    """The ``length`` least significant base-36 digits of ``data``, least significant first."""
    n = int.from_bytes(data, "big")
    out = []
    for _ in range(length // 2):
        n, q = divmod(n, 36 * 36)
        out.append(_BASE36_PAIRS[q])
    if length % 2:
        out.append(_BASE36[n % 36])
    return "".join(out)


def rrn_for(key: UUID, attempt: int = 0) -> str:
    """Field 37 for the request ``key``: 12 base-36 characters of a hash of key and attempt.

    Deterministic, so even an answer recomputed after a crash carries the same RRN;
    ``attempt`` moves to another candidate after a (per-ledger) collision.
    """
    h = hashlib.sha256(key.bytes + attempt.to_bytes(2, "big")).digest()
    return _base36(h[:16], _RRN_LEN)


def auth_id_for(key: UUID) -> str:
    """Field 38 (approvals only): 6 base-36 characters derived from the request key."""
    return _base36(hashlib.sha256(b"auth:" + key.bytes).digest()[:8], _AUTH_ID_LEN)


_REQUIRED: Final[dict[Operation, tuple[tuple[str, int], ...]]] = {
    Operation.SIGN_ON: (),
    Operation.PURCHASE: (("card_no", 2), ("amount", 4)),
    Operation.INQUIRY: (("card_no", 2),),
    Operation.ADVICE: (("card_no", 2), ("amount", 4)),
    Operation.HOLD: (("card_no", 2), ("amount", 4)),
    Operation.COMPLETION: (("amount", 4),),
    Operation.ELECTRICITY: (("card_no", 2), ("amount", 4), ("room_id", 102)),
    Operation.METER: (("amount", 4), ("room_id", 102)),
    Operation.REVERSAL: (("original_data", 90),),
    Operation.UNSUPPORTED: (),
}
_COMMON: Final = (("terminal_id", 41), ("stan", 11), ("transmission_dt", 7))
_BY_CODE: Final[dict[str, dict[str, Operation]]] = {
    Mti.FINANCIAL: {
        ProcessingCode.PURCHASE: Operation.PURCHASE,
        ProcessingCode.INQUIRY: Operation.INQUIRY,
        ProcessingCode.ELECTRICITY_PURCHASE: Operation.ELECTRICITY,
    },
    Mti.ADVICE: {
        ProcessingCode.PURCHASE: Operation.ADVICE,  # COMPLETION when field 90 is present
        ProcessingCode.ROOM_METER: Operation.METER,
    },
    Mti.AUTHORIZATION: {ProcessingCode.PURCHASE: Operation.HOLD},
}


def classify(msg: Message) -> Operation:
    """The operation a decoded request asks for.

    Raises FormatError when a field the operation needs is missing (or field 2 is present on a
    room meter advice); an MTI or processing code outside the profile is UNSUPPORTED (``12``).
    """
    for attr, number in _COMMON:
        if getattr(msg, attr) is None:
            raise FormatError(f"field {number} is missing")
    op = _operation(msg)
    for attr, number in _REQUIRED[op]:
        if getattr(msg, attr) is None:
            raise FormatError(f"field {number} is required for {op.value}")
    if op is Operation.METER and msg.card_no is not None:
        raise FormatError("a room meter advice carries no field 2")
    if op is Operation.COMPLETION:
        assert msg.original_data is not None
        parse_original(msg.original_data)  # decode_message checked it; keep classify total
    return op


def _operation(msg: Message) -> Operation:
    if msg.mti == Mti.NETWORK:
        return Operation.SIGN_ON
    if msg.mti == Mti.REVERSAL:
        return Operation.REVERSAL
    codes = _BY_CODE.get(msg.mti)
    if codes is None:
        return Operation.UNSUPPORTED
    if msg.processing_code is None:
        raise FormatError("field 3 is missing")
    op = codes.get(msg.processing_code, Operation.UNSUPPORTED)
    if op is Operation.ADVICE and msg.original_data is not None:
        return Operation.COMPLETION
    return op


_OUTCOME_CODES: Final[dict[Outcome, ResponseCode]] = {
    Outcome.APPROVED: ResponseCode.APPROVED,
    Outcome.INSUFFICIENT_FUNDS: ResponseCode.INSUFFICIENT_FUNDS,
    Outcome.LOST_CARD: ResponseCode.LOST_CARD,
    Outcome.CARD_NOT_ACTIVE: ResponseCode.CARD_NOT_ACTIVE,
    Outcome.INVALID_CARD: ResponseCode.INVALID_CARD,
    Outcome.INCORRECT_PIN: ResponseCode.INCORRECT_PIN,
    Outcome.PIN_TRIES_EXCEEDED: ResponseCode.PIN_TRIES_EXCEEDED,
    Outcome.DAILY_LIMIT_EXCEEDED: ResponseCode.EXCEEDS_DAILY_LIMIT,
    Outcome.INVALID_AMOUNT: ResponseCode.INVALID_AMOUNT,
    Outcome.ORIGINAL_NOT_FOUND: ResponseCode.ORIGINAL_NOT_FOUND,
    Outcome.INVALID_TRANSACTION: ResponseCode.INVALID_TRANSACTION,
    Outcome.DUPLICATE_DIFFERENT: ResponseCode.DUPLICATE_DIFFERENT,
    Outcome.OVERLOADED: ResponseCode.SYSTEM_ERROR,
    Outcome.UNAVAILABLE: ResponseCode.SYSTEM_ERROR,
}

# Answers that are not remembered: a plain 96 (one that moved nothing for certain: an overload,
# nothing queued; or an operation that moves no money or only gives it back) asks the terminal
# to try again, and a campus-level 94 means the ledger already holds a different transaction
# under this key that this gateway has no answer for, so no answer can be the "identical" one
# yet. A money-moving request whose work failed is not answered with a plain 96
# (terminals/gateway.py, ``Gateway._work``).
NOT_REMEMBERED: Final = frozenset({ResponseCode.SYSTEM_ERROR, ResponseCode.DUPLICATE_DIFFERENT})


def response_code_for(outcome: Outcome) -> ResponseCode:
    """Field 39 for a campus Outcome."""
    return _OUTCOME_CODES[outcome]


# Which field 54 blocks an answer carries (contract §5).
_PURSE_BLOCKS: Final = frozenset(
    {
        Operation.PURCHASE,
        Operation.ADVICE,
        Operation.HOLD,
        Operation.COMPLETION,
        Operation.INQUIRY,
    }
)


def amounts_for(op: Operation, result: PaymentResult) -> str | None:
    """Field 54 of the answer to an ``op`` whose result is ``result`` (None: no field 54)."""
    blocks: list[AmountBlock] = []
    purses = result.purses
    if op in _PURSE_BLOCKS and purses is not None:
        blocks = [
            AmountBlock(account_type=AccountType.ALL, amount=purses.cash + purses.subsidy),
            AmountBlock(account_type=AccountType.CASH, amount=purses.cash),
            AmountBlock(account_type=AccountType.SUBSIDY, amount=purses.subsidy),
        ]
    elif op is Operation.ELECTRICITY:
        if purses is not None:
            blocks.append(AmountBlock(account_type=AccountType.CASH, amount=purses.cash))
        if result.room_balance is not None:
            blocks.append(AmountBlock(account_type=AccountType.ROOM, amount=result.room_balance))
    elif op is Operation.METER and result.room_balance is not None:
        blocks.append(AmountBlock(account_type=AccountType.ROOM, amount=result.room_balance))
    if not blocks:
        return None
    try:
        return encode_amounts(blocks)
    except FormatError:
        # A balance beyond 12 digits. The campus refuses (13) what would leave one there, so
        # only a purse pushed there some other way (raw transfers with force) gets here; its
        # answer goes without field 54 rather than as a 96 for money that may have moved.
        log.error("gateway: a balance field 54 cannot show: %s", [b.amount for b in blocks])
        return None


# Operations that move money: when the deadline passes while one of them is still at work, or
# its work fails, its 96 is made true before it is sent (terminals/giveup.py). An inquiry moves
# nothing. A reversal only ever gives money back, and it is irrevocable once remembered (an
# original that arrives later moves nothing), so its 96 keeps meaning "not confirmed yet": the
# terminal repeats it (see Gateway._work).
MOVES_MONEY: Final = frozenset(
    {
        Operation.PURCHASE,
        Operation.ADVICE,
        Operation.HOLD,
        Operation.COMPLETION,
        Operation.ELECTRICITY,
        Operation.METER,
    }
)



# Operations that move money need a positive amount (a completion's amount is the campus's
# business: it knows the hold).
NEEDS_POSITIVE_AMOUNT: Final = frozenset(
    {Operation.PURCHASE, Operation.ADVICE, Operation.HOLD, Operation.ELECTRICITY, Operation.METER}
)


def is_request_mti(head: bytes) -> bool:
    return len(head) == 4 and head.isdigit() and head[:1] == b"0" and int(head[2:3]) % 2 == 0


def original_key(term: Terminal, msg: Message) -> UUID:
    """The key of the request a completion or reversal names (field 90).

    A terminal can only name its own messages: the key embeds its terminal id.
    """
    assert msg.original_data is not None
    original = parse_original(msg.original_data)
    return message_key(term.terminal_id, original.stan, original.transmission_dt)

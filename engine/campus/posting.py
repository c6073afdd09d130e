"""Pure decisions of the terminal operations: which terminal kinds may do what, what a card's
state refuses, how a payment splits across the purses, whether an answer can show a balance,
what a batch's results mean, and whether a retransmission asks what its first attempt did.
Nothing here awaits: the operations gather, then decide with these, then post.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec

from engine import limits
from engine.campus.model import CardStatus, Outcome, TerminalKind
from engine.campus.reads import Part
from engine.grouping import TransferResult
from ledger.status import TransferStatus
from ledger.transfer import Transfer
from ledger.types import TransferFlag, TransferFlags

_LINKED: Final = int(TransferFlags.LINKED)

# Operations are tied to terminal kinds; anything else is INVALID_TRANSACTION.
PURCHASE_KINDS: Final = frozenset({TerminalKind.POS, TerminalKind.KIOSK})
HOLD_KINDS: Final = frozenset({TerminalKind.WATER})
ELECTRICITY_KINDS: Final = frozenset({TerminalKind.KIOSK, TerminalKind.POS})
INQUIRY_KINDS: Final = frozenset({TerminalKind.POS, TerminalKind.WATER, TerminalKind.KIOSK})

_S = TransferStatus
_STATUS_OUTCOME: Final[dict[TransferStatus, Outcome]] = {
    _S.EXCEEDS_CREDITS: Outcome.INSUFFICIENT_FUNDS,
    _S.DEBIT_ACCOUNT_FROZEN: Outcome.LOST_CARD,
    _S.ACCOUNT_CLOSED: Outcome.CARD_NOT_ACTIVE,
    _S.DAILY_LIMIT_EXCEEDED: Outcome.DAILY_LIMIT_EXCEEDED,
    _S.CARD_NOT_ACTIVE: Outcome.CARD_NOT_ACTIVE,
    _S.EXCEEDS_PENDING_TRANSFER_AMOUNT: Outcome.INVALID_AMOUNT,
    _S.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT: Outcome.INVALID_AMOUNT,
    _S.AMOUNT_MUST_BE_POSITIVE: Outcome.INVALID_AMOUNT,
    _S.PENDING_TRANSFER_NOT_FOUND: Outcome.ORIGINAL_NOT_FOUND,
    _S.PENDING_TRANSFER_EXPIRED: Outcome.ORIGINAL_NOT_FOUND,
    _S.EXISTS_WITH_DIFFERENT_AMOUNT: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_FLAGS: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_PENDING_ID: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_CODE: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_LEDGER: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_USER_DATA: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_TIMEOUT: Outcome.DUPLICATE_DIFFERENT,
}


def outcome_of(results: Sequence[TransferResult]) -> tuple[Outcome, int | None]:
    """The business outcome of one submitted operation and the timestamp of its first
    transfer. A failed linked chain answers the status of the event that broke it."""
    if all(r.status.ok for r in results):
        stamps = [r.timestamp for r in results if r.timestamp]
        return Outcome.APPROVED, min(stamps) if stamps else None
    for r in results:
        if not r.status.ok and r.status is not TransferStatus.LINKED_EVENT_FAILED:
            return _STATUS_OUTCOME.get(r.status, Outcome.INVALID_TRANSACTION), None
    return Outcome.INVALID_TRANSACTION, None


def chain(transfers: list[Transfer]) -> list[Transfer]:
    """Link every transfer to the next: the operation commits whole or not at all."""
    if len(transfers) < 2:
        return transfers
    linked = (TransferFlag.LINKED,)
    return [
        msgspec.structs.replace(t, flags=(*t.flags, *linked)) if i < len(transfers) - 1 else t
        for i, t in enumerate(transfers)
    ]


def split_subsidy_first(amount: int, subsidy_available: int) -> tuple[int, int]:
    """(from subsidy, from cash): the subsidy purse pays first, the cash purse the rest."""
    from_subsidy = min(amount, max(subsidy_available, 0))
    return from_subsidy, amount - from_subsidy


def showable(*balances: int) -> bool:
    """Whether a terminal answer can show each of ``balances`` (field 54: 12 digits of fen)."""
    return all(abs(b) <= limits.TERMINAL_FIELD_MAX_FEN for b in balances)


def card_refusal(status: CardStatus) -> Outcome | None:
    """The outcome of a card that cannot pay (lost, replaced, closed), or None: it can."""
    if status is CardStatus.LOST:
        return Outcome.LOST_CARD
    if status is not CardStatus.ACTIVE:
        return Outcome.CARD_NOT_ACTIVE
    return None


def matches(parts: Sequence[Part], *, credit: int, code: int, amount: int, flags: int) -> bool:
    """Whether the transfers an earlier attempt of this key posted are what this one asks."""
    return (
        all(p.credit_account_id == credit and p.code == code and p.flags & ~_LINKED == flags
            for p in parts)
        and sum(p.amount for p in parts) == amount
    )


def answer_again(
    parts: Sequence[Part], *, credit: int, code: int, amount: int, flags: int
) -> tuple[Outcome, int | None]:
    """What a retransmission answers, from the transfers its first attempt posted: APPROVED
    with the first one's timestamp when they are what this attempt asks (``matches``), else
    DUPLICATE_DIFFERENT."""
    if not matches(parts, credit=credit, code=code, amount=amount, flags=flags):
        return Outcome.DUPLICATE_DIFFERENT, None
    return Outcome.APPROVED, parts[0].timestamp if parts else None

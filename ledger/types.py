"""Primitive domain types shared by every layer: money, ids, kinds and flags.

Money is always an ``int`` of fen (CNY minor units); there is no float anywhere in the ledger.
Flags travel as lists of names on the wire and as bit masks inside the engine and in SQL.
"""

from __future__ import annotations

import enum
from typing import Annotated, Final
from uuid import UUID

import msgspec

INT64_MAX: Final = 2**63 - 1
INT32_MAX: Final = 2**31 - 1
NIL_UUID: Final = UUID(int=0)

Fen = int
"""An amount of money in fen. Signed only where a balance may go negative."""

# Text the engine stores: PostgreSQL text cannot hold U+0000, and a value it refuses inside a
# group-committed batch or a shared read fails everyone's, so it is refused at the door.
TEXT_WITHOUT_NUL: Final = r"^[^\x00]*$"


def whole_match(body: str) -> str:
    """A wire pattern (msgspec ``Meta(pattern=)``, JSON Schema) matching only whole strings
    made of ``body``: Python's ``$`` also matches before a final newline (msgspec searches
    with ``re``), so "12345678\\n" would pass ``^[0-9]{8,19}$`` and then break a database
    CHECK. The lookahead refuses that newline and reads the same in ECMA 262 (JSON Schema)."""
    return f"^{body}$(?!\\n)"


# Wire-level ranges. Zero is admitted where the contract has a status for it (id/ledger must
# not be zero), so the engine can answer that status instead of rejecting the whole request.
AccountId = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
LedgerId = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
Amount = Annotated[int, msgspec.Meta(ge=-INT64_MAX, le=INT64_MAX)]
Code = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class AccountKind(enum.StrEnum):
    """What an account is for; decides its normal side."""

    PURSE = "purse"
    SUBSIDY = "subsidy"
    ROOM = "room"
    MERCHANT = "merchant"
    UTILITY = "utility"
    SUSPENSE = "suspense"
    CLEARING = "clearing"
    FUND = "fund"

    @property
    def credit_normal(self) -> bool:
        """True when the balance is credits minus debits."""
        return self not in _DEBIT_NORMAL


_DEBIT_NORMAL: Final = frozenset({AccountKind.CLEARING, AccountKind.FUND})


class AccountFlag(enum.StrEnum):
    """Account flags as named on the wire."""

    DEBITS_MUST_NOT_EXCEED_CREDITS = "debits_must_not_exceed_credits"
    CREDITS_MUST_NOT_EXCEED_DEBITS = "credits_must_not_exceed_debits"
    CLOSED = "closed"
    FROZEN = "frozen"


class AccountFlags(enum.IntFlag):
    """Account flags as a bit mask (the form stored in SQL)."""

    NONE = 0
    DEBITS_MUST_NOT_EXCEED_CREDITS = 1
    CREDITS_MUST_NOT_EXCEED_DEBITS = 2
    CLOSED = 4
    FROZEN = 8


class TransferFlag(enum.StrEnum):
    """Transfer flags as named on the wire."""

    LINKED = "linked"
    PENDING = "pending"
    POST_PENDING = "post_pending"
    VOID_PENDING = "void_pending"
    FORCE = "force"


class TransferFlags(enum.IntFlag):
    """Transfer flags as a bit mask (the form stored in SQL)."""

    NONE = 0
    LINKED = 1
    PENDING = 2
    POST_PENDING = 4
    VOID_PENDING = 8
    FORCE = 16


# Transfers with either flag move no posted balance: a hold only reserves (debits_pending), a
# void only releases a hold. A posting (plain or post_pending) has neither. SQL filters posted
# money with ``flags & UNPOSTED_FLAGS = 0``.
UNPOSTED_FLAGS: Final = int(TransferFlags.PENDING | TransferFlags.VOID_PENDING)


class TransferCode(enum.IntEnum):
    """Business type of a transfer (contract §1)."""

    MEAL = 1
    HOT_WATER = 2
    ELECTRICITY = 3
    TOP_UP = 4
    SUBSIDY = 5
    REFUND = 6
    REVERSAL = 7
    ADJUSTMENT = 8
    CLOSURE = 9


class TransferState(enum.StrEnum):
    """Lifecycle state of a transfer as answered by ``GET /v1/transfers/{id}``."""

    POSTED = "posted"
    PENDING = "pending"
    SETTLED = "settled"
    VOIDED = "voided"
    EXPIRED = "expired"


_ACCOUNT_BITS: Final = {
    AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS: AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS,
    AccountFlag.CREDITS_MUST_NOT_EXCEED_DEBITS: AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS,
    AccountFlag.CLOSED: AccountFlags.CLOSED,
    AccountFlag.FROZEN: AccountFlags.FROZEN,
}
_TRANSFER_BITS: Final = {
    TransferFlag.LINKED: TransferFlags.LINKED,
    TransferFlag.PENDING: TransferFlags.PENDING,
    TransferFlag.POST_PENDING: TransferFlags.POST_PENDING,
    TransferFlag.VOID_PENDING: TransferFlags.VOID_PENDING,
    TransferFlag.FORCE: TransferFlags.FORCE,
}
# Flag tuples repeat endlessly on the hot path (mostly empty or ("linked",)); memoise them.
_transfer_bits_cache: dict[tuple[TransferFlag, ...], int] = {}


def account_flag_bits(flags: tuple[AccountFlag, ...]) -> int:
    """Bit mask of a tuple of account flag names (duplicates are harmless)."""
    bits = 0
    for f in flags:
        bits |= _ACCOUNT_BITS[f].value
    return bits


def account_flag_names(bits: int) -> tuple[AccountFlag, ...]:
    """Account flag names of a bit mask, in declaration order."""
    return tuple(name for name, bit in _ACCOUNT_BITS.items() if bits & bit)


def transfer_flag_bits(flags: tuple[TransferFlag, ...]) -> int:
    """Bit mask of a tuple of transfer flag names (memoised: it runs per transfer)."""
    bits = _transfer_bits_cache.get(flags)
    if bits is None:
        bits = 0
        for f in flags:
            bits |= _TRANSFER_BITS[f].value
        if len(_transfer_bits_cache) < 1024:
            _transfer_bits_cache[flags] = bits
    return bits


def transfer_flag_names(bits: int) -> tuple[TransferFlag, ...]:
    """Transfer flag names of a bit mask, in declaration order."""
    return tuple(name for name, bit in _TRANSFER_BITS.items() if bits & bit)

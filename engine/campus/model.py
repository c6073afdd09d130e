"""The campus's vocabulary (contract §2): terminal kinds, card states, holder kinds, outcomes
of terminal and registry operations, and the records the campus answers with.

Plain values only (enums and frozen msgspec structs): the gateway and the HTTP API encode them,
and nothing here touches the database.
"""

from __future__ import annotations

import enum
import re
from typing import Final

import msgspec

from ledger.types import AccountKind, TransferCode

# Account codes of the accounts the campus creates (the chart mirrors field 54's types).
PURSE_CODE: Final = 10
SUBSIDY_CODE: Final = 20
ROOM_CODE: Final = 30
# The ledger's subsidy fund (engine/campus/subsidies.py pays every subsidy from it): created with
# the ledger's holders, never by a subsidy. Migration 0005 computes the same id in SQL.
FUND_CODE: Final = 90
FUND_OWNER: Final = "subsidy-fund"

# Transfer codes that count towards a card's daily limit (a hold while it holds).
SPENDING_CODES: Final = (TransferCode.MEAL, TransferCode.HOT_WATER, TransferCode.ELECTRICITY)

CARD_NO: Final = re.compile(r"[0-9]{8,19}")  # the cards table's CHECK
TERMINAL_ID_LEN: Final = 8  # field 41 (ans8); the terminals table's CHECK


class TerminalKind(enum.StrEnum):
    """What a terminal is: canteen/shop POS, shower valve, self-service kiosk, room meter."""

    POS = "pos"
    WATER = "water"
    KIOSK = "kiosk"
    METER = "meter"


class CardStatus(enum.StrEnum):
    """Card states (contract §2)."""

    ACTIVE = "active"
    LOST = "lost"
    REPLACED = "replaced"
    CLOSED = "closed"


class HolderKind(enum.StrEnum):
    """Holder kinds (contract §2)."""

    STUDENT = "student"
    STAFF = "staff"


class RegistryStatus(enum.StrEnum):
    """Outcome of registering a holder or a terminal (contract §4)."""

    CREATED = "created"
    EXISTS = "exists"
    EXISTS_WITH_DIFFERENT_FIELDS = "exists_with_different_fields"


class Refusal(enum.StrEnum):
    """Why a registry operation was refused."""

    HOLDER_NOT_FOUND = "holder_not_found"
    CARD_NOT_FOUND = "card_not_found"
    ACCOUNT_NOT_FOUND = "account_not_found"
    AMBIGUOUS_HOLDER = "ambiguous_holder"  # the holder id exists in several ledgers
    CARD_NUMBER_TAKEN = "card_number_taken"
    HOLDER_HAS_ACTIVE_CARD = "holder_has_active_card"
    INVALID_TRANSITION = "invalid_transition"
    ACCOUNT_NOT_CREDITABLE = "account_not_creditable"  # a terminal must credit merchant/utility
    ACCOUNT_ID_TAKEN = "account_id_taken"  # a derived account id is used by another account

    @property
    def not_found(self) -> bool:
        """True when the refusal means "unknown" (HTTP 404) rather than "not allowed" (400)."""
        return self in _NOT_FOUND


_NOT_FOUND: Final = frozenset(
    {Refusal.HOLDER_NOT_FOUND, Refusal.CARD_NOT_FOUND, Refusal.ACCOUNT_NOT_FOUND}
)


class Refused(msgspec.Struct, frozen=True):
    """A registry operation that was not carried out, and why."""

    reason: Refusal
    detail: str


class Terminal(msgspec.Struct, frozen=True):
    """A registered terminal; it credits only ``account_id``."""

    terminal_id: str
    merchant_id: str
    ledger: int
    kind: TerminalKind
    account_id: int
    mac_key: bytes


class Outcome(enum.StrEnum):
    """Business outcome of a terminal operation; the gateway maps it to field 39."""

    APPROVED = "approved"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    LOST_CARD = "lost_card"
    CARD_NOT_ACTIVE = "card_not_active"
    INVALID_CARD = "invalid_card"
    INCORRECT_PIN = "incorrect_pin"
    PIN_TRIES_EXCEEDED = "pin_tries_exceeded"
    DAILY_LIMIT_EXCEEDED = "daily_limit_exceeded"
    INVALID_AMOUNT = "invalid_amount"
    ORIGINAL_NOT_FOUND = "original_not_found"
    INVALID_TRANSACTION = "invalid_transaction"
    DUPLICATE_DIFFERENT = "duplicate_different"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"


class PurseBalances(msgspec.Struct, frozen=True):
    """A holder's AVAILABLE fen after the operation."""

    cash: int
    subsidy: int

    @property
    def total(self) -> int:
        """Cash and subsidy together."""
        return self.cash + self.subsidy


class PaymentResult(msgspec.Struct, frozen=True):
    """The answer to a terminal operation."""

    outcome: Outcome
    purses: PurseBalances | None = None
    room_balance: int | None = None
    timestamp: int | None = None


class Holder(msgspec.Struct, frozen=True):
    """A card holder and the two purses it owns."""

    id: str
    ledger: int
    name: str
    kind: HolderKind
    purse_account_id: int
    subsidy_account_id: int


class HolderResult(msgspec.Struct, frozen=True):
    """Outcome of ``create_holder``: the stored holder (the old one if it already existed)."""

    status: RegistryStatus
    holder: Holder


class Card(msgspec.Struct, frozen=True):
    """A card as stored."""

    card_no: str
    ledger: int
    holder_id: str
    status: CardStatus
    daily_limit: int | None = None
    pin: str | None = None
    pin_threshold: int | None = None
    replaced_by: str | None = None


class Replacement(msgspec.Struct, frozen=True):
    """Outcome of ``replace_card``."""

    old: Card
    new: Card


class Purse(msgspec.Struct, frozen=True):
    """One of a holder's purses."""

    account_id: int
    kind: AccountKind
    balance: int
    available: int


class CardBalance(msgspec.Struct, frozen=True):
    """A card, its holder's purses, and what they can spend together."""

    card: Card
    purses: list[Purse]
    total_available: int


class Room(msgspec.Struct, frozen=True):
    """A dorm room's electricity purse."""

    room_id: str
    ledger: int
    account_id: int

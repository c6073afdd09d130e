"""The vocabulary of the profile: message types, processing and response codes, account
types, the Message (one ISO 8583 message, MAC excluded), the decoded frame that carries its
MAC, and the FormatError every refusal raises."""

from __future__ import annotations

from enum import StrEnum
from typing import TypeGuard

import msgspec

from terminals.mac import verify_mac


class FormatError(ValueError):
    """A message (or a field helper input) breaks the profile; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Mti(StrEnum):
    """Message type indicators used by the gateway (version digit 0 = ISO 8583:1987)."""

    AUTHORIZATION = "0100"
    AUTHORIZATION_RESPONSE = "0110"
    FINANCIAL = "0200"
    FINANCIAL_RESPONSE = "0210"
    ADVICE = "0220"
    ADVICE_RESPONSE = "0230"
    REVERSAL = "0400"
    REVERSAL_RESPONSE = "0410"
    NETWORK = "0800"
    NETWORK_RESPONSE = "0810"


class ProcessingCode(StrEnum):
    """Field 3 values of the profile."""

    PURCHASE = "000000"
    INQUIRY = "310000"
    ELECTRICITY_PURCHASE = "400000"
    ROOM_METER = "410000"


class ResponseCode(StrEnum):
    """Field 39 values of the profile."""

    APPROVED = "00"
    INVALID_MERCHANT = "03"
    INVALID_TRANSACTION = "12"
    INVALID_AMOUNT = "13"
    INVALID_CARD = "14"
    ORIGINAL_NOT_FOUND = "25"
    FORMAT_ERROR = "30"
    LOST_CARD = "41"
    INSUFFICIENT_FUNDS = "51"
    INCORRECT_PIN = "55"
    EXCEEDS_DAILY_LIMIT = "61"
    CARD_NOT_ACTIVE = "62"
    MAC_FAILURE = "63"
    PIN_TRIES_EXCEEDED = "75"
    DUPLICATE_DIFFERENT = "94"
    SYSTEM_ERROR = "96"


class AccountType(StrEnum):
    """Field 54 account types."""

    ALL = "00"
    CASH = "10"
    SUBSIDY = "20"
    ROOM = "30"


def response_mti(mti: str) -> str:
    """Return the response MTI for a request or advice MTI (0200 -> 0210, 0220 -> 0230)."""
    if not is_digits(mti, 4) or int(mti[2]) % 2:
        raise ValueError(f"{mti!r} is not a request or advice MTI")
    return f"{mti[:2]}{int(mti[2]) + 1}{mti[3]}"


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """One ISO 8583 message of the profile, MAC excluded. Absent fields are None."""

    mti: str
    card_no: str | None = None  # 2, n..19
    processing_code: str | None = None  # 3, n6
    amount: int | None = None  # 4, n12, fen
    transmission_dt: str | None = None  # 7, MMDDhhmmss UTC
    stan: str | None = None  # 11, n6
    local_time: str | None = None  # 12, hhmmss campus time
    local_date: str | None = None  # 13, MMDD campus time
    rrn: str | None = None  # 37, an12
    auth_id: str | None = None  # 38, an6
    response_code: str | None = None  # 39, an2
    terminal_id: str | None = None  # 41, ans8
    merchant_id: str | None = None  # 42, ans15
    pin_data: bytes | None = None  # 52, b8
    additional_amounts: str | None = None  # 54, ans..120 (see parse_amounts)
    original_data: str | None = None  # 90, n42 (see parse_original)
    room_id: str | None = None  # 102, ans..28


class DecodedFrame(msgspec.Struct, frozen=True):
    """A decoded message with its MAC and the exact bytes the MAC covers (b"" if no MAC)."""

    message: Message
    mac: bytes | None
    mac_data: bytes

    def verify(self, key: bytes) -> bool:
        """True iff a MAC is present and correct under ``key``."""
        return self.mac is not None and verify_mac(key, self.mac_data, self.mac)


def is_digits(s: object, n: int) -> bool:
    """``s`` is a string of exactly ``n`` ASCII digits."""
    return isinstance(s, str) and len(s) == n and s.isascii() and s.isdigit()


def is_int(v: object) -> TypeGuard[int]:
    """``v`` is an int and not a bool (which Python counts as one)."""
    return isinstance(v, int) and not isinstance(v, bool)

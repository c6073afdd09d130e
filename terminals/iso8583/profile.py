"""The profile: one entry per data field (number, attribute of Message, character class,
length), each field's check, and the pyiso8583 spec derived from the table."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from terminals.iso8583.amounts import parse_amounts
from terminals.iso8583.message import FormatError
from terminals.iso8583.original import parse_original
from terminals.mac import MAC_LEN

_CLASSES: Final = {
    "n": "[0-9]",
    "an": "[A-Za-z0-9]",
    "ans": "[\\x20-\\x7e]",
    "b": "[0-9A-F]",  # the library's hex form of binary data
}


_DAYS_IN_MONTH: Final = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # Feb 29 allowed


# Date checks run after the digit and length checks, so int() cannot fail here.
def _mmdd(s: str) -> bool:
    month, day = int(s[:2]), int(s[2:4])
    return 1 <= month <= 12 and 1 <= day <= _DAYS_IN_MONTH[month - 1]


def _hhmmss(s: str) -> bool:
    return int(s[:2]) < 24 and int(s[2:4]) < 60 and int(s[4:6]) < 60


def _mmddhhmmss(s: str) -> bool:
    return _mmdd(s[:4]) and _hhmmss(s[4:])


def _field54(s: str) -> bool:
    parse_amounts(s)
    return True


def _field90(s: str) -> bool:
    parse_original(s)
    return True


class Field(NamedTuple):
    number: int
    attr: str
    kind: str  # n, an, ans or b (binary)
    len_type: int  # 0 fixed, 2 LLVAR, 3 LLLVAR (ASCII length digits)
    max_len: int  # the fixed length, or the maximum for variable fields
    desc: str
    check: Callable[[str], bool] | None = None

    @property
    def key(self) -> str:
        """The field's key in a pyiso8583 document."""
        return str(self.number)

    def pattern(self) -> re.Pattern[str]:
        """The whole wire text in one expression: character class and length (binary fields
        count bytes, two hex digits each)."""
        chars = _CLASSES[self.kind]
        if self.kind == "b":
            chars = f"(?:{chars}{chars})"
        low = self.max_len if self.len_type == 0 else 1
        return re.compile(f"{chars}{{{low},{self.max_len}}}", re.ASCII)


FIELDS: Final = (
    Field(2, "card_no", "n", 2, 19, "Primary Account Number"),
    Field(3, "processing_code", "n", 0, 6, "Processing Code"),
    Field(4, "amount", "n", 0, 12, "Amount, Transaction"),
    Field(7, "transmission_dt", "n", 0, 10, "Transmission Date & Time", _mmddhhmmss),
    Field(11, "stan", "n", 0, 6, "System Trace Audit Number"),
    Field(12, "local_time", "n", 0, 6, "Time, Local Transaction", _hhmmss),
    Field(13, "local_date", "n", 0, 4, "Date, Local Transaction", _mmdd),
    Field(37, "rrn", "an", 0, 12, "Retrieval Reference Number"),
    Field(38, "auth_id", "an", 0, 6, "Authorization ID Response"),
    Field(39, "response_code", "an", 0, 2, "Response Code"),
    Field(41, "terminal_id", "ans", 0, 8, "Card Acceptor Terminal ID"),
    Field(42, "merchant_id", "ans", 0, 15, "Card Acceptor ID Code"),
    Field(52, "pin_data", "b", 0, 8, "PIN Data"),
    Field(54, "additional_amounts", "ans", 3, 120, "Additional Amounts", _field54),
    Field(90, "original_data", "n", 0, 42, "Original Data Elements", _field90),
    Field(102, "room_id", "ans", 2, 28, "Account Identification 1"),
)
# Per field, precomputed: (field, its document key, its wire pattern).
CHECKS: Final = tuple((f, f.key, f.pattern()) for f in FIELDS)
MAC_PRIMARY: Final = 64
MAC_SECONDARY: Final = 128
MAC_KEYS: Final = (str(MAC_PRIMARY), str(MAC_SECONDARY))
HIGH_ATTRS: Final = tuple(f.attr for f in FIELDS if f.number > MAC_PRIMARY)
PROFILE: Final = frozenset([f.number for f in FIELDS] + [MAC_PRIMARY, MAC_SECONDARY])
MTI_LEN: Final = 4
BITMAP_LEN: Final = 8


def _spec_entry(data_enc: str, len_type: int, max_len: int, desc: str) -> dict[str, Any]:
    return {
        "data_enc": data_enc,
        "len_enc": "ascii",
        "len_type": len_type,
        "max_len": max_len,
        "desc": desc,
    }


SPEC: Final[dict[str, dict[str, Any]]] = {
    "h": _spec_entry("ascii", 0, 0, "Message Header"),  # max_len 0: no header
    "t": _spec_entry("ascii", 0, 4, "Message Type"),
    "p": _spec_entry("b", 0, BITMAP_LEN, "Bitmap, Primary"),
    "1": _spec_entry("b", 0, BITMAP_LEN, "Bitmap, Secondary"),
    **{
        f.key: _spec_entry("b" if f.kind == "b" else "ascii", f.len_type, f.max_len, f.desc)
        for f in FIELDS
    },
    str(MAC_PRIMARY): _spec_entry("b", 0, MAC_LEN, "MAC"),
    str(MAC_SECONDARY): _spec_entry("b", 0, MAC_LEN, "MAC, Secondary"),
}
"""The pyiso8583 spec of the profile (only the fields of the profile are defined)."""


# ---------------------------------------------------------------------------------------
# The checks


def check_field(f: Field, pattern: re.Pattern[str], wire: str) -> None:
    """Validate one field's wire text (binary fields in the library's hex form)."""
    if pattern.fullmatch(wire) is None:
        _explain(f, wire)  # raises
    if f.check is not None and not f.check(wire):
        raise FormatError(f"field {f.number}: bad value")


def _explain(f: Field, wire: str) -> None:
    """Raise the FormatError saying why ``wire`` does not match its field's pattern."""
    size = len(wire) // 2 if f.kind == "b" else len(wire)
    if f.len_type == 0 and size != f.max_len:
        raise FormatError(f"field {f.number}: length {size}, expected {f.max_len}")
    if f.len_type and not 1 <= size <= f.max_len:
        raise FormatError(f"field {f.number}: length {size}, expected 1..{f.max_len}")
    raise FormatError(f"field {f.number}: characters outside {f.kind}")

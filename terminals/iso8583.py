"""The onecard ISO 8583:1987 profile (contract §5), on top of the pinned ``pyiso8583``.

Wire shape: ASCII MTI, binary primary bitmap, binary secondary bitmap only when a field above
64 is present, ASCII fields, and the MAC (field 64, or 128 with a secondary bitmap) always
last. The library does the field-level encoding; this module adds what it does not check:
the profile's field set, character classes, date shapes and the MAC position.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any, Final, NamedTuple, TypeGuard

import iso8583
import msgspec

from engine.limits import TERMINAL_FIELD_MAX_FEN
from terminals.mac import MAC_LEN, compute_mac, verify_mac

__all__ = [
    "SPEC",
    "AccountType",
    "AmountBlock",
    "DecodedFrame",
    "FormatError",
    "Message",
    "Mti",
    "OriginalData",
    "ProcessingCode",
    "ResponseCode",
    "decode_message",
    "encode_amounts",
    "encode_message",
    "encode_message_unmac",
    "encode_original",
    "is_digits",
    "parse_amounts",
    "parse_original",
    "response_mti",
    "salvage",
]


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


# ---------------------------------------------------------------------------------------
# Field 54 and field 90 helpers

_BLOCK_LEN: Final = 20
_MAX_BLOCKS: Final = 6  # 120 / 20, the LLLVAR maximum of field 54
_MAX_AMOUNT: Final = TERMINAL_FIELD_MAX_FEN  # 12 digits of fen (fields 4 and 54)
_BLOCK_RE: Final = re.compile(r"(\d{2})(\d{2})(\d{3})([CD])(\d{12})")


class AmountBlock(msgspec.Struct, frozen=True, kw_only=True):
    """One 20-character field 54 block; ``amount`` is signed fen."""

    account_type: str
    amount: int
    amount_type: str = "02"
    currency: str = "156"


def encode_amounts(blocks: Iterable[AmountBlock]) -> str:
    """Render field 54 from one to six blocks; raises FormatError on bad input."""
    parts: list[str] = []
    for b in blocks:
        if not (is_digits(b.account_type, 2) and is_digits(b.amount_type, 2)):
            raise FormatError("field 54: account and amount types are 2 digits")
        if not is_digits(b.currency, 3):
            raise FormatError("field 54: currency is 3 digits")
        if not _is_int(b.amount) or abs(b.amount) > _MAX_AMOUNT:
            raise FormatError("field 54: amount out of range")
        sign = "C" if b.amount >= 0 else "D"
        parts.append(f"{b.account_type}{b.amount_type}{b.currency}{sign}{abs(b.amount):012d}")
    if not 1 <= len(parts) <= _MAX_BLOCKS:
        raise FormatError(f"field 54: 1..{_MAX_BLOCKS} blocks, got {len(parts)}")
    return "".join(parts)


def parse_amounts(s: str) -> list[AmountBlock]:
    """Parse field 54 into blocks; raises FormatError on bad input."""
    if not isinstance(s, str) or not s or len(s) % _BLOCK_LEN or len(s) > _BLOCK_LEN * _MAX_BLOCKS:
        raise FormatError("field 54: not 1..6 blocks of 20 characters")
    blocks: list[AmountBlock] = []
    for i in range(0, len(s), _BLOCK_LEN):
        m = _BLOCK_RE.fullmatch(s, i, i + _BLOCK_LEN)
        if m is None or not m[0].isascii():
            raise FormatError(f"field 54: malformed block {i // _BLOCK_LEN + 1}")
        magnitude = int(m[5])
        blocks.append(
            AmountBlock(
                account_type=m[1],
                amount_type=m[2],
                currency=m[3],
                amount=magnitude if m[4] == "C" else -magnitude,
            )
        )
    return blocks


class OriginalData(msgspec.Struct, frozen=True):
    """The parts of field 90 the profile uses."""

    mti: str
    stan: str
    transmission_dt: str


_ORIGINAL_PAD: Final = "0" * 22


def encode_original(mti: str, stan: str, transmission_dt: str) -> str:
    """Build field 90: original MTI + STAN + field 7 + 22 zeros (42 digits)."""
    if not (is_digits(mti, 4) and is_digits(stan, 6) and is_digits(transmission_dt, 10)):
        raise FormatError("field 90: original MTI/STAN/field 7 must be 4/6/10 digits")
    return f"{mti}{stan}{transmission_dt}{_ORIGINAL_PAD}"


def parse_original(s: str) -> OriginalData:
    """Parse field 90; raises FormatError unless it is 20 digits followed by 22 zeros."""
    if not is_digits(s, 42) or s[20:] != _ORIGINAL_PAD:
        raise FormatError("field 90: not MTI(4) + STAN(6) + field 7(10) + 22 zeros")
    return OriginalData(mti=s[:4], stan=s[4:10], transmission_dt=s[10:20])


# ---------------------------------------------------------------------------------------
# The profile: one entry per data field, plus the library spec derived from it

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


class _Field(NamedTuple):
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


_FIELDS: Final = (
    _Field(2, "card_no", "n", 2, 19, "Primary Account Number"),
    _Field(3, "processing_code", "n", 0, 6, "Processing Code"),
    _Field(4, "amount", "n", 0, 12, "Amount, Transaction"),
    _Field(7, "transmission_dt", "n", 0, 10, "Transmission Date & Time", _mmddhhmmss),
    _Field(11, "stan", "n", 0, 6, "System Trace Audit Number"),
    _Field(12, "local_time", "n", 0, 6, "Time, Local Transaction", _hhmmss),
    _Field(13, "local_date", "n", 0, 4, "Date, Local Transaction", _mmdd),
    _Field(37, "rrn", "an", 0, 12, "Retrieval Reference Number"),
    _Field(38, "auth_id", "an", 0, 6, "Authorization ID Response"),
    _Field(39, "response_code", "an", 0, 2, "Response Code"),
    _Field(41, "terminal_id", "ans", 0, 8, "Card Acceptor Terminal ID"),
    _Field(42, "merchant_id", "ans", 0, 15, "Card Acceptor ID Code"),
    _Field(52, "pin_data", "b", 0, 8, "PIN Data"),
    _Field(54, "additional_amounts", "ans", 3, 120, "Additional Amounts", _field54),
    _Field(90, "original_data", "n", 0, 42, "Original Data Elements", _field90),
    _Field(102, "room_id", "ans", 2, 28, "Account Identification 1"),
)
# Per field, precomputed: (field, its document key, its wire pattern).
_CHECKS: Final = tuple((f, f.key, f.pattern()) for f in _FIELDS)
_MAC_PRIMARY: Final = 64
_MAC_SECONDARY: Final = 128
_MAC_KEYS: Final = (str(_MAC_PRIMARY), str(_MAC_SECONDARY))
_HIGH_ATTRS: Final = tuple(f.attr for f in _FIELDS if f.number > _MAC_PRIMARY)
_PROFILE: Final = frozenset([f.number for f in _FIELDS] + [_MAC_PRIMARY, _MAC_SECONDARY])
_MTI_LEN: Final = 4
_BITMAP_LEN: Final = 8
_MAC_HEX_PLACEHOLDER: Final = "00" * MAC_LEN


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
    "p": _spec_entry("b", 0, _BITMAP_LEN, "Bitmap, Primary"),
    "1": _spec_entry("b", 0, _BITMAP_LEN, "Bitmap, Secondary"),
    **{
        f.key: _spec_entry("b" if f.kind == "b" else "ascii", f.len_type, f.max_len, f.desc)
        for f in _FIELDS
    },
    str(_MAC_PRIMARY): _spec_entry("b", 0, MAC_LEN, "MAC"),
    str(_MAC_SECONDARY): _spec_entry("b", 0, MAC_LEN, "MAC, Secondary"),
}
"""The pyiso8583 spec of the profile (only the fields of the profile are defined)."""


# ---------------------------------------------------------------------------------------
# Encoding


def encode_message(msg: Message, mac_key: bytes) -> bytes:
    """Encode ``msg`` and append its MAC as the last field (64, or 128 past field 64).

    Raises FormatError if a field breaks the profile.
    """
    doc = _to_doc(msg)
    # Encoding with a placeholder sets the MAC bit in the bitmap; the MAC, fixed-length and
    # last, then replaces the placeholder's final 8 bytes. Past field 64 it goes in 128.
    high = any(getattr(msg, attr) is not None for attr in _HIGH_ATTRS)
    doc[_MAC_KEYS[high]] = _MAC_HEX_PLACEHOLDER
    body = _lib_encode(doc)[:-MAC_LEN]
    return body + compute_mac(mac_key, body)


def encode_message_unmac(msg: Message) -> bytes:
    """Encode ``msg`` without a MAC (only for the unknown-terminal ``63`` answer)."""
    return _lib_encode(_to_doc(msg))


def _to_doc(msg: Message) -> dict[str, str]:
    if not isinstance(msg.mti, str) or not is_digits(msg.mti, 4) or msg.mti[0] != "0":
        raise FormatError("bad MTI")
    doc = {"t": msg.mti}
    for f, key, pattern in _CHECKS:
        value = getattr(msg, f.attr)
        if value is not None:
            wire = _to_wire(f, value)
            _check(f, pattern, wire)
            doc[key] = wire
    return doc


def _to_wire(f: _Field, value: object) -> str:
    if f.attr == "amount":
        if not _is_int(value) or not 0 <= value <= _MAX_AMOUNT:
            raise FormatError("field 4: amount must be an int in 0..999999999999")
        return f"{value:012d}"
    if f.kind == "b":
        if not isinstance(value, bytes):
            raise FormatError(f"field {f.number}: expected bytes")
        return value.hex().upper()
    if not isinstance(value, str):
        raise FormatError(f"field {f.number}: expected str")
    return value


def _lib_encode(doc: dict[str, str]) -> bytes:
    try:
        raw, _ = iso8583.encode(doc, SPEC)
    except iso8583.EncodeError as exc:  # pragma: no cover - _check runs first
        raise FormatError(f"encode: {exc}") from None
    return bytes(raw)


# ---------------------------------------------------------------------------------------
# Decoding


def decode_message(raw: bytes | bytearray) -> DecodedFrame:
    """Decode one message (frame payload) of the profile.

    Returns the Message, its MAC (None if absent) and the bytes the MAC covers. Raises
    FormatError for anything malformed, including a MAC that is not the last field.
    """
    if not isinstance(raw, bytes | bytearray):
        raise FormatError("message must be bytes")
    raw = bytes(raw)
    secondary = _check_header(raw)
    try:
        doc, _ = iso8583.decode(raw, SPEC)
    except iso8583.DecodeError as exc:
        # The library blames the last field it decoded for trailing bytes; say what it is.
        if exc.msg.startswith("Extra data"):
            raise FormatError("trailing bytes after the last field") from None
        raise FormatError(f"field {exc.field}: {exc.msg}") from None
    values: dict[str, Any] = {}
    for f, key, pattern in _CHECKS:
        wire = doc.get(key)
        if wire is not None:
            _check(f, pattern, wire)
            values[f.attr] = _from_wire(f, wire)
    message = Message(mti=doc["t"], **values)
    mac_key = _MAC_KEYS[secondary]
    if mac_key not in doc:
        return DecodedFrame(message, None, b"")
    return DecodedFrame(message, bytes.fromhex(doc[mac_key]), raw[:-MAC_LEN])


def _check_header(raw: bytes) -> bool:
    """Validate MTI and bitmaps against the profile; return whether a secondary is present.

    Done before the library runs because it looks up every flagged field in the spec (a
    field outside the profile would be a KeyError) and reads field 65 as a tertiary bitmap.
    """
    if len(raw) < _MTI_LEN + _BITMAP_LEN:
        raise FormatError("truncated before the end of the primary bitmap")
    if not raw[:_MTI_LEN].isdigit() or raw[0:1] != b"0":
        raise FormatError("bad MTI")
    fields = _bits(raw[_MTI_LEN : _MTI_LEN + _BITMAP_LEN], 0)
    secondary = 1 in fields
    if secondary:
        start = _MTI_LEN + _BITMAP_LEN
        if len(raw) < start + _BITMAP_LEN:
            raise FormatError("truncated inside the secondary bitmap")
        high = _bits(raw[start : start + _BITMAP_LEN], 64)
        if not high:
            raise FormatError("secondary bitmap present without fields above 64")
        fields = (fields - {1}) | high
    unknown = fields - _PROFILE
    if unknown:
        raise FormatError(f"field {min(unknown)} is not in the profile")
    if secondary and _MAC_PRIMARY in fields:
        raise FormatError("MAC in field 64 with a secondary bitmap: MAC is not the last field")
    return secondary


def _bits(bitmap: bytes, offset: int) -> set[int]:
    out: set[int] = set()
    for i, byte in enumerate(bitmap):
        if byte:
            out.update(_BYTE_BITS[offset + i * 8][byte])
    return out


# _BYTE_BITS[base][byte]: the field numbers a bitmap byte flags, the byte's first bit being
# field base + 1 (bases 0, 8, .., 120).
_BYTE_BITS: Final = {
    base: tuple(
        tuple(base + bit + 1 for bit in range(8) if byte & (0x80 >> bit)) for byte in range(256)
    )
    for base in range(0, 128, 8)
}


def _from_wire(f: _Field, wire: str) -> object:
    if f.attr == "amount":
        return int(wire)
    if f.kind == "b":
        return bytes.fromhex(wire)
    return wire


# ---------------------------------------------------------------------------------------
# Salvage: what can be read of a frame decode_message refused

# The fields an answer to a malformed frame echoes: 41 says whose key MACs it, 11 and 7 pair
# it with the request. 41 is the last of them, so the walk never goes past it.
_SALVAGED: Final = frozenset({"transmission_dt", "stan", "terminal_id"})
_SALVAGE_LAST: Final = 41
_BY_NUMBER: Final = {f.number: (f, pattern) for f, _, pattern in _CHECKS}


def salvage(raw: bytes | bytearray) -> Message | None:
    """The MTI and whichever of fields 7, 11 and 41 are well-formed in a frame that
    ``decode_message`` refused (a bad value elsewhere, the MAC misplaced or missing, trailing
    bytes, a truncated field, a flag outside the profile), or None without a digit MTI.

    So that the ``30`` answering it can echo them and carry the MAC of the terminal field 41
    names (contract §5: every answer to a known terminal carries one). Best effort: it walks
    the bitmap field by field with the profile's lengths and stops at the first field it
    cannot delimit (outside the profile, a bad length prefix, truncated); a field's content
    never stops the walk, only its shape.
    """
    raw = bytes(raw)
    if len(raw) < _MTI_LEN or not raw[:_MTI_LEN].isdigit():
        return None
    found: dict[str, str] = {}  # the salvaged fields are all text: their wire form is the value
    pos = _MTI_LEN + _BITMAP_LEN
    primary = _bits(raw[_MTI_LEN:pos], 0) if len(raw) >= pos else set()
    if 1 in primary:
        pos += _BITMAP_LEN  # a truncated secondary bitmap leaves nothing to read below
    for number in sorted(primary - {1}):
        entry = _BY_NUMBER.get(number)
        if number > _SALVAGE_LAST or entry is None:
            break
        f, pattern = entry
        delimited = _delimit(f, raw, pos)
        if delimited is None:
            break
        wire, pos = delimited
        if f.attr in _SALVAGED:
            try:
                _check(f, pattern, wire)
            except FormatError:
                continue  # malformed itself: not echoed, but the walk goes on
            found[f.attr] = wire
    return Message(
        mti=raw[:_MTI_LEN].decode(),
        transmission_dt=found.get("transmission_dt"),
        stan=found.get("stan"),
        terminal_id=found.get("terminal_id"),
    )


def _delimit(f: _Field, raw: bytes, pos: int) -> tuple[str, int] | None:
    """Field ``f`` at ``pos`` (its wire text, in the library's form) and where the next field
    starts, or None when its length prefix or its data cannot be read."""
    size = f.max_len
    if f.len_type:
        prefix = raw[pos : pos + f.len_type]
        if len(prefix) != f.len_type or not prefix.isdigit() or int(prefix) > f.max_len:
            return None
        size, pos = int(prefix), pos + f.len_type
    data = raw[pos : pos + size]
    if len(data) != size:
        return None
    # latin-1 maps every byte to one character; the field's pattern then refuses non-ASCII
    return (data.hex().upper() if f.kind == "b" else data.decode("latin-1")), pos + size


# ---------------------------------------------------------------------------------------
# Shared checks


def _check(f: _Field, pattern: re.Pattern[str], wire: str) -> None:
    """Validate one field's wire text (binary fields in the library's hex form)."""
    if pattern.fullmatch(wire) is None:
        _explain(f, wire)  # raises
    if f.check is not None and not f.check(wire):
        raise FormatError(f"field {f.number}: bad value")


def _explain(f: _Field, wire: str) -> None:
    """Raise the FormatError saying why ``wire`` does not match its field's pattern."""
    size = len(wire) // 2 if f.kind == "b" else len(wire)
    if f.len_type == 0 and size != f.max_len:
        raise FormatError(f"field {f.number}: length {size}, expected {f.max_len}")
    if f.len_type and not 1 <= size <= f.max_len:
        raise FormatError(f"field {f.number}: length {size}, expected 1..{f.max_len}")
    raise FormatError(f"field {f.number}: characters outside {f.kind}")


def is_digits(s: object, n: int) -> bool:
    """``s`` is a string of exactly ``n`` ASCII digits."""
    return isinstance(s, str) and len(s) == n and s.isascii() and s.isdigit()


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)

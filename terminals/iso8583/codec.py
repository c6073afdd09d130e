"""The codec the gateway and the terminal client use: the profile's fixed layout (contract §5)
compiled into one step per field, so that a message costs a few microseconds each way.

Decoding looks the bitmaps up in a bounded cache of plans (the fields they flag, in wire
order, each with its length and one compiled rule for its content: character class, length,
and the dates, field 54 and field 90 rules), then walks the bytes once. Encoding renders each
present field and assembles the bitmaps from the fields' bits. The MAC goes last, in 64, or
in 128 when a field above 64 is present, as in reference.py.

reference.py (on ``pyiso8583``) is the yardstick: the two encode every message of the profile
to the same bytes and refuse the same frames (tests/terminals/test_codec_equivalence.py). A
refusal found here is explained by the reference (``FormatError.reason``): it only runs for
frames that are refused anyway.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final, NamedTuple, NoReturn

from msgspec.structs import astuple

from engine.limits import ISO8583_CACHED_PLANS, TERMINAL_FIELD_MAX_FEN
from terminals.iso8583.header import SECONDARY_END, as_bytes, check_mti, read_header
from terminals.iso8583.message import DecodedFrame, FormatError, Message, is_digits, is_int
from terminals.iso8583.profile import BITMAP_LEN, FIELDS, MAC_PRIMARY, MAC_SECONDARY, MTI_LEN
from terminals.iso8583.profile import Field as _Field
from terminals.iso8583.reference import decode_message as _reference_decode
from terminals.iso8583.reference import encode_message_unmac as _reference_encode
from terminals.mac import MAC_LEN, compute_mac

__all__ = ["decode_message", "encode_message", "encode_message_unmac"]

# The value rules past class and length, as expressions (reference.py checks them in Python:
# profile.py's date checks, parse_amounts, parse_original; the equivalence tests hold the two
# together). Dates: month 01-12 with its days (Feb 29 allowed), hh < 24, mm and ss < 60.
_MMDD: Final = (
    "(?:(?:0[13578]|1[02])(?:0[1-9]|[12][0-9]|3[01])"
    "|(?:0[469]|11)(?:0[1-9]|[12][0-9]|30)"
    "|02(?:0[1-9]|[12][0-9]))"
)
_HHMMSS: Final = "(?:[01][0-9]|2[0-3])[0-5][0-9][0-5][0-9]"
_VALUE_RULES: Final = {
    7: _MMDD + _HHMMSS,
    12: _HHMMSS,
    13: _MMDD,
    54: "(?:[0-9]{7}[CD][0-9]{12}){1,6}",  # type (2), amount type (2), currency (3), sign, fen
    90: "[0-9]{20}0{22}",  # MTI, STAN, field 7, then zeros
}


def _rule(f: _Field) -> re.Pattern[bytes]:
    """The whole content of field ``f`` in one expression (a binary field: any 8 bytes)."""
    if f.kind == "b":
        return re.compile(b"(?s).{%d}" % f.max_len)
    return re.compile(_VALUE_RULES.get(f.number, f.pattern().pattern).encode())


# ---------------------------------------------------------------------------------------
# Decoding


class _Step(NamedTuple):
    """How to read one field: its Message attribute, length digits (0: fixed), its length
    or maximum, its rule, and how its bytes become the attribute's value."""

    attr: str
    len_type: int
    size: int
    match: Callable[[bytes, int, int], re.Match[bytes] | None]
    value: Callable[[bytes], object]


def _step(f: _Field) -> _Step:
    value: Callable[[bytes], object] = bytes if f.kind == "b" else bytes.decode
    if f.attr == "amount":
        value = int
    return _Step(f.attr, f.len_type, f.max_len, _rule(f).fullmatch, value)


_STEPS: Final = {f.number: _step(f) for f in FIELDS}


class _Plan(NamedTuple):
    """How to read the fields of one pair of bitmaps: where they start, each field's step in
    wire order, and whether a MAC (always last) follows them."""

    start: int
    steps: tuple[_Step, ...]
    mac: bool


_plans: dict[bytes, _Plan] = {}


def _plan_of(raw: bytes) -> _Plan:
    """The plan of ``raw``'s bitmaps, after the header's checks; raises FormatError."""
    secondary = len(raw) > MTI_LEN and raw[MTI_LEN] & 0x80
    bitmaps = raw[MTI_LEN : SECONDARY_END if secondary else MTI_LEN + BITMAP_LEN]
    plan = _plans.get(bitmaps)  # only a complete, valid pair of bitmaps is ever stored
    if plan is not None:
        check_mti(raw)
        return plan
    has_secondary, fields = read_header(raw)
    plan = _Plan(
        start=SECONDARY_END if has_secondary else MTI_LEN + BITMAP_LEN,
        steps=tuple(_STEPS[n] for n in fields if n not in (MAC_PRIMARY, MAC_SECONDARY)),
        mac=bool(fields) and fields[-1] in (MAC_PRIMARY, MAC_SECONDARY),
    )
    if len(_plans) < ISO8583_CACHED_PLANS:  # a peer sending ever new bitmaps fills no memory
        _plans[bitmaps] = plan
    return plan


def decode_message(raw: bytes | bytearray) -> DecodedFrame:
    """Decode one message (frame payload) of the profile.

    Returns the Message, its MAC (None if absent) and the bytes the MAC covers. Raises
    FormatError for anything malformed, including a MAC that is not the last field.
    """
    raw = as_bytes(raw)
    plan = _plan_of(raw)
    size, pos = len(raw), plan.start
    values: dict[str, Any] = {}
    for attr, len_type, length, match, value in plan.steps:
        if len_type:
            digits = raw[pos : pos + len_type]
            if not digits.isdigit():
                _refuse(raw)
            pos, length = pos + len_type, int(digits)
        end = pos + length
        if end > size or match(raw, pos, end) is None:
            _refuse(raw)
        values[attr] = value(raw[pos:end])
        pos = end
    fields_end = size - MAC_LEN if plan.mac else size  # the MAC, if any, is all that is left
    if pos != fields_end:
        _refuse(raw)
    message = Message(mti=raw[:MTI_LEN].decode(), **values)
    if not plan.mac:
        return DecodedFrame(message, None, b"")
    return DecodedFrame(message, raw[pos:], raw[:pos])


def _refuse(raw: bytes) -> NoReturn:
    """Raise the FormatError refusing ``raw``, with the reference's reason."""
    _reference_decode(raw)
    raise FormatError("refused by the profile")  # pragma: no cover - the codecs agree


# ---------------------------------------------------------------------------------------
# Encoding

# Each field's bit in the bitmaps read as one 128-bit number (field 1 the highest bit).
_BIT: Final = tuple(1 << (128 - n) if n else 0 for n in range(129))
_HIGH: Final = (1 << 64) - 1  # the bits of fields 65..128
_Wire = Callable[[object], "bytes | None"]


def _text_wire(f: _Field) -> _Wire:
    match, prefix = _rule(f).fullmatch, b"%%0%dd" % f.len_type if f.len_type else b""

    def wire(value: object) -> bytes | None:
        if not isinstance(value, str) or not value.isascii():
            return None
        data = value.encode()
        if match(data) is None:
            return None
        return prefix % len(data) + data if prefix else data

    return wire


def _amount_wire(value: object) -> bytes | None:
    if not is_int(value) or not 0 <= value <= TERMINAL_FIELD_MAX_FEN:
        return None
    return b"%012d" % value


def _binary_wire(f: _Field) -> _Wire:
    def wire(value: object) -> bytes | None:
        return value if isinstance(value, bytes) and len(value) == f.max_len else None

    return wire


def _wire_of(f: _Field) -> _Wire:
    if f.attr == "amount":
        return _amount_wire
    return _binary_wire(f) if f.kind == "b" else _text_wire(f)


# Message's fields after the MTI, in order: their bits and renderers (the table's order)
_PUTS: Final = tuple((_BIT[f.number], _wire_of(f)) for f in FIELDS)
assert tuple(f.attr for f in FIELDS) == Message.__struct_fields__[1:]


def encode_message(msg: Message, mac_key: bytes) -> bytes:
    """Encode ``msg`` and append its MAC as the last field (64, or 128 past field 64).

    Raises FormatError if a field breaks the profile.
    """
    body = _encode(msg, mac=True)
    return body + compute_mac(mac_key, body)


def encode_message_unmac(msg: Message) -> bytes:
    """Encode ``msg`` without a MAC (only for the unknown-terminal ``63`` answer)."""
    return _encode(msg, mac=False)


def _encode(msg: Message, *, mac: bool) -> bytes:
    mti, *values = astuple(msg)
    if not is_digits(mti, 4) or mti[0] != "0":
        _refuse_message(msg)
    bitmap, parts = 0, [mti.encode()]
    for (bit, wire), value in zip(_PUTS, values, strict=True):
        if value is not None:
            data = wire(value)
            if data is None:
                _refuse_message(msg)
            parts.append(data)
            bitmap |= bit
    if bitmap & _HIGH:
        bitmap |= _BIT[1] | (_BIT[MAC_SECONDARY] if mac else 0)
        parts.insert(1, bitmap.to_bytes(2 * BITMAP_LEN, "big"))
    else:
        bitmap |= _BIT[MAC_PRIMARY] if mac else 0
        parts.insert(1, (bitmap >> 64).to_bytes(BITMAP_LEN, "big"))
    return b"".join(parts)


def _refuse_message(msg: Message) -> NoReturn:
    """Raise the FormatError refusing ``msg``, with the reference's reason."""
    _reference_encode(msg)
    raise FormatError("refused by the profile")  # pragma: no cover - the codecs agree

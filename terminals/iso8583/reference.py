"""The reference codec of the profile, on top of the pinned ``pyiso8583``: encoding (the MAC
always the last field, 64 or 128) and decoding (the profile's field set, character classes,
date shapes and the MAC position, which the library does not check).

The gateway and the terminal client use the specialised codec (codec.py); this one is the
yardstick it is held to: tests/terminals/test_codec_equivalence.py checks that both encode
every message of the profile to the same bytes and refuse the same frames. It also explains,
for the specialised codec, why a frame or message is refused (``FormatError.reason``)."""

from __future__ import annotations

from typing import Any, Final

import iso8583

from engine.limits import TERMINAL_FIELD_MAX_FEN
from terminals.iso8583.header import as_bytes, read_header
from terminals.iso8583.message import DecodedFrame, FormatError, Message, is_digits, is_int
from terminals.iso8583.profile import CHECKS, HIGH_ATTRS, MAC_KEYS, SPEC, Field, check_field
from terminals.mac import MAC_LEN, compute_mac

_MAX_AMOUNT: Final = TERMINAL_FIELD_MAX_FEN  # field 4: 12 digits of fen
_MAC_HEX_PLACEHOLDER: Final = "00" * MAC_LEN

# ---------------------------------------------------------------------------------------
# Encoding


def encode_message(msg: Message, mac_key: bytes) -> bytes:
    """``codec.encode_message`` on top of the library."""
    doc = _to_doc(msg)
    # Encoding with a placeholder sets the MAC bit in the bitmap; the MAC, fixed-length and
    # last, then replaces the placeholder's final 8 bytes. Past field 64 it goes in 128.
    high = any(getattr(msg, attr) is not None for attr in HIGH_ATTRS)
    doc[MAC_KEYS[high]] = _MAC_HEX_PLACEHOLDER
    body = _lib_encode(doc)[:-MAC_LEN]
    return body + compute_mac(mac_key, body)


def encode_message_unmac(msg: Message) -> bytes:
    """``codec.encode_message_unmac`` on top of the library."""
    return _lib_encode(_to_doc(msg))


def _to_doc(msg: Message) -> dict[str, str]:
    if not isinstance(msg.mti, str) or not is_digits(msg.mti, 4) or msg.mti[0] != "0":
        raise FormatError("bad MTI")
    doc = {"t": msg.mti}
    for f, key, pattern in CHECKS:
        value = getattr(msg, f.attr)
        if value is not None:
            wire = _to_wire(f, value)
            check_field(f, pattern, wire)
            doc[key] = wire
    return doc


def _to_wire(f: Field, value: object) -> str:
    if f.attr == "amount":
        if not is_int(value) or not 0 <= value <= _MAX_AMOUNT:
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
    except iso8583.EncodeError as exc:  # pragma: no cover - check_field runs first
        raise FormatError(f"encode: {exc}") from None
    return bytes(raw)


# ---------------------------------------------------------------------------------------
# Decoding


def decode_message(raw: bytes | bytearray) -> DecodedFrame:
    """``codec.decode_message`` on top of the library."""
    raw = as_bytes(raw)
    secondary, _ = read_header(raw)  # first: the library would trip on fields off the profile
    try:
        doc, enc = iso8583.decode(raw, SPEC)
    except iso8583.DecodeError as exc:
        # The library blames the last field it decoded for trailing bytes; say what it is.
        if exc.msg.startswith("Extra data"):
            raise FormatError("trailing bytes after the last field") from None
        raise FormatError(f"field {exc.field}: {exc.msg}") from None
    values: dict[str, Any] = {}
    for f, key, pattern in CHECKS:
        wire = doc.get(key)
        if wire is not None:
            # the library reads a length prefix with int(): " 5", "+5" and "0_5" would pass
            if f.len_type and not enc[key]["len"].isdigit():
                raise FormatError(f"field {f.number}: length prefix is not digits")
            check_field(f, pattern, wire)
            values[f.attr] = _from_wire(f, wire)
    message = Message(mti=doc["t"], **values)
    mac_key = MAC_KEYS[secondary]
    if mac_key not in doc:
        return DecodedFrame(message, None, b"")
    return DecodedFrame(message, bytes.fromhex(doc[mac_key]), raw[:-MAC_LEN])


def _from_wire(f: Field, wire: str) -> object:
    if f.attr == "amount":
        return int(wire)
    if f.kind == "b":
        return bytes.fromhex(wire)
    return wire

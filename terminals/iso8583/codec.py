"""The codec of the profile, on top of the pinned ``pyiso8583``: encoding (the MAC always the
last field, 64 or 128), decoding (the profile's field set, character classes, date shapes and
the MAC position, which the library does not check), and salvage (what can still be read of a
frame the decoder refused, so that its ``30`` answer can be MACed and paired)."""

from __future__ import annotations

from typing import Any, Final

import iso8583

from engine.limits import TERMINAL_FIELD_MAX_FEN
from terminals.iso8583.message import DecodedFrame, FormatError, Message, is_digits, is_int
from terminals.iso8583.profile import (
    BITMAP_LEN,
    CHECKS,
    HIGH_ATTRS,
    MAC_KEYS,
    MAC_PRIMARY,
    MTI_LEN,
    PROFILE,
    SPEC,
    Field,
    check_field,
)
from terminals.mac import MAC_LEN, compute_mac

_MAX_AMOUNT: Final = TERMINAL_FIELD_MAX_FEN  # field 4: 12 digits of fen
_MAC_HEX_PLACEHOLDER: Final = "00" * MAC_LEN

# ---------------------------------------------------------------------------------------
# Encoding


def encode_message(msg: Message, mac_key: bytes) -> bytes:
    """Encode ``msg`` and append its MAC as the last field (64, or 128 past field 64).

    Raises FormatError if a field breaks the profile.
    """
    doc = _to_doc(msg)
    # Encoding with a placeholder sets the MAC bit in the bitmap; the MAC, fixed-length and
    # last, then replaces the placeholder's final 8 bytes. Past field 64 it goes in 128.
    high = any(getattr(msg, attr) is not None for attr in HIGH_ATTRS)
    doc[MAC_KEYS[high]] = _MAC_HEX_PLACEHOLDER
    body = _lib_encode(doc)[:-MAC_LEN]
    return body + compute_mac(mac_key, body)


def encode_message_unmac(msg: Message) -> bytes:
    """Encode ``msg`` without a MAC (only for the unknown-terminal ``63`` answer)."""
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
    for f, key, pattern in CHECKS:
        wire = doc.get(key)
        if wire is not None:
            check_field(f, pattern, wire)
            values[f.attr] = _from_wire(f, wire)
    message = Message(mti=doc["t"], **values)
    mac_key = MAC_KEYS[secondary]
    if mac_key not in doc:
        return DecodedFrame(message, None, b"")
    return DecodedFrame(message, bytes.fromhex(doc[mac_key]), raw[:-MAC_LEN])


def _check_header(raw: bytes) -> bool:
    """Validate MTI and bitmaps against the profile; return whether a secondary is present.

    Done before the library runs because it looks up every flagged field in the spec (a
    field outside the profile would be a KeyError) and reads field 65 as a tertiary bitmap.
    """
    if len(raw) < MTI_LEN + BITMAP_LEN:
        raise FormatError("truncated before the end of the primary bitmap")
    if not raw[:MTI_LEN].isdigit() or raw[0:1] != b"0":
        raise FormatError("bad MTI")
    fields = _bits(raw[MTI_LEN : MTI_LEN + BITMAP_LEN], 0)
    secondary = 1 in fields
    if secondary:
        start = MTI_LEN + BITMAP_LEN
        if len(raw) < start + BITMAP_LEN:
            raise FormatError("truncated inside the secondary bitmap")
        high = _bits(raw[start : start + BITMAP_LEN], 64)
        if not high:
            raise FormatError("secondary bitmap present without fields above 64")
        fields = (fields - {1}) | high
    unknown = fields - PROFILE
    if unknown:
        raise FormatError(f"field {min(unknown)} is not in the profile")
    if secondary and MAC_PRIMARY in fields:
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


def _from_wire(f: Field, wire: str) -> object:
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
_BY_NUMBER: Final = {f.number: (f, pattern) for f, _, pattern in CHECKS}


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
    if len(raw) < MTI_LEN or not raw[:MTI_LEN].isdigit():
        return None
    found: dict[str, str] = {}  # the salvaged fields are all text: their wire form is the value
    pos = MTI_LEN + BITMAP_LEN
    primary = _bits(raw[MTI_LEN:pos], 0) if len(raw) >= pos else set()
    if 1 in primary:
        pos += BITMAP_LEN  # a truncated secondary bitmap leaves nothing to read below
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
                check_field(f, pattern, wire)
            except FormatError:
                continue  # malformed itself: not echoed, but the walk goes on
            found[f.attr] = wire
    return Message(
        mti=raw[:MTI_LEN].decode(),
        transmission_dt=found.get("transmission_dt"),
        stan=found.get("stan"),
        terminal_id=found.get("terminal_id"),
    )


def _delimit(f: Field, raw: bytes, pos: int) -> tuple[str, int] | None:
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

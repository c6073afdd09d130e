"""The head of a message: MTI and bitmaps, checked against the profile, and the field numbers
a bitmap flags. Shared by both codecs (codec.py, reference.py) and the salvage of refused
frames, so that all three read a header the same way."""

from __future__ import annotations

from typing import Final

from terminals.iso8583.message import FormatError
from terminals.iso8583.profile import BITMAP_LEN, MAC_PRIMARY, MTI_LEN, PROFILE

SECONDARY_END: Final = MTI_LEN + 2 * BITMAP_LEN


def as_bytes(raw: object) -> bytes:
    """A message's payload as bytes (a bytearray copied); raises FormatError for anything
    else."""
    if not isinstance(raw, bytes | bytearray):
        raise FormatError("message must be bytes")
    return bytes(raw)


def check_mti(raw: bytes) -> None:
    """Raise FormatError unless ``raw`` starts with four ASCII digits, the first a 0 (1987)."""
    if not raw[:MTI_LEN].isdigit() or raw[:1] != b"0":
        raise FormatError("bad MTI")


def read_header(raw: bytes) -> tuple[bool, list[int]]:
    """Validate MTI and bitmaps against the profile; return whether a secondary bitmap is
    present and the data fields flagged, in wire order (the bitmaps excluded)."""
    if len(raw) < MTI_LEN + BITMAP_LEN:
        raise FormatError("truncated before the end of the primary bitmap")
    check_mti(raw)
    fields = bits(raw[MTI_LEN : MTI_LEN + BITMAP_LEN], 0)
    secondary = 1 in fields
    if secondary:
        if len(raw) < SECONDARY_END:
            raise FormatError("truncated inside the secondary bitmap")
        high = bits(raw[MTI_LEN + BITMAP_LEN : SECONDARY_END], 64)
        if not high:
            raise FormatError("secondary bitmap present without fields above 64")
        fields = (fields - {1}) | high
    unknown = fields - PROFILE
    if unknown:
        raise FormatError(f"field {min(unknown)} is not in the profile")
    if secondary and MAC_PRIMARY in fields:
        raise FormatError("MAC in field 64 with a secondary bitmap: MAC is not the last field")
    return secondary, sorted(fields)


def bits(bitmap: bytes, offset: int) -> set[int]:
    """The field numbers ``bitmap`` flags, its first bit being field ``offset + 1``."""
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

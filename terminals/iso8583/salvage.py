"""Salvage: what can still be read of a frame the decoder refused, so that its ``30`` answer
can be MACed and paired (contract §5: every answer to a known terminal carries a MAC)."""

from __future__ import annotations

from typing import Final

from terminals.iso8583.header import bits
from terminals.iso8583.message import FormatError, Message
from terminals.iso8583.profile import BITMAP_LEN, CHECKS, MTI_LEN, Field, check_field

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
    primary = bits(raw[MTI_LEN:pos], 0) if len(raw) >= pos else set()
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

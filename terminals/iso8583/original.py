"""Field 90, original data elements: what a reversal names of the message it takes back
(its MTI, STAN and field 7), padded with zeros to 42 digits."""

from __future__ import annotations

from typing import Final

import msgspec

from terminals.iso8583.message import FormatError, is_digits


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

"""The onecard ISO 8583:1987 profile (contract §5).

Wire shape: ASCII MTI, binary primary bitmap, binary secondary bitmap only when a field above
64 is present, ASCII fields, and the MAC (field 64, or 128 with a secondary bitmap) always
last. The wire is encoded and decoded by a codec specialised to this fixed profile; the pinned
``pyiso8583`` with the profile's checks on top (the field set, character classes, date shapes,
the MAC position) is its reference.

``message`` holds the vocabulary (message types, codes, Message), ``profile`` the field table
and the library spec, ``header`` the MTI and bitmaps, ``codec`` the specialised encoding and
decoding, ``reference`` the same on top of the library (the yardstick the tests hold
``codec`` to), ``salvage`` what can be read of a refused frame, ``amounts`` field 54 and
``original`` field 90. This module is the package's public face: what the gateway, the
terminal client and the simulator use; the modules inside import each other directly.
"""

from terminals.iso8583.amounts import AmountBlock, encode_amounts, parse_amounts
from terminals.iso8583.codec import decode_message, encode_message, encode_message_unmac
from terminals.iso8583.message import (
    AccountType,
    DecodedFrame,
    FormatError,
    Message,
    Mti,
    ProcessingCode,
    ResponseCode,
    is_digits,
    response_mti,
)
from terminals.iso8583.original import OriginalData, encode_original, parse_original
from terminals.iso8583.profile import SPEC
from terminals.iso8583.salvage import salvage

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

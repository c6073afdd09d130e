"""Field 54, additional amounts: one to six 20-character blocks, each an account type, an
amount type, a currency and a signed amount of fen (contract §5)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import msgspec

from engine.limits import TERMINAL_FIELD_MAX_FEN
from terminals.iso8583.message import FormatError, is_digits, is_int

_BLOCK_LEN: Final = 20
_MAX_BLOCKS: Final = 6  # 120 / 20, the LLLVAR maximum of field 54
_MAX_AMOUNT: Final = TERMINAL_FIELD_MAX_FEN  # 12 digits of fen
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
        if not is_int(b.amount) or abs(b.amount) > _MAX_AMOUNT:
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

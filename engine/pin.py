"""Card PINs (contract §5, field 52): the check belongs to the card, the key to the terminal.

A PIN block is the first 8 bytes of HMAC-SHA256, keyed by the terminal's key, over the ASCII of
``card_no + ":" + pin``. The terminal side (``terminals/mac.py``) re-exports these functions
so both ends compute the block from one definition.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

PIN_BLOCK_LEN: Final = 8


def pin_block(key: bytes, card_no: str, pin: str) -> bytes:
    """Return the field 52 PIN block for ``card_no`` and ``pin`` under the terminal ``key``.

    Raises UnicodeEncodeError (a ValueError) if either part is not ASCII.
    """
    data = f"{card_no}:{pin}".encode("ascii")
    return hmac.new(key, data, hashlib.sha256).digest()[:PIN_BLOCK_LEN]


def verify_pin(key: bytes, card_no: str, pin: str, block: bytes) -> bool:
    """Check a field 52 PIN block against the card's PIN in constant time."""
    try:
        expected = pin_block(key, card_no, pin)
    except UnicodeEncodeError:
        # A stored PIN is digits; a non-ASCII one can never have produced a valid block.
        return False
    return hmac.compare_digest(expected, block)

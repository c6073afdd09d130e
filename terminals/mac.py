"""Terminal MAC and PIN blocks (contract §5): truncated HMAC-SHA256 under the terminal key."""

from __future__ import annotations

import hmac
import re
from typing import Final

# The PIN block is a card rule checked by the engine; the terminal computes it the same way.
from engine.campus.pin import PIN_BLOCK_LEN, pin_block, verify_pin

__all__ = [
    "KEY_HEX_LEN",
    "MAC_LEN",
    "PIN_BLOCK_LEN",
    "compute_mac",
    "parse_key",
    "pin_block",
    "verify_mac",
    "verify_pin",
]

MAC_LEN: Final = 8
KEY_HEX_LEN: Final = 64

# bytes.fromhex alone would also accept whitespace, so the shape is checked first.
_KEY_RE: Final = re.compile(r"[0-9A-Fa-f]{64}")


def parse_key(hex64: str) -> bytes:
    """Turn the API form of a terminal key (64 hex chars) into its 32 raw bytes.

    Raises ValueError for anything else.
    """
    if not isinstance(hex64, str) or _KEY_RE.fullmatch(hex64) is None:
        raise ValueError("terminal key must be exactly 64 hex characters")
    return bytes.fromhex(hex64)


def compute_mac(key: bytes, data: bytes) -> bytes:
    """Return the MAC of ``data``: the first 8 bytes of HMAC-SHA256 keyed by ``key``."""
    return hmac.digest(key, data, "sha256")[:MAC_LEN]  # one call, no HMAC object


def verify_mac(key: bytes, data: bytes, mac: bytes) -> bool:
    """Check ``mac`` against ``data`` in constant time."""
    return hmac.compare_digest(compute_mac(key, data), mac)

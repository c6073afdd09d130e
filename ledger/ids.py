"""Transfer ids that sort by time.

A transfer's id is its idempotency key and the primary key of an append-only table. Random ids
(UUIDv4, or plain hashes such as uuid5) put every insert, and every "does this id exist yet?"
check, on a random leaf of that index: on a ledger of ten million transfers each batch walks
thousands of cold leaves. Ids that begin with the time they were made (UUIDv7, RFC 9562) keep
a day's inserts on the few leaves at the index's edge, as an append-only table's keys should.
``bench scale`` measures the difference (README, Performance). Clients choose their ids, so this
is a recommendation for them; the ids the engine derives itself (terminal requests, the parts
of a split payment, reversals) follow it.

Derived ids stay deterministic (a retried request must derive the same id): the time prefix
comes from the request itself, never from the clock of the process deriving it.
"""

from __future__ import annotations

import hashlib
from typing import Final
from uuid import UUID

PREFIX_BITS: Final = 48  # RFC 9562 layout: 48-bit time, 4-bit version, 12 + 2 + 62 bits
_PREFIX_MAX: Final = (1 << PREFIX_BITS) - 1
_RAND_BITS: Final = 74
_VERSION_7: Final = 7 << 76
_VERSION_8: Final = 8 << 76
_VARIANT: Final = 0b10 << 62


def _layout(prefix: int, rand: int, version: int) -> UUID:
    if not 0 <= prefix <= _PREFIX_MAX:
        raise ValueError(f"time prefix {prefix} does not fit {PREFIX_BITS} bits")
    rand &= (1 << _RAND_BITS) - 1
    high, low = rand >> 62, rand & ((1 << 62) - 1)  # 12 bits after the version, 62 after variant
    return UUID(int=(prefix << 80) | version | (high << 64) | _VARIANT | low)


def uuid7(unix_ms: int, rand: int) -> UUID:
    """A UUIDv7: ``unix_ms`` (milliseconds since 1970, 48 bits), then 74 bits of ``rand``."""
    return _layout(unix_ms, rand, _VERSION_7)


def ordered(prefix: int, *parts: bytes) -> UUID:
    """A deterministic UUIDv8 that sorts by ``prefix`` (any 48-bit time-like number of the
    caller's choosing); the other 74 bits are a SHA-256 of ``parts`` (so distinct parts give
    distinct ids, as uuid5 would)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(4, "big"))  # length-prefixed: concatenation is unambiguous
        h.update(p)
    return _layout(prefix, int.from_bytes(h.digest()[:10], "big"), _VERSION_8)


def child(parent: UUID, name: str) -> UUID:
    """An id derived from ``parent`` and ``name`` that sorts next to ``parent`` (same 48-bit
    prefix): the transfers one request posts land beside each other in the index."""
    return ordered(parent.int >> 80, parent.bytes, name.encode())

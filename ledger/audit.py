"""The audit hash chain: each committed batch extends a per-ledger SHA-256 chain.

``head = sha256(prev_head || canonical(batch))`` where ``canonical`` is the JSON array of the
batch's transfers in timestamp order, each as a fixed-order array of its stored fields. Any
changed, inserted or deleted transfer row changes some batch's digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final
from uuid import UUID

import msgspec

GENESIS: Final = "0" * 64

_encode = msgspec.json.Encoder().encode

Row = tuple[UUID, int, int, int, int, UUID | None, int, int, int, str | None, int]
"""(id, ledger, debit, credit, amount, pending_id, code, flags, timeout_s, user_data, ts)."""


def extend(prev_head: str, rows: Iterable[Row]) -> str:
    """The chain head after appending a batch of transfer rows (in timestamp order)."""
    payload = _encode(list(rows))
    return hashlib.sha256(prev_head.encode() + payload).hexdigest()

"""Localising a broken audit batch of ``onecard verify``: the row inserted into it, or the
row whose amount was changed (pure: hashes only)."""

from __future__ import annotations

from typing import Final

import msgspec

from ledger import audit

# An over-full audit batch up to this size is searched for the one inserted row (n hashes of n
# rows each); larger ones are reported as a whole.
LOCALISE_MAX_ROWS: Final = 256
_ZERO: Final = [0, 0, 0, 0]


class Batch(msgspec.Struct, frozen=True):
    """An ``audit_batches`` row."""

    first: int
    last: int
    count: int
    prev_head: str
    head: str


def find_inserted(b: Batch, rows: list[audit.Row]) -> audit.Row | None:
    if len(rows) > LOCALISE_MAX_ROWS:
        return None
    for i in range(len(rows)):
        if audit.extend(b.prev_head, rows[:i] + rows[i + 1 :]) == b.head:
            return rows[i]
    return None


def find_changed_amount(
    b: Batch, rows: list[audit.Row], deltas: dict[int, list[int]]
) -> tuple[audit.Row, int] | None:
    if len(rows) > LOCALISE_MAX_ROWS or not deltas:
        return None
    for i, r in enumerate(rows):
        tries = {deltas.get(r[2], _ZERO)[0], deltas.get(r[3], _ZERO)[1]} - {0}
        for delta in tries:
            original = r[4] - delta
            fixed: audit.Row = (*r[:4], original, *r[5:])
            if audit.extend(b.prev_head, [*rows[:i], fixed, *rows[i + 1 :]]) == b.head:
                return r, original
    return None

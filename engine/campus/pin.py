"""Card PINs (contract §5, field 52): the check belongs to the card, the key to the terminal.

A PIN block is the first 8 bytes of HMAC-SHA256, keyed by the terminal's key, over the ASCII of
``card_no + ":" + pin``. The terminal side (``terminals/mac.py``) re-exports these functions
so both ends compute the block from one definition.

Wrong PINs are counted per card and campus-local day in ``pin_tries`` (shared by every
process): after ``limits.PIN_TRIES_PER_DAY`` of them every PIN check of the card fails, the
right PIN too, until the next local day or the card office's reset.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from datetime import date
from typing import Final
from zoneinfo import ZoneInfo

import asyncpg
import msgspec

from engine import limits
from engine.calendar import local_date
from engine.campus.model import Outcome, Terminal
from engine.campus.reads import campus_coalescer
from engine.db.coalesce import Coalescer, Connection

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


# -- PIN tries ---------------------------------------------------------------------------------

# Wrong PINs (contract §5 v4), counted and read when each check is decided. $2..$4: one row per
# (card, day) of a batch of PIN checks and how many of them were wrong; each row answers the
# failures counted before the batch's own. Wrong PINs are added under the row's lock, so no
# two processes count from the same number; rows are taken in card order (no deadlocks).
SQL_PIN_TRIES = """
WITH q AS (
    SELECT * FROM unnest($2::text[], $3::date[], $4::bigint[]) AS q(card_no, day, wrong)
), counted AS (
    INSERT INTO pin_tries AS p (ledger, card_no, day, failures, updated_at)
    SELECT $1, q.card_no, q.day, q.wrong, $5 FROM q WHERE q.wrong > 0
    ORDER BY q.card_no, q.day
    ON CONFLICT (ledger, card_no, day) DO UPDATE
        SET failures = p.failures + excluded.failures, updated_at = excluded.updated_at
    RETURNING p.card_no, p.day, p.failures
)
SELECT q.card_no, q.day, coalesce(c.failures - q.wrong, p.failures, 0) AS before
FROM q
LEFT JOIN counted c ON c.card_no = q.card_no AND c.day = q.day
LEFT JOIN pin_tries p ON q.wrong = 0 AND p.ledger = $1 AND p.card_no = q.card_no
                     AND p.day = q.day
"""
SQL_RESET_PIN_TRIES = "DELETE FROM pin_tries WHERE ledger = $1 AND card_no = $2"


class _PinTry(msgspec.Struct, frozen=True):
    """One PIN check of a card on a campus-local day; ``wrong``: a wrong PIN block was sent
    (counted). A right or missing one only asks for the count."""

    card_no: str
    day: date
    wrong: bool


class PinTries:
    """PIN checks of terminal requests, with the day's wrong PINs counted in one shared
    statement per batch (one per Campus)."""

    def __init__(self, pool: Callable[[], asyncpg.Pool], *, tz: ZoneInfo, max_batch: int) -> None:
        self._tz = tz
        self._tries: Coalescer[_PinTry, int] = campus_coalescer(
            pool, _count_pin_tries, max_batch=max_batch, name="pins")

    @property
    def statements(self) -> int:
        """Shared statements run so far (each serves a batch of PIN checks)."""
        return self._tries.statements

    async def refusal(
        self, term: Terminal, card_no: str, pin: str | None, day_start: int,
        pin_block: bytes | None, *, required: bool,
    ) -> Outcome | None:
        """None when the PIN lets the request through (the card has no ``pin``, none is asked
        for, or the right one within the day's tries), else INCORRECT_PIN or
        PIN_TRIES_EXCEEDED. ``day_start``: the campus-local day's start (engine ns).

        Every PIN check asks ``pin_tries`` at decision time, the right PIN too: a stale count
        would let a burst of guesses sent at once all see "no failures yet". A missing PIN is
        not a guess (not counted) but is refused 75 once the tries are used up, like any."""
        if pin is None or not required:
            return None
        right = pin_block is not None and verify_pin(term.mac_key, card_no, pin, pin_block)
        attempt = _PinTry(card_no, local_date(day_start, self._tz),
                          pin_block is not None and not right)
        failures = await self._tries.ask(term.ledger, attempt)
        if failures >= limits.PIN_TRIES_PER_DAY:
            return Outcome.PIN_TRIES_EXCEEDED
        return None if right else Outcome.INCORRECT_PIN


async def _count_pin_tries(conn: Connection, ledger: int, tries: list[_PinTry]) -> list[int]:
    """The failures counted before each attempt of the batch (wrong ones are counted in the
    batch's order: the sixth wrong PIN of a day sees five)."""
    wrong: dict[tuple[str, date], int] = {}
    for t in tries:
        wrong[(t.card_no, t.day)] = wrong.get((t.card_no, t.day), 0) + t.wrong
    rows = await conn.fetch(SQL_PIN_TRIES, ledger, [c for c, _ in wrong], [d for _, d in wrong],
                            list(wrong.values()), time.time_ns())
    running = {(r["card_no"], r["day"]): r["before"] for r in rows}
    out = []
    for t in tries:
        n = running[(t.card_no, t.day)]
        out.append(n)
        running[(t.card_no, t.day)] = n + t.wrong
    return out

"""What a holder may do to their own card: report it lost or found, change its PIN, and set a
daily limit of their own.

Report-lost and found are the card office's transitions (``Campus.report_lost`` /
``card_found``: the purses freeze and thaw in the card's own transaction); here they are only
ever applied to a card of the logged-in holder. The PIN change checks the old PIN and writes
the new one, sealed like every stored PIN, under the card row's lock (no other change of the
card can slip in between), and a wrong old PIN counts towards the card's wrong PINs of the day
exactly as one typed at a terminal does: a stolen session must not become a PIN oracle that
the terminals' limit of ``limits.PIN_TRIES_PER_DAY`` does not see.

The holder's own daily limit (``holder_limits``) only ever tightens the card office's: every
payment is checked against the lower of the two (the campus's card state read), so a student
can cap their own spending below what the card office allows, and never raise it above. It
belongs to the holder, so a replacement card keeps it.
"""

from __future__ import annotations

import enum
import hmac
import logging
import re
import time
from typing import Final

import asyncpg
import msgspec

from engine import limits
from engine.access.secretbox import SecretError, seal_pin
from engine.calendar import local_date
from engine.campus import Campus, Card, CardStatus, Refused
from engine.campus.secrets import card_pin
from engine.selfservice.holders import HolderRef

log = logging.getLogger(__name__)

_PIN: Final = re.compile(r"[0-9]{4,6}", re.ASCII)  # the cards table's CHECK

SQL_CARDS: Final = """
SELECT card_no, status FROM cards WHERE ledger = $1 AND holder_id = $2
ORDER BY status = 'active' DESC, status = 'lost' DESC, updated_at DESC, card_no
"""
SQL_LOCK_PIN: Final = """
SELECT pin, pin_enc FROM cards
WHERE ledger = $1 AND card_no = $2 AND holder_id = $3 AND status = 'active' FOR UPDATE
"""
# The new PIN is stored sealed only (secrets at rest, migration 0010); a clear one goes.
SQL_SET_PIN: Final = """
UPDATE cards SET pin = NULL, pin_enc = $3, updated_at = $4 WHERE ledger = $1 AND card_no = $2
"""
SQL_PIN_FAILURES: Final = """
SELECT failures FROM pin_tries WHERE ledger = $1 AND card_no = $2 AND day = $3
"""
SQL_WRONG_PIN: Final = """
INSERT INTO pin_tries AS p (ledger, card_no, day, failures, updated_at) VALUES ($1, $2, $3, 1, $4)
ON CONFLICT (ledger, card_no, day) DO UPDATE
    SET failures = p.failures + 1, updated_at = excluded.updated_at
"""
SQL_SET_LIMIT: Final = """
INSERT INTO holder_limits (ledger, holder_id, daily_limit, updated_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (ledger, holder_id) DO UPDATE
    SET daily_limit = excluded.daily_limit, updated_at = excluded.updated_at
"""
SQL_CLEAR_LIMIT: Final = "DELETE FROM holder_limits WHERE ledger = $1 AND holder_id = $2"


class CardChange(enum.StrEnum):
    """The answer to report-lost or found (the page's ``#result data-status``)."""

    DONE = "done"  # the card is now lost (or active again)
    UNCHANGED = "unchanged"  # it already was
    NO_CARD = "no_card"  # the holder has no card this applies to
    REFUSED = "refused"  # e.g. found while another card of the holder is active


class PinChange(enum.StrEnum):
    """The answer to a PIN change (``#result data-status``)."""

    CHANGED = "changed"
    WRONG_PIN = "wrong_pin"  # the old PIN is not the card's (counted as a wrong PIN)
    TRIES_EXCEEDED = "pin_tries_exceeded"  # too many wrong PINs today: nothing is checked
    INVALID_PIN = "invalid_pin"  # the new PIN is not 4 to 6 digits
    NO_CARD = "no_card"  # no active card


class OwnCard(msgspec.Struct, frozen=True):
    """A card of the holder's."""

    card_no: str
    status: CardStatus


async def holder_cards(pool: asyncpg.Pool, ref: HolderRef) -> list[OwnCard]:
    """The holder's cards: the active one first, then lost ones, then the rest, newest first."""
    async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
        rows = await conn.fetch(SQL_CARDS, ref.ledger, ref.holder_id)
    return [OwnCard(r["card_no"], CardStatus(r["status"])) for r in rows]


def _change(result: Card | Refused, target: CardStatus, before: CardStatus) -> CardChange:
    if isinstance(result, Refused):
        return CardChange.REFUSED
    if result.status is not target:
        return CardChange.REFUSED
    return CardChange.UNCHANGED if before is target else CardChange.DONE


def pick(cards: list[OwnCard], card_no: str | None, status: CardStatus) -> OwnCard | None:
    """The card an action applies to: the one named (the caller checked it is the holder's),
    else the holder's first card in ``status``."""
    if card_no is not None:
        return next((c for c in cards if c.card_no == card_no), None)
    return next((c for c in cards if c.status is status), None)


async def report_lost(campus: Campus, ref: HolderRef, *, card_no: str | None = None) -> CardChange:
    """Report the holder's active card (or the one named) lost: its purses freeze at once.
    With no active card: UNCHANGED when a card is already lost, else NO_CARD."""
    cards = await holder_cards(campus.engine.store.pool, ref)
    card = pick(cards, card_no, CardStatus.ACTIVE)
    if card is None or card.status is not CardStatus.ACTIVE:
        if card is not None and card.status is not CardStatus.LOST:
            return CardChange.REFUSED  # a replaced or closed card is not lost any more
        lost = card is not None or any(c.status is CardStatus.LOST for c in cards)
        return CardChange.UNCHANGED if lost else CardChange.NO_CARD
    return _change(await campus.report_lost(card.card_no), CardStatus.LOST, card.status)


async def report_found(campus: Campus, ref: HolderRef, *, card_no: str | None = None) -> CardChange:
    """The holder's lost card (or the one named) is active again, unless another card of
    theirs is active meanwhile (REFUSED)."""
    cards = await holder_cards(campus.engine.store.pool, ref)
    card = pick(cards, card_no, CardStatus.LOST)
    if card is None or card.status is not CardStatus.LOST:
        if card is not None and card.status is not CardStatus.ACTIVE:
            return CardChange.REFUSED
        active = card is not None or any(c.status is CardStatus.ACTIVE for c in cards)
        return CardChange.UNCHANGED if active else CardChange.NO_CARD
    return _change(await campus.card_found(card.card_no), CardStatus.ACTIVE, card.status)


def valid_pin(pin: str) -> bool:
    """A PIN a card can hold: 4 to 6 ASCII digits."""
    return _PIN.fullmatch(pin) is not None


async def change_pin(
    campus: Campus, ref: HolderRef, old_pin: str, new_pin: str, *, card_no: str | None = None
) -> PinChange:
    """Change the PIN of the holder's active card (or the one named, if active) from
    ``old_pin`` (empty for a card without a PIN) to ``new_pin``. The check and the write happen
    in one transaction under the card's row lock; a wrong old PIN is counted in ``pin_tries``
    and nothing else changes."""
    if not valid_pin(new_pin):
        return PinChange.INVALID_PIN
    pool = campus.engine.store.pool
    card = pick(await holder_cards(pool, ref), card_no, CardStatus.ACTIVE)
    if card is None or card.status is not CardStatus.ACTIVE:
        return PinChange.NO_CARD
    now = time.time_ns()
    day = local_date(now, campus.tz)
    async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
        row = await conn.fetchrow(SQL_LOCK_PIN, ref.ledger, card.card_no, ref.holder_id)
        if row is None:  # replaced or reported lost meanwhile
            return PinChange.NO_CARD
        failures = await conn.fetchval(SQL_PIN_FAILURES, ref.ledger, card.card_no, day) or 0
        if failures >= limits.PIN_TRIES_PER_DAY:
            return PinChange.TRIES_EXCEEDED
        try:
            stored = card_pin(campus.secrets, ref.ledger, card.card_no, row) or ""
        except SecretError as e:  # nobody can prove this PIN: not a guess, nothing counted
            log.error("self-service: the PIN of card %s does not open: %s", card.card_no, e)
            return PinChange.WRONG_PIN
        if not hmac.compare_digest(stored.encode(), old_pin.encode("utf-8", "replace")):
            await conn.execute(SQL_WRONG_PIN, ref.ledger, card.card_no, day, now)
            return PinChange.WRONG_PIN
        sealed = seal_pin(campus.secrets, ref.ledger, card.card_no, new_pin)
        await conn.execute(SQL_SET_PIN, ref.ledger, card.card_no, sealed, now)
    return PinChange.CHANGED


async def set_own_limit(pool: asyncpg.Pool, ref: HolderRef, daily_limit: int | None) -> None:
    """Set the holder's own daily limit (fen), or remove it (None)."""
    async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
        if daily_limit is None:
            await conn.execute(SQL_CLEAR_LIMIT, ref.ledger, ref.holder_id)
        else:
            await conn.execute(SQL_SET_LIMIT, ref.ledger, ref.holder_id, daily_limit,
                               time.time_ns())

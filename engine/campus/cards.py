"""The card office's cards (contract §2, used by the HTTP API): issuing a card to a holder,
its state machine (lost, found, closed, replaced), the PIN-tries reset and the card's balance.
Each operation answers its result or a :class:`~engine.campus.model.Refused` with the reason;
issuing the same card again answers it unchanged.

Card changes run in one transaction under the holder's row lock and re-derive the purses'
frozen flag in it: the purses are frozen exactly while the holder has a lost card and no
active one, and a lost card with unfrozen purses is never visible.
"""

from __future__ import annotations

import time

import asyncpg
import msgspec

from engine.access.secretbox import SecretBox, seal_pin
from engine.campus.model import (
    Card,
    CardBalance,
    CardStatus,
    Purse,
    Refusal,
    Refused,
    Replacement,
)
from engine.campus.pin import SQL_RESET_PIN_TRIES
from engine.campus.registry import CARD_LOCK, SQL_ADVISORY_LOCK
from engine.campus.secrets import card_pin
from engine.campus.shared import connection
from engine.service import Engine
from ledger.types import AccountFlags, AccountKind

# -- SQL ---------------------------------------------------------------------------------------

SQL_HOLDER_LEDGERS = "SELECT ledger FROM holders WHERE id = $1 ORDER BY ledger LIMIT 2"
SQL_LOCK_HOLDER = "SELECT id FROM holders WHERE ledger = $1 AND id = $2 FOR UPDATE"
_CARD_COLS = (
    "c.card_no, c.ledger, c.holder_id, c.status, c.daily_limit, c.pin, c.pin_enc, "
    "c.pin_threshold, c.replaced_by"
)
SQL_CARD_BY_NO = f"SELECT {_CARD_COLS} FROM cards c WHERE c.card_no = $1 ORDER BY c.ledger"
SQL_ACTIVE_CARD = """
SELECT card_no FROM cards WHERE ledger = $1 AND holder_id = $2 AND status = 'active'
"""
SQL_INSERT_CARD = """
INSERT INTO cards (ledger, card_no, holder_id, status, daily_limit, pin_enc, pin_threshold,
                   created_at, updated_at)
VALUES ($1, $2, $3, 'active', $4, $5, $6, $7, $7)
"""
SQL_SET_CARD_STATUS = """
UPDATE cards SET status = $3, replaced_by = $4, updated_at = $5
WHERE ledger = $1 AND card_no = $2
"""
# The purses are frozen exactly while the holder has a lost card and no active one. Run in the
# card change's own transaction: a lost card and unfrozen purses are never visible together.
# The purse rows are locked first, in id order like every batch does, so the two cannot deadlock.
SQL_LOCK_PURSES = """
SELECT a.id FROM holders h
JOIN accounts a ON a.ledger = h.ledger AND a.id IN (h.purse_account_id, h.subsidy_account_id)
WHERE h.ledger = $1 AND h.id = $2
ORDER BY a.id FOR UPDATE OF a
"""
SQL_SYNC_FREEZE = f"""
UPDATE accounts a
SET flags = CASE WHEN f.frozen THEN a.flags | {int(AccountFlags.FROZEN)}
                 ELSE a.flags & ~{int(AccountFlags.FROZEN)} END
FROM (SELECT EXISTS (SELECT 1 FROM cards WHERE ledger = $1 AND holder_id = $2
                     AND status = 'lost')
         AND NOT EXISTS (SELECT 1 FROM cards WHERE ledger = $1 AND holder_id = $2
                         AND status = 'active') AS frozen) f,
     holders h
WHERE h.ledger = $1 AND h.id = $2 AND a.ledger = $1
  AND a.id IN (h.purse_account_id, h.subsidy_account_id)
"""
SQL_PURSES = """
SELECT a.id, a.kind, a.credits_posted - a.debits_posted AS balance,
       a.credits_posted - a.debits_posted - a.debits_pending AS available
FROM holders h JOIN accounts a
  ON a.ledger = h.ledger AND a.id IN (h.purse_account_id, h.subsidy_account_id)
WHERE h.ledger = $1 AND h.id = $2
ORDER BY a.kind = 'subsidy', a.id
"""


# -- rows --------------------------------------------------------------------------------------


def _card(r: asyncpg.Record, box: SecretBox) -> Card:
    return Card(
        card_no=r["card_no"],
        ledger=r["ledger"],
        holder_id=r["holder_id"],
        status=CardStatus(r["status"]),
        daily_limit=r["daily_limit"],
        pin=card_pin(box, r["ledger"], r["card_no"], r),
        pin_threshold=r["pin_threshold"],
        replaced_by=r["replaced_by"],
    )


# -- cards -------------------------------------------------------------------------------------

async def create_card(
    engine: Engine,
    box: SecretBox,
    *,
    card_no: str,
    holder_id: str,
    ledger: int | None = None,
    daily_limit: int | None = None,
    pin: str | None = None,
    pin_threshold: int | None = None,
) -> Card | Refused:
    """Issue an active card to a holder (``ledger`` may be left out when the holder id is
    unique across ledgers). Card numbers are unique across ledgers. Issuing the same card
    to the same holder again answers the stored card unchanged; a holder with an active
    card gets HOLDER_HAS_ACTIVE_CARD (use ``replace_card``)."""
    async with connection(engine) as conn, conn.transaction():
        await conn.execute(SQL_ADVISORY_LOCK, CARD_LOCK, [card_no])
        if ledger is None:
            ledgers = [r["ledger"] for r in await conn.fetch(SQL_HOLDER_LEDGERS, holder_id)]
            if not ledgers:
                return Refused(Refusal.HOLDER_NOT_FOUND, f"no holder {holder_id!r}")
            if len(ledgers) > 1:
                return Refused(Refusal.AMBIGUOUS_HOLDER,
                               f"holder {holder_id!r} exists in several ledgers; name one")
            ledger = ledgers[0]
        if await conn.fetchval(SQL_LOCK_HOLDER, ledger, holder_id) is None:
            return Refused(Refusal.HOLDER_NOT_FOUND,
                           f"no holder {holder_id!r} in ledger {ledger}")
        r = await conn.fetchrow(SQL_CARD_BY_NO, card_no)
        if r is not None:
            card = _card(r, box)
            if (card.ledger, card.holder_id) != (ledger, holder_id):
                return Refused(Refusal.CARD_NUMBER_TAKEN,
                               f"card {card_no} belongs to another holder")
            return card
        active = await conn.fetchval(SQL_ACTIVE_CARD, ledger, holder_id)
        if active is not None:
            return Refused(Refusal.HOLDER_HAS_ACTIVE_CARD,
                           f"holder {holder_id!r} already has active card {active}")
        sealed = None if pin is None else seal_pin(box, ledger, card_no, pin)
        await conn.execute(SQL_INSERT_CARD, ledger, card_no, holder_id, daily_limit, sealed,
                           pin_threshold, time.time_ns())
        await _sync_freeze(conn, ledger, holder_id)
    return Card(card_no, ledger, holder_id, CardStatus.ACTIVE, daily_limit, pin,
                pin_threshold)

async def get_card(engine: Engine, box: SecretBox, card_no: str) -> Card | None:
    """The card with this number, or None."""
    async with connection(engine) as conn:
        r = await conn.fetchrow(SQL_CARD_BY_NO, card_no)
    return None if r is None else _card(r, box)

async def _transition(
    engine: Engine,
    box: SecretBox,
    card_no: str,
    target: CardStatus,
    allowed: frozenset[CardStatus],
) -> Card | Refused:
    """Move a card to ``target`` (already there: answered unchanged) and re-derive the
    purses' frozen flag, all in one transaction under the holder's row lock."""
    async with connection(engine) as conn, conn.transaction():
        await conn.execute(SQL_ADVISORY_LOCK, CARD_LOCK, [card_no])
        r = await conn.fetchrow(SQL_CARD_BY_NO, card_no)
        if r is None:
            return Refused(Refusal.CARD_NOT_FOUND, f"no card {card_no}")
        card = _card(r, box)
        await conn.fetchval(SQL_LOCK_HOLDER, card.ledger, card.holder_id)
        if card.status is target:
            return card
        if card.status not in allowed:
            return Refused(Refusal.INVALID_TRANSITION,
                           f"card {card_no} is {card.status}; it cannot become {target}")
        if target is CardStatus.ACTIVE:
            active = await conn.fetchval(SQL_ACTIVE_CARD, card.ledger, card.holder_id)
            if active is not None:
                return Refused(Refusal.HOLDER_HAS_ACTIVE_CARD,
                               f"holder {card.holder_id!r} already has active card {active}")
        await conn.execute(SQL_SET_CARD_STATUS, card.ledger, card_no, str(target), None,
                           time.time_ns())
        await _sync_freeze(conn, card.ledger, card.holder_id)
    return msgspec.structs.replace(card, status=target)

async def report_lost(engine: Engine, box: SecretBox, card_no: str) -> Card | Refused:
    """active -> lost: the holder's purses are frozen at once (debits refused by the ledger
    itself, whoever submits them). Reporting a lost card again changes nothing."""
    return await _transition(engine, box, card_no, CardStatus.LOST,
                             frozenset({CardStatus.ACTIVE}))

async def card_found(engine: Engine, box: SecretBox, card_no: str) -> Card | Refused:
    """lost -> active (the card turned up): unfreezes the purses, unless the holder has
    been given another active card meanwhile."""
    return await _transition(engine, box, card_no, CardStatus.ACTIVE,
                             frozenset({CardStatus.LOST}))

async def close_card(engine: Engine, box: SecretBox, card_no: str) -> Card | Refused:
    """active|lost -> closed. The purses keep their money (a closure payout is a transfer);
    they stay frozen only while another card of the holder is lost."""
    return await _transition(engine, box,
        card_no, CardStatus.CLOSED, frozenset({CardStatus.ACTIVE, CardStatus.LOST})
    )

async def replace_card(
    engine: Engine, box: SecretBox, card_no: str, new_card_no: str
) -> Replacement | Refused:
    """active|lost -> replaced, and a new active card for the same holder with the same
    limits and PIN. The purses (and their balance) stay; no money moves; they are
    unfrozen. Repeating the same replacement answers it again."""
    async with connection(engine) as conn, conn.transaction():
        await conn.execute(SQL_ADVISORY_LOCK, CARD_LOCK, sorted({card_no, new_card_no}))
        r = await conn.fetchrow(SQL_CARD_BY_NO, card_no)
        if r is None:
            return Refused(Refusal.CARD_NOT_FOUND, f"no card {card_no}")
        old = _card(r, box)
        await conn.fetchval(SQL_LOCK_HOLDER, old.ledger, old.holder_id)
        r = await conn.fetchrow(SQL_CARD_BY_NO, new_card_no)
        if old.status is CardStatus.REPLACED and old.replaced_by == new_card_no:
            assert r is not None
            return Replacement(old, _card(r, box))
        if old.status not in (CardStatus.ACTIVE, CardStatus.LOST):
            return Refused(Refusal.INVALID_TRANSITION,
                           f"card {card_no} is {old.status}; only an active or lost card "
                           "can be replaced")
        if r is not None or new_card_no == card_no:
            return Refused(Refusal.CARD_NUMBER_TAKEN, f"card {new_card_no} already exists")
        active = await conn.fetchval(SQL_ACTIVE_CARD, old.ledger, old.holder_id)
        if active is not None and active != card_no:
            return Refused(Refusal.HOLDER_HAS_ACTIVE_CARD,
                           f"holder {old.holder_id!r} already has active card {active}")
        now = time.time_ns()
        await conn.execute(SQL_SET_CARD_STATUS, old.ledger, card_no,
                           str(CardStatus.REPLACED), new_card_no, now)
        sealed = None if old.pin is None else seal_pin(box, old.ledger, new_card_no, old.pin)
        await conn.execute(SQL_INSERT_CARD, old.ledger, new_card_no, old.holder_id,
                           old.daily_limit, sealed, old.pin_threshold, now)
        await _sync_freeze(conn, old.ledger, old.holder_id)
    return Replacement(
        msgspec.structs.replace(old, status=CardStatus.REPLACED, replaced_by=new_card_no),
        Card(new_card_no, old.ledger, old.holder_id, CardStatus.ACTIVE, old.daily_limit,
             old.pin, old.pin_threshold),
    )

async def reset_pin_tries(engine: Engine, box: SecretBox, card_no: str) -> Card | Refused:
    """The card office's reset: the card's wrong PINs are forgotten (every day's), so the
    right PIN gets in again at once. The card itself is unchanged."""
    async with connection(engine) as conn:
        r = await conn.fetchrow(SQL_CARD_BY_NO, card_no)
        if r is None:
            return Refused(Refusal.CARD_NOT_FOUND, f"no card {card_no}")
        card = _card(r, box)
        await conn.execute(SQL_RESET_PIN_TRIES, card.ledger, card_no)
    return card

async def card_balance(engine: Engine, box: SecretBox, card_no: str) -> CardBalance | None:
    """The card and its holder's purses (whatever the card's state), or None."""
    async with connection(engine) as conn:
        r = await conn.fetchrow(SQL_CARD_BY_NO, card_no)
        if r is None:
            return None
        card = _card(r, box)
        rows = await conn.fetch(SQL_PURSES, card.ledger, card.holder_id)
    purses = [Purse(r["id"], AccountKind(r["kind"]), r["balance"], r["available"])
              for r in rows]
    return CardBalance(card, purses, sum(p.available for p in purses))


async def _sync_freeze(conn: asyncpg.pool.PoolConnectionProxy, ledger: int, holder_id: str) -> None:
    await conn.execute(SQL_LOCK_PURSES, ledger, holder_id)
    await conn.execute(SQL_SYNC_FREEZE, ledger, holder_id)

"""The campus registry (contract §2, used by the HTTP API): holders and their purses, cards
and their state machine (terminals and dorm rooms: engine/campus/sites.py). Each operation
answers its result or a :class:`~engine.campus.model.Refused` with the reason; creating the
same thing again is idempotent (derived account ids, ``exists`` answers).

Card changes run in one transaction under the holder's row lock and re-derive the purses'
frozen flag in it: the purses are frozen exactly while the holder has a lost card and no
active one, and a lost card with unfrozen purses is never visible. Card numbers are claimed
and locked in engine/campus/unique.py (unique across ledgers), always before the holder's
row: one lock order for every change.
"""

from __future__ import annotations

import time

import asyncpg
import msgspec

from engine.access.secretbox import SecretBox, seal_pin
from engine.campus.accounts import fund_account_id, holder_account_ids
from engine.campus.model import (
    FUND_CODE,
    PURSE_CODE,
    SUBSIDY_CODE,
    Card,
    CardBalance,
    CardStatus,
    Holder,
    HolderKind,
    HolderResult,
    Purse,
    Refusal,
    Refused,
    RegistryStatus,
    Replacement,
)
from engine.campus.pin import SQL_RESET_PIN_TRIES
from engine.campus.secrets import card_pin
from engine.campus.shared import connection
from engine.campus.unique import (
    card_ledger,
    claim_card,
    lock_cards,
    unclaim_card,
)
from engine.service import Engine
from ledger.account import Account
from ledger.status import AccountStatus
from ledger.types import AccountFlag, AccountFlags, AccountKind

# -- SQL ---------------------------------------------------------------------------------------

SQL_HOLDER = """
SELECT id, ledger, name, kind, purse_account_id, subsidy_account_id
FROM holders WHERE ledger = $1 AND id = $2
"""
SQL_INSERT_HOLDER = """
INSERT INTO holders (ledger, id, name, kind, purse_account_id, subsidy_account_id, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (ledger, id) DO NOTHING
RETURNING id
"""
SQL_HOLDER_LEDGERS = "SELECT ledger FROM holders WHERE id = $1 ORDER BY ledger LIMIT 2"
SQL_HAS_FUND = """
SELECT EXISTS (SELECT FROM accounts
               WHERE ledger = $1 AND id = $2 AND kind = 'fund' AND code = $3 AND flags = 0)
"""
SQL_LOCK_HOLDER = "SELECT id FROM holders WHERE ledger = $1 AND id = $2 FOR UPDATE"
_CARD_COLS = (
    "c.card_no, c.ledger, c.holder_id, c.status, c.daily_limit, c.pin, c.pin_enc, "
    "c.pin_threshold, c.replaced_by"
)
SQL_CARD = f"SELECT {_CARD_COLS} FROM cards c WHERE c.ledger = $1 AND c.card_no = $2"
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


def _holder(r: asyncpg.Record) -> Holder:
    return Holder(
        id=r["id"],
        ledger=r["ledger"],
        name=r["name"],
        kind=HolderKind(r["kind"]),
        purse_account_id=r["purse_account_id"],
        subsidy_account_id=r["subsidy_account_id"],
    )


# -- holders -----------------------------------------------------------------------------------

async def create_holder(
    engine: Engine, *, holder_id: str, ledger: int, name: str, kind: HolderKind
) -> HolderResult | Refused:
    """Register a holder and create its cash and subsidy purses (``purse``/``subsidy``
    with ``debits_must_not_exceed_credits``), and the ledger's subsidy fund if it has none yet
    (the campus's subsidy budget: subsidies only ever pay from it, they never create it).
    Idempotent: the same holder again answers ``exists``; one whose name or kind differs
    ``exists_with_different_fields``."""
    fund_id = fund_account_id(ledger)
    async with connection(engine) as conn:
        r = await conn.fetchrow(SQL_HOLDER, ledger, holder_id)
        # Every holder of a ledger names the one fund: once it is there, creating it again
        # would only make every holder creation of the ledger wait on its id's lock.
        has_fund = r is None and await conn.fetchval(SQL_HAS_FUND, ledger, fund_id, FUND_CODE)
    if r is not None:
        return _holder_result(_holder(r), name, kind)
    purse_id, subsidy_id = holder_account_ids(ledger, holder_id)
    no_overdraft = (AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,)
    accounts = [
        Account(id=purse_id, ledger=ledger, kind=AccountKind.PURSE, code=PURSE_CODE,
                flags=no_overdraft, holder_id=holder_id, name=name),
        Account(id=subsidy_id, ledger=ledger, kind=AccountKind.SUBSIDY, code=SUBSIDY_CODE,
                flags=no_overdraft, holder_id=holder_id, name=name),
    ]
    if not has_fund:
        accounts.append(Account(id=fund_id, ledger=ledger, kind=AccountKind.FUND,
                                code=FUND_CODE, name="subsidy fund"))
    statuses = await engine.store.create_accounts(accounts)
    for aid, st in zip((purse_id, subsidy_id, fund_id), statuses, strict=False):
        if st not in (AccountStatus.CREATED, AccountStatus.EXISTS):
            return Refused(Refusal.ACCOUNT_ID_TAKEN, f"account {aid} exists: {st}")
    async with connection(engine) as conn:
        inserted = await conn.fetchval(SQL_INSERT_HOLDER, ledger, holder_id, name, str(kind),
                                       purse_id, subsidy_id, time.time_ns())
        if inserted is None:  # a concurrent create won
            r = await conn.fetchrow(SQL_HOLDER, ledger, holder_id)
            assert r is not None
            return _holder_result(_holder(r), name, kind)
    return HolderResult(
        RegistryStatus.CREATED,
        Holder(holder_id, ledger, name, kind, purse_id, subsidy_id),
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
        if ledger is None:
            ledgers = [r["ledger"] for r in await conn.fetch(SQL_HOLDER_LEDGERS, holder_id)]
            if not ledgers:
                return Refused(Refusal.HOLDER_NOT_FOUND, f"no holder {holder_id!r}")
            if len(ledgers) > 1:
                return Refused(Refusal.AMBIGUOUS_HOLDER,
                               f"holder {holder_id!r} exists in several ledgers; name one")
            ledger = ledgers[0]
        owner = await claim_card(conn, card_no, ledger)
        if await conn.fetchval(SQL_LOCK_HOLDER, ledger, holder_id) is None:
            if owner is None:
                await unclaim_card(conn, card_no, ledger)
            return Refused(Refusal.HOLDER_NOT_FOUND,
                           f"no holder {holder_id!r} in ledger {ledger}")
        if owner is not None:  # the number is taken: by this very card, or another
            r = await conn.fetchrow(SQL_CARD, owner, card_no)
            assert r is not None, f"card {card_no} claimed by ledger {owner} but not there"
            card = _card(r, box)
            if (card.ledger, card.holder_id) != (ledger, holder_id):
                return Refused(Refusal.CARD_NUMBER_TAKEN,
                               f"card {card_no} belongs to another holder")
            return card
        active = await conn.fetchval(SQL_ACTIVE_CARD, ledger, holder_id)
        if active is not None:
            await unclaim_card(conn, card_no, ledger)
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
        r = await _card_row(conn, card_no)
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
        ledger = (await lock_cards(conn, [card_no])).get(card_no)
        if ledger is None:
            return Refused(Refusal.CARD_NOT_FOUND, f"no card {card_no}")
        r = await conn.fetchrow(SQL_CARD, ledger, card_no)
        assert r is not None, f"card {card_no} claimed by ledger {ledger} but not there"
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
        locked = await lock_cards(conn, [card_no, new_card_no])
        if card_no not in locked:
            return Refused(Refusal.CARD_NOT_FOUND, f"no card {card_no}")
        r = await conn.fetchrow(SQL_CARD, locked[card_no], card_no)
        assert r is not None, f"card {card_no} claimed but not there"
        old = _card(r, box)
        await conn.fetchval(SQL_LOCK_HOLDER, old.ledger, old.holder_id)
        if old.status is CardStatus.REPLACED and old.replaced_by == new_card_no:
            r = await conn.fetchrow(SQL_CARD, old.ledger, new_card_no)
            assert r is not None
            return Replacement(old, _card(r, box))
        if old.status not in (CardStatus.ACTIVE, CardStatus.LOST):
            return Refused(Refusal.INVALID_TRANSITION,
                           f"card {card_no} is {old.status}; only an active or lost card "
                           "can be replaced")
        if new_card_no == card_no or await claim_card(conn, new_card_no, old.ledger) is not None:
            return Refused(Refusal.CARD_NUMBER_TAKEN, f"card {new_card_no} already exists")
        active = await conn.fetchval(SQL_ACTIVE_CARD, old.ledger, old.holder_id)
        if active is not None and active != card_no:
            await unclaim_card(conn, new_card_no, old.ledger)
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
        r = await _card_row(conn, card_no)
        if r is None:
            return Refused(Refusal.CARD_NOT_FOUND, f"no card {card_no}")
        card = _card(r, box)
        await conn.execute(SQL_RESET_PIN_TRIES, card.ledger, card_no)
    return card

async def card_balance(engine: Engine, box: SecretBox, card_no: str) -> CardBalance | None:
    """The card and its holder's purses (whatever the card's state), or None."""
    async with connection(engine) as conn:
        r = await _card_row(conn, card_no)
        if r is None:
            return None
        card = _card(r, box)
        rows = await conn.fetch(SQL_PURSES, card.ledger, card.holder_id)
    purses = [Purse(r["id"], AccountKind(r["kind"]), r["balance"], r["available"])
              for r in rows]
    return CardBalance(card, purses, sum(p.available for p in purses))

async def _card_row(conn: asyncpg.pool.PoolConnectionProxy, card_no: str
                    ) -> asyncpg.Record | None:
    """The card with this number, read from its own ledger, or None."""
    ledger = await card_ledger(conn, card_no)
    return None if ledger is None else await conn.fetchrow(SQL_CARD, ledger, card_no)

async def _sync_freeze(conn: asyncpg.pool.PoolConnectionProxy, ledger: int, holder_id: str) -> None:
    await conn.execute(SQL_LOCK_PURSES, ledger, holder_id)
    await conn.execute(SQL_SYNC_FREEZE, ledger, holder_id)


def _holder_result(h: Holder, name: str, kind: HolderKind) -> HolderResult:
    same = h.name == name and h.kind == kind
    return HolderResult(
        RegistryStatus.EXISTS if same else RegistryStatus.EXISTS_WITH_DIFFERENT_FIELDS, h
    )

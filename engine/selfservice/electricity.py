"""Dorm electricity at /self: the holder's room, buying for it, and its monthly statement.

A purchase is the kiosk's (``Campus.buy_electricity``): the same code-3 transfer from the
card's cash purse to the room purse, the same card state and daily-limit checks, the same
per-holder serialisation and spending memory. Only the door differs: it is the holder's
logged-in session, so no PIN is asked for (``pin_waived``), and the terminal id in the
transfer's ``user_data`` is ``DOOR_ID``.

Idempotency: the form carries a random key, made when the form was shown; the purchase's key
is derived from it together with the holder, so a double click or a refreshed answer page
posts the same transfer id (once), and no holder can name another's purchase. The answer is
the ledger's transfer status (contract §7 ``#result data-status``): ``created`` the first
time, ``exists`` for a repeat, and the status a refusal stands for otherwise.
"""

from __future__ import annotations

import asyncio
import uuid
import weakref
from datetime import date
from typing import Final

import asyncpg
import msgspec

from engine import limits
from engine.batcher import Unavailable
from engine.campus import Campus, CardStatus, Outcome, Terminal, TerminalKind
from engine.campus.accounts import CASH_PART, part_id
from engine.finance.statements import Subject, monthly_statement
from engine.selfservice.cards import holder_cards
from engine.selfservice.holders import HolderRef
from ledger.status import TransferStatus
from ledger.types import TransferCode

# The terminal id the self-service door writes into a purchase's user_data (8 characters, as
# every terminal id; it names the door, it is no registered terminal).
DOOR_ID: Final = "SELF-WEB"
_KEYS: Final = uuid.UUID("5e1f5e1f-0000-4000-8000-0000000000e1")  # uuid5 namespace

SQL_ROOM_OF: Final = """
SELECT r.room_id, rm.account_id FROM room_residents r
JOIN rooms rm ON rm.ledger = r.ledger AND rm.room_id = r.room_id
WHERE r.ledger = $1 AND r.holder_id = $2
"""
SQL_TRANSFER: Final = """
SELECT amount, credit_account_id, debit_account_id, code FROM transfers
WHERE ledger = $1 AND id = $2
"""

# What a refusal of the kiosk path stands for, as the ledger's transfer status.
_REFUSALS: Final = {
    Outcome.INSUFFICIENT_FUNDS: TransferStatus.EXCEEDS_CREDITS,
    Outcome.LOST_CARD: TransferStatus.DEBIT_ACCOUNT_FROZEN,  # a lost card's purses are frozen
    Outcome.CARD_NOT_ACTIVE: TransferStatus.CARD_NOT_ACTIVE,
    Outcome.INVALID_CARD: TransferStatus.CARD_NOT_ACTIVE,
    Outcome.DAILY_LIMIT_EXCEEDED: TransferStatus.DAILY_LIMIT_EXCEEDED,
    Outcome.INVALID_AMOUNT: TransferStatus.OVERFLOWS_CREDITS,  # the room past what it can hold
    Outcome.INVALID_TRANSACTION: TransferStatus.CREDIT_ACCOUNT_NOT_FOUND,
}


class HolderRoom(msgspec.Struct, frozen=True):
    """The room a holder lives in."""

    room_id: str
    account_id: int


class Purchase(msgspec.Struct, frozen=True):
    """The answer to an electricity purchase."""

    status: TransferStatus
    room_available: int | None
    cash_available: int | None


async def room_of(pool: asyncpg.Pool, ref: HolderRef) -> HolderRoom | None:
    """The room the holder lives in (contract §6 residents), or None."""
    async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
        r = await conn.fetchrow(SQL_ROOM_OF, ref.ledger, ref.holder_id)
    return None if r is None else HolderRoom(r["room_id"], r["account_id"])


def purchase_key(ref: HolderRef, form_key: uuid.UUID) -> uuid.UUID:
    """The kiosk operation key of a form's purchase: the holder's own, whatever key is sent."""
    return uuid.uuid5(_KEYS, f"{ref.ledger}/{ref.holder_id}/{form_key}")


def door(ledger: int) -> Terminal:
    """The self-service door as the kiosk path sees a terminal (it credits the room, not its
    own account, and checks no PIN: ``account_id`` and ``mac_key`` are never used)."""
    return Terminal(terminal_id=DOOR_ID, merchant_id="", ledger=ledger, kind=TerminalKind.KIOSK,
                    account_id=0, mac_key=b"")


class Electricity:
    """Purchases of one process; a purchase and its repeats are answered one after another
    (so a repeat sees the first and answers ``exists``)."""

    def __init__(self, campus: Campus) -> None:
        self.campus = campus
        self._locks: weakref.WeakValueDictionary[tuple[int, str], asyncio.Lock] = (
            weakref.WeakValueDictionary())

    async def buy(
        self, ref: HolderRef, room: HolderRoom, amount: int, form_key: uuid.UUID
    ) -> Purchase:
        """Buy ``amount`` fen of electricity for ``room`` (the holder's own) from the cash
        purse of the holder's card."""
        pool = self.campus.engine.store.pool
        lock = self._locks.setdefault((ref.ledger, ref.holder_id), asyncio.Lock())
        async with lock:
            cards = await holder_cards(pool, ref)
            card = next((c for c in cards if c.status is CardStatus.ACTIVE), None)
            card = card or next((c for c in cards if c.status is CardStatus.LOST), None)
            if card is None:
                return Purchase(TransferStatus.CARD_NOT_ACTIVE, None, None)
            key = purchase_key(ref, form_key)
            earlier = await _earlier(pool, ref.ledger, key)
            result = await self.campus.buy_electricity(
                door(ref.ledger), card_no=card.card_no, room_id=room.room_id, amount=amount,
                key=key, pin_waived=True)
        if result.outcome in (Outcome.OVERLOADED, Outcome.UNAVAILABLE):
            # nothing moved (a kiosk would have answered 96): the page answers 503
            raise Unavailable(f"electricity purchase: {result.outcome}")
        cash = result.purses.cash if result.purses is not None else None
        if result.outcome is Outcome.APPROVED:
            status = TransferStatus.EXISTS if earlier is not None else TransferStatus.CREATED
        elif result.outcome is Outcome.DUPLICATE_DIFFERENT:
            status = _difference(earlier, amount, room)
        else:
            status = _REFUSALS.get(result.outcome, TransferStatus.CARD_NOT_ACTIVE)
        return Purchase(status, result.room_balance, cash)


async def _earlier(pool: asyncpg.Pool, ledger: int, key: uuid.UUID) -> asyncpg.Record | None:
    """The transfer an earlier submission of this purchase posted, if any (the kiosk path
    derives the transfer id from the key exactly so)."""
    async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
        row: asyncpg.Record | None = await conn.fetchrow(
            SQL_TRANSFER, ledger, part_id(key, CASH_PART))
    return row


def _difference(earlier: asyncpg.Record | None, amount: int, room: HolderRoom) -> TransferStatus:
    """Which field of a repeat differs from the purchase first posted with its key."""
    if earlier is None or earlier["amount"] != amount:
        return TransferStatus.EXISTS_WITH_DIFFERENT_AMOUNT
    if earlier["credit_account_id"] != room.account_id:
        return TransferStatus.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
    if earlier["code"] != int(TransferCode.ELECTRICITY):
        return TransferStatus.EXISTS_WITH_DIFFERENT_CODE
    return TransferStatus.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID


async def room_statement(campus: Campus, ref: HolderRef, room: HolderRoom, month: date) -> Subject:
    """The room's electricity statement of ``month`` (the figures of ``onecard statement
    --room``): opening, every purchase and consumption with the running balance, closing."""
    done = await monthly_statement(campus.engine.store.pool, month, room=room.room_id,
                                   ledger=ref.ledger, tz=campus.tz)
    [subject] = done.rooms
    return subject

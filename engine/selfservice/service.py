"""``SelfService``: everything the /self pages ask of the domain, for one holder at a time.

Every method takes the :class:`HolderRef` the session resolved (``holder``) and touches only
that holder's purses, cards, limit and room: a page can name nothing else. Whatever names
another holder's card, room, account or transfer finds nothing here (the page answers 404).
"""

from __future__ import annotations

import uuid
from datetime import date

import asyncpg

import engine.selfservice.cards as cards
import engine.selfservice.electricity as electricity
import engine.selfservice.statement as statement
from engine import limits
from engine.campus import Campus
from engine.finance.statements import Subject
from engine.selfservice.cards import CardChange, OwnCard, PinChange
from engine.selfservice.electricity import Electricity, HolderRoom, Purchase
from engine.selfservice.holders import HolderReads, HolderRef, Overview
from engine.selfservice.statement import Line, Page


class SelfService:
    """The self-service of one process (its caches and coalesced reads are shared by every
    page load)."""

    def __init__(
        self,
        campus: Campus,
        *,
        low_balance_fen: int = limits.SELF_LOW_BALANCE_FEN,
        low_room_fen: int = limits.SELF_LOW_ROOM_FEN,
    ) -> None:
        self.campus = campus
        self.reads = HolderReads(lambda: campus.engine.store.pool,
                                 low_balance_fen=low_balance_fen, low_room_fen=low_room_fen)
        self._statements = statement.StatementReads(lambda: campus.engine.store.pool)
        self._electricity = Electricity(campus)

    @property
    def _pool(self) -> asyncpg.Pool:
        return self.campus.engine.store.pool

    async def holder(self, holder_id: str) -> HolderRef | None:
        """The holder a session names, or None (unknown, or in several ledgers)."""
        return await self.reads.find_holder(holder_id)

    async def overview(self, ref: HolderRef) -> Overview:
        """The home page's figures (one coalesced read)."""
        return await self.reads.overview(ref)

    async def statement(
        self, ref: HolderRef, *, before: int | None, accounts: tuple[int, ...] | None = None
    ) -> Page:
        """A page of the holder's statement (both purses, or one of them), newest first (one
        coalesced read)."""
        return await self._statements.page(ref, before=before, accounts=accounts)

    async def transfer(self, ref: HolderRef, transfer_id: uuid.UUID) -> Line | None:
        """One of the holder's transfers, or None (unknown or someone else's)."""
        return await statement.statement_line(self._pool, ref, transfer_id)

    async def cards(self, ref: HolderRef) -> list[OwnCard]:
        """The holder's cards, the active one first."""
        return await cards.holder_cards(self._pool, ref)

    async def report_lost(self, ref: HolderRef, *, card_no: str | None = None) -> CardChange:
        """Report the holder's active card (or the one named, theirs) lost."""
        return await cards.report_lost(self.campus, ref, card_no=card_no)

    async def report_found(self, ref: HolderRef, *, card_no: str | None = None) -> CardChange:
        """The holder's lost card (or the one named, theirs) is active again."""
        return await cards.report_found(self.campus, ref, card_no=card_no)

    async def change_pin(
        self, ref: HolderRef, old_pin: str, new_pin: str, *, card_no: str | None = None
    ) -> PinChange:
        """Change the PIN of the holder's active card (or the one named, theirs)."""
        return await cards.change_pin(self.campus, ref, old_pin, new_pin, card_no=card_no)

    async def set_own_limit(self, ref: HolderRef, daily_limit: int | None) -> None:
        """Set (or, with None, remove) the holder's own daily limit."""
        await cards.set_own_limit(self._pool, ref, daily_limit)

    async def room(self, ref: HolderRef) -> HolderRoom | None:
        """The room the holder lives in, or None."""
        return await electricity.room_of(self._pool, ref)

    async def buy_electricity(
        self, ref: HolderRef, room: HolderRoom, amount: int, form_key: uuid.UUID
    ) -> Purchase:
        """Buy electricity for the holder's room (the kiosk's purchase, once per form key)."""
        return await self._electricity.buy(ref, room, amount, form_key)

    async def room_statement(self, ref: HolderRef, room: HolderRoom, month: date) -> Subject:
        """The holder's room's electricity statement of a month."""
        return await electricity.room_statement(self.campus, ref, room, month)

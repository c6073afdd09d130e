"""The campus facade: :class:`Campus`, every campus operation behind one object.

It holds what the operations share (the engine, the coalesced readers and their caches, the
spending memory, the per-holder locks, the campus day) and turns infrastructure failures into
OVERLOADED / UNAVAILABLE; each operation itself lives in the module of its concept.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg

import engine.campus.electricity as electricity
import engine.campus.payments as payments
import engine.campus.registry as registry
import engine.campus.reversals as reversals
import engine.campus.sites as sites
import engine.campus.water as water
from engine import limits
from engine.access.secretbox import SecretBox, default_box
from engine.batcher import Overloaded, Unavailable
from engine.calendar import campus_tz
from engine.campus.model import (
    Card,
    CardBalance,
    HolderKind,
    HolderResult,
    Outcome,
    PaymentResult,
    Refused,
    RegistryStatus,
    Replacement,
    Room,
    Terminal,
    TerminalKind,
)
from engine.campus.shared import Shared
from engine.faults import RETRYABLE
from engine.service import Engine
from ledger.transfer import MAX_TIMEOUT_S

log = logging.getLogger(__name__)


class Campus:
    """Holders, cards, terminals and rooms of every ledger, over one started :class:`Engine`.

    Daily limits count every spending this process commits, whatever door it came through:
    today's sum is read from the ledger once, and then the batcher reports every committed
    group to the spending memory (see engine/campus/spending.py), so a meal posted with
    ``POST /v1/transfers`` counts for the very next terminal payment. Terminal payments of one
    holder are race-free within this process: a per-holder asyncio lock is held from reading
    today's spending until the batcher has answered. A raw ledger transfer takes no such lock
    and checks no limit (the ledger knows none): it counts from the moment it commits, so only
    a terminal payment checked while it was in flight can pass alongside it.

    Two engine *processes* on one database each hear only their own commits: spending through
    another process counts here once the remembered sum is read again (at least every
    ``spend_ttl_s``), so a holder paying through two processes within that window can exceed
    the limit by what the other process let through meanwhile. The money itself stays safe
    across processes because the ledger refuses any overdraft and any debit of a frozen purse
    inside the batch transaction. Card states are never remembered: each payment reads the
    card in the same shared statement as its purses.

    ``tz`` is the campus time zone (default ``$ONECARD_TZ``, else Asia/Shanghai: see
    engine/calendar.py). ``clock`` (default: the wall clock) only decides which campus-local
    day it is now; each transfer counts towards the local day of its engine timestamp.
    Operations are tied to terminal kinds: purchases at POS and kiosk terminals, holds and
    completions at water terminals, electricity at kiosks and POS, meter usage at meters,
    inquiries anywhere but a meter; anything else is INVALID_TRANSACTION.

    Amounts: an operation moving more than ``max_amount`` fen, or one that would leave a purse
    or room at a balance its answer cannot show (field 54: 12 digits), is INVALID_AMOUNT before
    anything is posted. PINs: ``limits.PIN_TRIES_PER_DAY`` wrong PINs on a card in a local day
    (counted in ``pin_tries``, shared by every process) make every later PIN check of the card
    PIN_TRIES_EXCEEDED, the right PIN too, until the next local day or ``reset_pin_tries``.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        tz: str | None = None,
        hold_timeout_s: int = limits.DEFAULT_HOLD_TIMEOUT_S,
        clock: Callable[[], datetime] | None = None,
        spend_ttl_s: float = limits.SPEND_MEMORY_TTL_S,
        max_batch: int = limits.COALESCE_MAX_BATCH,
        max_amount: int = limits.TERMINAL_MAX_AMOUNT_FEN,
        secrets: SecretBox | None = None,
    ) -> None:
        if not 0 < hold_timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"hold_timeout_s must be in 1..{MAX_TIMEOUT_S}")
        if not 0 < max_amount <= limits.TERMINAL_FIELD_MAX_FEN:
            raise ValueError(f"max_amount must be in 1..{limits.TERMINAL_FIELD_MAX_FEN}")
        self.engine = engine
        # seals and opens PINs and MAC keys (kept encrypted at rest), caching what it opened
        self.secrets = secrets or default_box()
        self.max_amount = max_amount
        self.tz = campus_tz(tz)
        self.hold_timeout_s = hold_timeout_s
        self._s = Shared(engine, tz=self.tz, hold_timeout_s=hold_timeout_s,
                         clock=clock or (lambda: datetime.now(UTC)), spend_ttl_s=spend_ttl_s,
                         max_batch=max_batch, max_amount=max_amount, box=self.secrets)

    @property
    def statements(self) -> int:
        """Shared hot-path read statements run so far (each serves a batch of requests)."""
        return self._s.reads.statements + self._s.pins.statements

    def today(self) -> tuple[int, int]:
        """[start, end) of the current campus-local day in engine ns (per the clock)."""
        return self._s.today()

    @staticmethod
    async def _guard(op: Awaitable[PaymentResult]) -> PaymentResult:
        """Infrastructure failures become OVERLOADED / UNAVAILABLE (the gateway answers 96)."""
        try:
            return await op
        except Overloaded:
            return PaymentResult(Outcome.OVERLOADED)
        except (Unavailable, *RETRYABLE) as e:
            log.warning("campus: database unavailable: %s", e)
            return PaymentResult(Outcome.UNAVAILABLE)
        except asyncpg.PostgresError:
            log.exception("campus: database error")
            return PaymentResult(Outcome.UNAVAILABLE)

    # -- terminal operations (payments.py, water.py, electricity.py, reversals.py) ---------------

    def terminal(self, terminal_id: str) -> Coroutine[Any, Any, Terminal | None]:
        """The registered terminal with this id (cached: a terminal never changes), or None.
        Awaitable: the read's own coroutine (no frame of its own on the hot path)."""
        return self._s.reads.terminal(terminal_id)

    async def purchase(
        self,
        term: Terminal,
        *,
        card_no: str,
        amount: int,
        key: UUID,
        pin_block: bytes | None = None,
        force: bool = False,
    ) -> PaymentResult:
        """A meal or shop purchase: the subsidy purse pays first, the cash purse the rest (two
        linked transfers when split), credited to the terminal's account, code 1.

        ``force=True`` is the offline advice (0220): the card state is still checked (a lost
        card answers LOST_CARD, and its purses are frozen anyway; a replaced or closed card
        CARD_NOT_ACTIVE), but not the PIN (none was entered offline) nor the daily limit (the
        food was served); the transfers carry ``force`` so they post past the no-overdraft rule.
        Allowed on POS and kiosk terminals.
        """
        return await self._guard(
            payments.spend(self._s, term, card_no, amount, key, pin_block, force=force,
                           hold=False)
        )

    async def hold(
        self,
        term: Terminal,
        *,
        card_no: str,
        amount: int,
        key: UUID,
        pin_block: bytes | None = None,
    ) -> PaymentResult:
        """A hot-water hold: pending transfer(s) to the water terminal's account, subsidy first
        and split across the purses (linked) when needed; released by itself after
        ``hold_timeout_s``. Water terminals only."""
        return await self._guard(
            payments.spend(self._s, term, card_no, amount, key, pin_block, force=False,
                           hold=True)
        )

    async def balance(
        self, term: Terminal, *, card_no: str, pin_block: bytes | None = None
    ) -> PaymentResult:
        """Balance inquiry: the purses' available fen. No PIN is required (no amount), but a
        PIN block that is sent must be right, and a wrong one counts towards the day's tries
        (otherwise inquiries would be a free PIN oracle)."""
        return await self._guard(payments.balance(self._s, term, card_no, pin_block))

    async def complete(
        self,
        term: Terminal,
        *,
        hold_key: UUID,
        amount: int,
        key: UUID,
        card_no: str | None = None,
    ) -> PaymentResult:
        """Settle the hot-water hold ``hold_key`` for ``amount`` (the subsidy part first), the
        rest released; ``amount`` 0 releases it all. More than held is INVALID_AMOUNT; an
        unknown or expired hold ORIGINAL_NOT_FOUND; a hold already settled or released by
        another completion INVALID_TRANSACTION. The card state is not checked again: the hold
        was authorised and the water has flowed."""
        return await self._guard(water.complete(self._s, term, hold_key, amount, key, card_no))

    async def buy_electricity(
        self,
        term: Terminal,
        *,
        card_no: str,
        room_id: str,
        amount: int,
        key: UUID,
        pin_block: bytes | None = None,
        pin_waived: bool = False,
    ) -> PaymentResult:
        """Buy electricity for a dorm room: the card's cash purse pays the room purse (code 3).
        Card state, PIN and daily limit apply; an unknown room is INVALID_TRANSACTION. Kiosk
        and POS terminals. ``pin_waived``: the holder proved who they are another way (their
        password, at /self), so no PIN is asked for."""
        return await self._guard(
            electricity.buy(self._s, term, card_no, room_id, amount, key, pin_block,
                            pin_waived=pin_waived)
        )

    async def meter_usage(
        self, term: Terminal, *, room_id: str, amount: int, key: UUID
    ) -> PaymentResult:
        """A room meter's consumption: room purse -> the meter's utility account, code 3,
        always posted with ``force``. APPROVED while the room balance after it is > 0,
        INSUFFICIENT_FUNDS (cut the power) when it is <= 0; ``room_balance`` either way.
        Meter terminals only; an unknown room is INVALID_TRANSACTION."""
        return await self._guard(electricity.meter_usage(self._s, term, room_id, amount, key))

    async def reverse(self, term: Terminal, *, original_key: UUID, key: UUID) -> PaymentResult:
        """Undo whatever the operation ``original_key`` posted (code 7 back to where the money
        came from, with ``force``; a hold still pending is voided, a hold already settled is
        left alone: its completion is the message to reverse) and answer APPROVED.

        The reversal is remembered first; an original that arrives later answers APPROVED and
        moves nothing. Race-free across connections and processes: the reversal writes its
        memory, then reads the original's transfers; the original posts, then reads the memory;
        whichever is second sees the other, and both undo with the same transfer ids, so the
        money comes back exactly once. ``original_key`` is derived from this terminal's id by
        the gateway, so a terminal can only reverse its own operations.
        """
        return await self._guard(reversals.reverse(self._s, term, original_key, key))

    async def withdraw(self, ledger: int, *, key: UUID, hold_key: UUID | None = None) -> bool:
        """Take back whatever the operation ``key`` posted, for a request that was answered
        ``96`` (its deadline passed while its work went on): a posting is paid back (code 7),
        a hold still pending is voided; with ``hold_key`` (``key`` is a completion) that hold
        is released too if it is still pending. Either way the 96 moved no money net, and a
        timed-out completion leaves its hold released: voided, or posted and paid back.

        The caller must have remembered a reversal of ``key`` first (the gateway does it in
        the statement that stores the 96). Then, as for :meth:`reverse`, whichever of this
        read and the operation's own "read the reversal memory after posting" comes second
        sees the other, so the money comes back exactly once, and an operation that has not
        posted yet answers APPROVED and moves nothing when it does run.

        Unlike ``reverse`` this reports whether it is done: True when nothing of the operation
        is left to take back (taken back now or before, or never posted), False when that could
        not be established (the database is away, the queue full, or a racing completion kept
        moving the hold): call it again later. Idempotent; never raises for those.
        """
        return await reversals.withdraw(self._s, ledger, key, hold_key)

    # -- registry (registry.py, sites.py) ---------------------------------------------------

    async def create_holder(
        self, *, holder_id: str, ledger: int, name: str, kind: HolderKind
    ) -> HolderResult | Refused:
        """Register a holder and create its cash and subsidy purses (idempotent: ``exists``,
        or ``exists_with_different_fields``); see :func:`engine.campus.registry.create_holder`."""
        return await registry.create_holder(self.engine, holder_id=holder_id, ledger=ledger,
                                            name=name, kind=kind)

    async def create_card(
        self,
        *,
        card_no: str,
        holder_id: str,
        ledger: int | None = None,
        daily_limit: int | None = None,
        pin: str | None = None,
        pin_threshold: int | None = None,
    ) -> Card | Refused:
        """Issue an active card to a holder (``ledger`` may be left out when the holder id is
        unique across ledgers); see :func:`engine.campus.registry.create_card`."""
        return await registry.create_card(
            self.engine, self.secrets, card_no=card_no, holder_id=holder_id, ledger=ledger,
            daily_limit=daily_limit, pin=pin, pin_threshold=pin_threshold,
        )

    async def get_card(self, card_no: str) -> Card | None:
        """The card with this number, or None."""
        return await registry.get_card(self.engine, self.secrets, card_no)

    async def report_lost(self, card_no: str) -> Card | Refused:
        """active -> lost: the holder's purses are frozen at once (debits refused by the ledger
        itself, whoever submits them). Reporting a lost card again changes nothing."""
        return await registry.report_lost(self.engine, self.secrets, card_no)

    async def card_found(self, card_no: str) -> Card | Refused:
        """lost -> active (the card turned up): unfreezes the purses, unless the holder has
        been given another active card meanwhile."""
        return await registry.card_found(self.engine, self.secrets, card_no)

    async def close_card(self, card_no: str) -> Card | Refused:
        """active|lost -> closed. The purses keep their money (a closure payout is a transfer);
        they stay frozen only while another card of the holder is lost."""
        return await registry.close_card(self.engine, self.secrets, card_no)

    async def replace_card(self, card_no: str, new_card_no: str) -> Replacement | Refused:
        """active|lost -> replaced, and a new active card for the same holder with the same
        limits and PIN; the purses stay, unfrozen; see
        :func:`engine.campus.registry.replace_card`."""
        return await registry.replace_card(self.engine, self.secrets, card_no, new_card_no)

    async def reset_pin_tries(self, card_no: str) -> Card | Refused:
        """The card office's reset: the card's wrong PINs are forgotten (every day's), so the
        right PIN gets in again at once. The card itself is unchanged."""
        return await registry.reset_pin_tries(self.engine, self.secrets, card_no)

    async def card_balance(self, card_no: str) -> CardBalance | None:
        """The card and its holder's purses (whatever the card's state), or None."""
        return await registry.card_balance(self.engine, self.secrets, card_no)

    async def register_terminal(
        self,
        *,
        terminal_id: str,
        merchant_id: str,
        ledger: int,
        kind: TerminalKind,
        account_id: int,
        mac_key: bytes,
    ) -> RegistryStatus | Refused:
        """Register a terminal that will credit only ``account_id`` (a merchant or utility
        account of its ledger); see :func:`engine.campus.sites.register_terminal`."""
        return await sites.register_terminal(
            self.engine, self.secrets, terminal_id=terminal_id, merchant_id=merchant_id,
            ledger=ledger, kind=kind, account_id=account_id, mac_key=mac_key,
        )

    async def create_room(self, *, room_id: str, ledger: int) -> Room | Refused:
        """Create (idempotently) a dorm room and its ``room`` purse (no overdraft)."""
        return await sites.create_room(self.engine, room_id=room_id, ledger=ledger)

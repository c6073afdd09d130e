"""The campus layer: holders, cards, terminals and rooms on top of the ledger (contract §2).

A holder owns two ledger accounts, a cash ``purse`` and a ``subsidy`` purse; a dorm room owns a
``room`` purse. Their ids are derived from (ledger, owner, kind), so creating them again is
harmless. A card points at a holder and carries the state machine and the spending rules:

- ``active -> lost`` (report-lost) freezes both purses *in the same database transaction*;
  ``lost -> active`` (found), ``active|lost -> replaced`` (a new card takes over the same purses,
  no money moves) and ``active|lost -> closed``. The purses are frozen exactly while the holder
  has a lost card and no active one.
- ``daily_limit``: today's campus-local spending (meals, hot water, electricity; holds count
  while they hold, reversed spending does not) plus the new amount must not exceed it.
- ``pin`` / ``pin_threshold``: above the threshold the terminal must prove the PIN (field 52).

Terminal operations (``purchase`` … ``reverse``) return a :class:`PaymentResult`; every transfer
they post has an id derived from the request ``key``, so a retransmission never posts twice,
and goes through the engine's batcher (group commit). Registry operations used by the HTTP API
return their result or a :class:`Refused` with the reason.

Reversals are remembered in ``reversals`` before anything else happens, and every original
re-reads that memory after it posted: whichever of the two comes second sees the other, so an
original and its reversal racing on two connections (or two processes) always net to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from typing import Any, Final
from uuid import UUID, uuid5
from zoneinfo import ZoneInfo

import asyncpg
import msgspec

from engine import limits
from engine.batcher import RETRYABLE, Overloaded, TransferResult, Unavailable
from engine.pin import verify_pin
from engine.service import Engine
from ledger.account import Account
from ledger.status import AccountStatus, TransferStatus
from ledger.transfer import MAX_TIMEOUT_S, Transfer
from ledger.types import (
    INT64_MAX,
    NIL_UUID,
    AccountFlag,
    AccountFlags,
    AccountKind,
    TransferCode,
    TransferFlag,
    TransferFlags,
)

log = logging.getLogger(__name__)

# -- limits of this module -------------------------------------------------------------------
DEFAULT_TZ: Final = "Asia/Shanghai"
DEFAULT_HOLD_TIMEOUT_S: Final = 1800  # a shower is paid or released within half an hour
MAX_CACHED_TERMINALS: Final = 65_536  # terminals never change once registered
MAX_CACHED_CARDS: Final = 262_144  # card -> holder never changes either
UNDO_ATTEMPTS: Final = 3  # a reversal racing a completion re-reads and tries again

# Account codes of the accounts the campus creates (the chart mirrors field 54's types).
PURSE_CODE: Final = 10
SUBSIDY_CODE: Final = 20
ROOM_CODE: Final = 30

# Lock classes for pg_advisory_xact_lock(int, int): the two-key space never meets the store's
# one-key account-id locks.
_CARD_LOCK: Final = 0x0CA4D
_TERMINAL_LOCK: Final = 0x7E4A1

_LINKED: Final = int(TransferFlags.LINKED)
_PENDING: Final = int(TransferFlags.PENDING)
_POST: Final = int(TransferFlags.POST_PENDING)
_VOID: Final = int(TransferFlags.VOID_PENDING)
_SPENDING_CODES: Final = (TransferCode.MEAL, TransferCode.HOT_WATER, TransferCode.ELECTRICITY)
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


# -- public types ------------------------------------------------------------------------------


class TerminalKind(enum.StrEnum):
    """What a terminal is: canteen/shop POS, shower valve, self-service kiosk, room meter."""

    POS = "pos"
    WATER = "water"
    KIOSK = "kiosk"
    METER = "meter"


class CardStatus(enum.StrEnum):
    """Card states (contract §2)."""

    ACTIVE = "active"
    LOST = "lost"
    REPLACED = "replaced"
    CLOSED = "closed"


class HolderKind(enum.StrEnum):
    """Holder kinds (contract §2)."""

    STUDENT = "student"
    STAFF = "staff"


class RegistryStatus(enum.StrEnum):
    """Outcome of registering a holder or a terminal (contract §4)."""

    CREATED = "created"
    EXISTS = "exists"
    EXISTS_WITH_DIFFERENT_FIELDS = "exists_with_different_fields"


class Refusal(enum.StrEnum):
    """Why a registry operation was refused."""

    HOLDER_NOT_FOUND = "holder_not_found"
    CARD_NOT_FOUND = "card_not_found"
    ACCOUNT_NOT_FOUND = "account_not_found"
    AMBIGUOUS_HOLDER = "ambiguous_holder"  # the holder id exists in several ledgers
    CARD_NUMBER_TAKEN = "card_number_taken"
    HOLDER_HAS_ACTIVE_CARD = "holder_has_active_card"
    INVALID_TRANSITION = "invalid_transition"
    ACCOUNT_NOT_CREDITABLE = "account_not_creditable"  # a terminal must credit merchant/utility
    ACCOUNT_ID_TAKEN = "account_id_taken"  # a derived account id is used by another account

    @property
    def not_found(self) -> bool:
        """True when the refusal means "unknown" (HTTP 404) rather than "not allowed" (400)."""
        return self in _NOT_FOUND


_NOT_FOUND: Final = frozenset(
    {Refusal.HOLDER_NOT_FOUND, Refusal.CARD_NOT_FOUND, Refusal.ACCOUNT_NOT_FOUND}
)


class Refused(msgspec.Struct, frozen=True):
    """A registry operation that was not carried out, and why."""

    reason: Refusal
    detail: str


class Terminal(msgspec.Struct, frozen=True):
    """A registered terminal; it credits only ``account_id``."""

    terminal_id: str
    merchant_id: str
    ledger: int
    kind: TerminalKind
    account_id: int
    mac_key: bytes


class Outcome(enum.StrEnum):
    """Business outcome of a terminal operation; the gateway maps it to field 39."""

    APPROVED = "approved"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    LOST_CARD = "lost_card"
    CARD_NOT_ACTIVE = "card_not_active"
    INVALID_CARD = "invalid_card"
    INCORRECT_PIN = "incorrect_pin"
    DAILY_LIMIT_EXCEEDED = "daily_limit_exceeded"
    INVALID_AMOUNT = "invalid_amount"
    ORIGINAL_NOT_FOUND = "original_not_found"
    INVALID_TRANSACTION = "invalid_transaction"
    DUPLICATE_DIFFERENT = "duplicate_different"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"


class PurseBalances(msgspec.Struct, frozen=True):
    """A holder's AVAILABLE fen after the operation."""

    cash: int
    subsidy: int

    @property
    def total(self) -> int:
        """Cash and subsidy together."""
        return self.cash + self.subsidy


class PaymentResult(msgspec.Struct, frozen=True):
    """The answer to a terminal operation."""

    outcome: Outcome
    purses: PurseBalances | None = None
    room_balance: int | None = None
    timestamp: int | None = None


class Holder(msgspec.Struct, frozen=True):
    """A card holder and the two purses it owns."""

    id: str
    ledger: int
    name: str
    kind: HolderKind
    purse_account_id: int
    subsidy_account_id: int


class HolderResult(msgspec.Struct, frozen=True):
    """Outcome of ``create_holder``: the stored holder (the old one if it already existed)."""

    status: RegistryStatus
    holder: Holder


class Card(msgspec.Struct, frozen=True):
    """A card as stored."""

    card_no: str
    ledger: int
    holder_id: str
    status: CardStatus
    daily_limit: int | None = None
    pin: str | None = None
    pin_threshold: int | None = None
    replaced_by: str | None = None


class Replacement(msgspec.Struct, frozen=True):
    """Outcome of ``replace_card``."""

    old: Card
    new: Card


class Purse(msgspec.Struct, frozen=True):
    """One of a holder's purses."""

    account_id: int
    kind: AccountKind
    balance: int
    available: int


class CardBalance(msgspec.Struct, frozen=True):
    """A card, its holder's purses, and what they can spend together."""

    card: Card
    purses: list[Purse]
    total_available: int


class Room(msgspec.Struct, frozen=True):
    """A dorm room's electricity purse."""

    room_id: str
    ledger: int
    account_id: int


# -- pure helpers ------------------------------------------------------------------------------


def derived_account_id(ledger: int, owner: str, kind: AccountKind) -> int:
    """The account id of ``owner``'s account of ``kind`` in ``ledger``: a positive int63
    hash, so creating the same holder or room twice names the same accounts."""
    digest = hashlib.sha256(f"onecard/{ledger}/{kind}/{owner}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") & INT64_MAX) or 1


def holder_account_ids(ledger: int, holder_id: str) -> tuple[int, int]:
    """(cash purse id, subsidy purse id) of a holder."""
    return (
        derived_account_id(ledger, holder_id, AccountKind.PURSE),
        derived_account_id(ledger, holder_id, AccountKind.SUBSIDY),
    )


def room_account_id(ledger: int, room_id: str) -> int:
    """The room purse id of a dorm room."""
    return derived_account_id(ledger, room_id, AccountKind.ROOM)


def local_day_bounds(now: datetime, tz: ZoneInfo) -> tuple[int, int]:
    """[start, end) of the campus-local day containing ``now``, in engine ns."""
    day = now.astimezone(tz).date()
    start = datetime.combine(day, dtime(0), tzinfo=tz)
    end = datetime.combine(day + timedelta(days=1), dtime(0), tzinfo=tz)
    return _ns(start), _ns(end)


def _ns(dt: datetime) -> int:
    return (dt - EPOCH) // timedelta(microseconds=1) * 1000


# Part names: the transfers one operation posts, each id = uuid5(key, part).
_SUBSIDY: Final = "subsidy"
_CASH: Final = "cash"
_ROOM: Final = "room"
_ALL_PARTS: Final = (_SUBSIDY, _CASH, _ROOM)


def part_id(key: UUID, part: str) -> UUID:
    """Id of one transfer of the operation ``key`` (deterministic: retries post nothing)."""
    return uuid5(key, part)


def reversal_id(transfer_id: UUID) -> UUID:
    """Id of the transfer that undoes ``transfer_id``: one undo, however many reversals."""
    return uuid5(transfer_id, "reversal")


_PURCHASE_KINDS: Final = frozenset({TerminalKind.POS, TerminalKind.KIOSK})
_HOLD_KINDS: Final = frozenset({TerminalKind.WATER})
_ELECTRICITY_KINDS: Final = frozenset({TerminalKind.KIOSK, TerminalKind.POS})
_INQUIRY_KINDS: Final = frozenset({TerminalKind.POS, TerminalKind.WATER, TerminalKind.KIOSK})

_S = TransferStatus
_STATUS_OUTCOME: Final[dict[TransferStatus, Outcome]] = {
    _S.EXCEEDS_CREDITS: Outcome.INSUFFICIENT_FUNDS,
    _S.DEBIT_ACCOUNT_FROZEN: Outcome.LOST_CARD,
    _S.ACCOUNT_CLOSED: Outcome.CARD_NOT_ACTIVE,
    _S.DAILY_LIMIT_EXCEEDED: Outcome.DAILY_LIMIT_EXCEEDED,
    _S.CARD_NOT_ACTIVE: Outcome.CARD_NOT_ACTIVE,
    _S.EXCEEDS_PENDING_TRANSFER_AMOUNT: Outcome.INVALID_AMOUNT,
    _S.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT: Outcome.INVALID_AMOUNT,
    _S.AMOUNT_MUST_BE_POSITIVE: Outcome.INVALID_AMOUNT,
    _S.PENDING_TRANSFER_NOT_FOUND: Outcome.ORIGINAL_NOT_FOUND,
    _S.PENDING_TRANSFER_EXPIRED: Outcome.ORIGINAL_NOT_FOUND,
    _S.EXISTS_WITH_DIFFERENT_AMOUNT: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_FLAGS: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_PENDING_ID: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_CODE: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_LEDGER: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_USER_DATA: Outcome.DUPLICATE_DIFFERENT,
    _S.EXISTS_WITH_DIFFERENT_TIMEOUT: Outcome.DUPLICATE_DIFFERENT,
}


def outcome_of(results: Sequence[TransferResult]) -> tuple[Outcome, int | None]:
    """The business outcome of one submitted operation and the timestamp of its first
    transfer. A failed linked chain answers the status of the event that broke it."""
    if all(r.status.ok for r in results):
        stamps = [r.timestamp for r in results if r.timestamp]
        return Outcome.APPROVED, min(stamps) if stamps else None
    for r in results:
        if not r.status.ok and r.status is not TransferStatus.LINKED_EVENT_FAILED:
            return _STATUS_OUTCOME.get(r.status, Outcome.INVALID_TRANSACTION), None
    return Outcome.INVALID_TRANSACTION, None


def _chain(transfers: list[Transfer]) -> list[Transfer]:
    """Link every transfer to the next: the operation commits whole or not at all."""
    linked = (TransferFlag.LINKED,)
    return [
        msgspec.structs.replace(t, flags=(*t.flags, *linked)) if i < len(transfers) - 1 else t
        for i, t in enumerate(transfers)
    ]


def split_subsidy_first(amount: int, subsidy_available: int) -> tuple[int, int]:
    """(from subsidy, from cash): the subsidy purse pays first, the cash purse the rest."""
    from_subsidy = min(amount, max(subsidy_available, 0))
    return from_subsidy, amount - from_subsidy


def _card_refusal(status: CardStatus) -> Outcome | None:
    if status is CardStatus.LOST:
        return Outcome.LOST_CARD
    if status is not CardStatus.ACTIVE:
        return Outcome.CARD_NOT_ACTIVE
    return None


# -- SQL ---------------------------------------------------------------------------------------

_CARD_COLS = (
    "c.card_no, c.ledger, c.holder_id, c.status, c.daily_limit, c.pin, c.pin_threshold, "
    "c.replaced_by"
)
SQL_CARD_REF = """
SELECT c.holder_id, h.purse_account_id, h.subsidy_account_id
FROM cards c JOIN holders h ON h.ledger = c.ledger AND h.id = c.holder_id
WHERE c.ledger = $1 AND c.card_no = $2
"""
# Everything a card payment decides on, in one round trip. Today's spending is summed from
# the ledger itself: spending codes debiting the holder's purses within the local day, a hold
# while it still holds (its post counts once settled), nothing that was reversed (a reversal
# carries the reversed transfer's id in user_data).
SQL_CARD_STATE = f"""
SELECT c.status, c.daily_limit, c.pin, c.pin_threshold,
       p.credits_posted - p.debits_posted - p.debits_pending AS cash,
       s.credits_posted - s.debits_posted - s.debits_pending AS subsidy,
       CASE WHEN $7::bool AND c.daily_limit IS NOT NULL THEN (
           SELECT coalesce(sum(t.amount), 0)::bigint FROM transfers t
           LEFT JOIN holds hd ON hd.ledger = t.ledger AND hd.id = t.id
           WHERE t.ledger = $1 AND t.debit_account_id IN (p.id, s.id)
             AND t.timestamp >= $3 AND t.timestamp < $4
             AND t.code IN ({", ".join(str(int(c)) for c in _SPENDING_CODES)})
             AND t.flags & {_VOID} = 0
             AND (t.flags & {_PENDING} = 0 OR hd.state = 'pending')
             AND NOT EXISTS (
                 SELECT 1 FROM transfers r
                 WHERE r.ledger = t.ledger AND r.credit_account_id = t.debit_account_id
                   AND r.timestamp > t.timestamp AND r.code = {int(TransferCode.REVERSAL)}
                   AND r.user_data = t.id::text)
       ) ELSE 0 END AS spent,
       EXISTS (SELECT 1 FROM reversals v WHERE v.ledger = $1 AND v.original_key = $5)
           AS reversed,
       EXISTS (SELECT 1 FROM transfers e WHERE e.ledger = $1 AND e.id = ANY($6::uuid[]))
           AS existing
FROM cards c
JOIN holders h ON h.ledger = c.ledger AND h.id = c.holder_id
JOIN accounts p ON p.ledger = c.ledger AND p.id = h.purse_account_id
JOIN accounts s ON s.ledger = c.ledger AND s.id = h.subsidy_account_id
WHERE c.ledger = $1 AND c.card_no = $2
"""
# Balances after an operation, and whether a reversal of it has been remembered meanwhile.
SQL_AFTER = """
SELECT a.id, a.credits_posted - a.debits_posted - a.debits_pending AS available,
       EXISTS (SELECT 1 FROM reversals v WHERE v.ledger = $1 AND v.original_key = $3)
           AS reversed
FROM accounts a WHERE a.ledger = $1 AND a.id = ANY($2::bigint[])
"""
SQL_PARTS = """
SELECT t.id, t.debit_account_id, t.credit_account_id, t.amount, t.code, t.flags, t.pending_id,
       t.timestamp, hd.state
FROM transfers t LEFT JOIN holds hd ON hd.ledger = t.ledger AND hd.id = t.id
WHERE t.ledger = $1 AND t.id = ANY($2::uuid[])
ORDER BY t.timestamp
"""
SQL_REVERSED = """
SELECT original_key FROM reversals WHERE ledger = $1 AND original_key = ANY($2::uuid[])
"""
SQL_REMEMBER_REVERSAL = """
INSERT INTO reversals (ledger, original_key, key, terminal_id, created_at)
VALUES ($1, $2, $3, $4, $5) ON CONFLICT (ledger, original_key) DO NOTHING
"""
SQL_HOLDER_OF_ACCOUNT = """
SELECT h.purse_account_id, h.subsidy_account_id
FROM accounts a JOIN holders h ON h.ledger = a.ledger AND h.id = a.holder_id
WHERE a.ledger = $1 AND a.id = $2
"""
SQL_TERMINAL = """
SELECT terminal_id, merchant_id, ledger, kind, account_id, mac_key
FROM terminals WHERE terminal_id = $1 ORDER BY ledger LIMIT 1
"""

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
SQL_LOCK_HOLDER = "SELECT id FROM holders WHERE ledger = $1 AND id = $2 FOR UPDATE"
# Serialise creators of the same card number / terminal id across ledgers (no global index).
SQL_ADVISORY_LOCK = "SELECT pg_advisory_xact_lock($1, hashtext(x)) FROM unnest($2::text[]) x"
SQL_CARD_BY_NO = f"SELECT {_CARD_COLS} FROM cards c WHERE c.card_no = $1 ORDER BY c.ledger"
SQL_ACTIVE_CARD = """
SELECT card_no FROM cards WHERE ledger = $1 AND holder_id = $2 AND status = 'active'
"""
SQL_INSERT_CARD = """
INSERT INTO cards (ledger, card_no, holder_id, status, daily_limit, pin, pin_threshold,
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
SQL_ACCOUNT_KIND = "SELECT kind FROM accounts WHERE ledger = $1 AND id = $2"
SQL_INSERT_TERMINAL = """
INSERT INTO terminals (ledger, terminal_id, merchant_id, kind, account_id, mac_key, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""
SQL_INSERT_ROOM = """
INSERT INTO rooms (ledger, room_id, account_id, created_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (ledger, room_id) DO NOTHING
"""


# -- internals ---------------------------------------------------------------------------------


class _CardRef(msgspec.Struct, frozen=True):
    """What never changes about a card: its holder and the holder's purses."""

    ledger: int
    card_no: str
    holder_id: str
    purse_id: int
    subsidy_id: int


class _CardState(msgspec.Struct, frozen=True):
    status: CardStatus
    daily_limit: int | None
    pin: str | None
    pin_threshold: int | None
    cash: int
    subsidy: int
    spent: int
    reversed: bool
    existing: bool


class _Part(msgspec.Struct, frozen=True):
    """A transfer some earlier operation posted, with its hold state if it is a hold."""

    id: UUID
    debit_account_id: int
    credit_account_id: int
    amount: int
    code: int
    flags: int
    pending_id: UUID | None
    timestamp: int
    state: str | None


def _part(r: asyncpg.Record) -> _Part:
    return _Part(
        id=r["id"],
        debit_account_id=r["debit_account_id"],
        credit_account_id=r["credit_account_id"],
        amount=r["amount"],
        code=r["code"],
        flags=r["flags"],
        pending_id=r["pending_id"],
        timestamp=r["timestamp"],
        state=r["state"],
    )


def _card(r: asyncpg.Record) -> Card:
    return Card(
        card_no=r["card_no"],
        ledger=r["ledger"],
        holder_id=r["holder_id"],
        status=CardStatus(r["status"]),
        daily_limit=r["daily_limit"],
        pin=r["pin"],
        pin_threshold=r["pin_threshold"],
        replaced_by=r["replaced_by"],
    )


def _terminal(r: asyncpg.Record) -> Terminal:
    return Terminal(
        terminal_id=r["terminal_id"],
        merchant_id=r["merchant_id"],
        ledger=r["ledger"],
        kind=TerminalKind(r["kind"]),
        account_id=r["account_id"],
        mac_key=bytes(r["mac_key"]),
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


def _matches(parts: Sequence[_Part], *, credit: int, code: int, amount: int, flags: int) -> bool:
    """Whether the transfers an earlier attempt of this key posted are what this one asks."""
    return (
        all(p.credit_account_id == credit and p.code == code and p.flags & ~_LINKED == flags
            for p in parts)
        and sum(p.amount for p in parts) == amount
    )


class _KeyedLocks:
    """asyncio locks created on demand per key and dropped when nobody holds or awaits them."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


def _bounded_put(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))  # oldest first: dicts keep insertion order
    cache[key] = value


# -- the campus --------------------------------------------------------------------------------


class Campus:
    """Holders, cards, terminals and rooms of every ledger, over one started :class:`Engine`.

    Daily limits are race-free within this process: a per-holder asyncio lock is held from
    reading today's spending until the batcher has answered, and nothing else is awaited in
    between. Two engine *processes* do not share that lock, so a holder paying at two of them
    in the same instant can exceed the daily limit by at most one payment per extra process;
    the money itself stays safe across processes because the ledger refuses any overdraft and
    any debit of a frozen purse inside the batch transaction.

    ``clock`` (default: the wall clock) only decides which campus-local day it is now; each
    transfer counts towards the local day of its engine timestamp. Operations are tied to
    terminal kinds: purchases at POS and kiosk terminals, holds and completions at water
    terminals, electricity at kiosks and POS, meter usage at meters, inquiries anywhere but a
    meter; anything else is INVALID_TRANSACTION.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        tz: str = DEFAULT_TZ,
        hold_timeout_s: int = DEFAULT_HOLD_TIMEOUT_S,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not 0 < hold_timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"hold_timeout_s must be in 1..{MAX_TIMEOUT_S}")
        self.engine = engine
        self.tz = ZoneInfo(tz)
        self.hold_timeout_s = hold_timeout_s
        self._clock = clock or (lambda: datetime.now(UTC))
        self._terminals: dict[str, Terminal] = {}
        self._cards: dict[tuple[int, str], _CardRef] = {}
        self._holder_locks = _KeyedLocks()

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def _pool(self) -> asyncpg.Pool:
        return self.engine.store.pool

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        async with self._pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
            yield conn

    async def _submit(self, transfers: list[Transfer]) -> list[TransferResult]:
        return await self.engine.batcher.submit(transfers)

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

    def today(self) -> tuple[int, int]:
        """[start, end) of the current campus-local day in engine ns (per the clock)."""
        return local_day_bounds(self._clock(), self.tz)

    async def _card_ref(self, ledger: int, card_no: str) -> _CardRef | None:
        ref = self._cards.get((ledger, card_no))
        if ref is None:
            async with self._conn() as conn:
                r = await conn.fetchrow(SQL_CARD_REF, ledger, card_no)
            if r is None:
                return None
            ref = _CardRef(ledger, card_no, r["holder_id"], r["purse_account_id"],
                           r["subsidy_account_id"])
            _bounded_put(self._cards, (ledger, card_no), ref, MAX_CACHED_CARDS)
        return ref

    async def _card_state(
        self, ref: _CardRef, key: UUID, parts: Sequence[UUID], *, check_limit: bool
    ) -> _CardState:
        start, end = self.today()
        async with self._conn() as conn:
            r = await conn.fetchrow(
                SQL_CARD_STATE, ref.ledger, ref.card_no, start, end, key, list(parts), check_limit
            )
        assert r is not None, "cards and holders are never deleted"
        return _CardState(
            status=CardStatus(r["status"]),
            daily_limit=r["daily_limit"],
            pin=r["pin"],
            pin_threshold=r["pin_threshold"],
            cash=r["cash"],
            subsidy=r["subsidy"],
            spent=r["spent"],
            reversed=r["reversed"],
            existing=r["existing"],
        )

    async def _parts(self, ledger: int, ids: Sequence[UUID]) -> list[_Part]:
        async with self._conn() as conn:
            return [_part(r) for r in await conn.fetch(SQL_PARTS, ledger, list(ids))]

    async def _after(
        self, ledger: int, key: UUID, accounts: Sequence[int]
    ) -> tuple[dict[int, int], bool]:
        async with self._conn() as conn:
            rows = await conn.fetch(SQL_AFTER, ledger, list(accounts), key)
        return {r["id"]: r["available"] for r in rows}, any(r["reversed"] for r in rows)

    async def _finish(
        self,
        ledger: int,
        key: UUID,
        outcome: Outcome,
        timestamp: int | None,
        *,
        purses: tuple[int, int] | None,
        room: int | None = None,
    ) -> PaymentResult:
        """Read the balances after the operation; if a reversal of it was remembered while it
        ran, undo it now (the reversal may have looked before this posted)."""
        ids = [*(purses or ()), *((room,) if room is not None else ())]
        available, reversed_ = await self._after(ledger, key, ids)
        if outcome is Outcome.APPROVED and reversed_:
            await self._undo(ledger, key)
            available, _ = await self._after(ledger, key, ids)
        return PaymentResult(
            outcome,
            purses=(
                PurseBalances(cash=available.get(purses[0], 0), subsidy=available.get(purses[1], 0))
                if purses is not None
                else None
            ),
            room_balance=available.get(room) if room is not None else None,
            timestamp=timestamp,
        )

    def _pin_ok(
        self, term: Terminal, card_no: str, st: _CardState, amount: int, pin_block: bytes | None
    ) -> bool:
        if st.pin is None or amount <= (st.pin_threshold or 0):
            return True
        return pin_block is not None and verify_pin(term.mac_key, card_no, st.pin, pin_block)

    # -- terminals -------------------------------------------------------------------------------

    async def terminal(self, terminal_id: str) -> Terminal | None:
        """The registered terminal with this id (cached: a terminal never changes), or None."""
        term = self._terminals.get(terminal_id)
        if term is None:
            async with self._conn() as conn:
                r = await conn.fetchrow(SQL_TERMINAL, terminal_id)
            if r is None:
                return None  # not cached: it may be registered a moment later
            term = _terminal(r)
            _bounded_put(self._terminals, terminal_id, term, MAX_CACHED_TERMINALS)
        return term

    # -- card payments ---------------------------------------------------------------------------

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
            self._spend(term, card_no, amount, key, pin_block, force=force, hold=False)
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
            self._spend(term, card_no, amount, key, pin_block, force=False, hold=True)
        )

    async def _spend(
        self,
        term: Terminal,
        card_no: str,
        amount: int,
        key: UUID,
        pin_block: bytes | None,
        *,
        force: bool,
        hold: bool,
    ) -> PaymentResult:
        if term.kind not in (_HOLD_KINDS if hold else _PURCHASE_KINDS):
            return PaymentResult(Outcome.INVALID_TRANSACTION)
        if amount <= 0:
            return PaymentResult(Outcome.INVALID_AMOUNT)
        ref = await self._card_ref(term.ledger, card_no)
        if ref is None:
            return PaymentResult(Outcome.INVALID_CARD)
        code = TransferCode.HOT_WATER if hold else TransferCode.MEAL
        flags = (TransferFlag.PENDING,) if hold else (TransferFlag.FORCE,) if force else ()
        ids = (part_id(key, _SUBSIDY), part_id(key, _CASH))
        purses = (ref.purse_id, ref.subsidy_id)
        async with self._holder_locks.hold((ref.ledger, ref.holder_id)):
            st = await self._card_state(ref, key, ids, check_limit=not force)
            if st.existing:  # a retransmission: answer from what the first attempt posted
                parts = await self._parts(ref.ledger, ids)
                ok = _matches(parts, credit=term.account_id, code=code, amount=amount,
                              flags=_PENDING if hold else int(TransferFlags.FORCE) if force else 0)
                outcome = Outcome.APPROVED if ok else Outcome.DUPLICATE_DIFFERENT
                ts = parts[0].timestamp if ok and parts else None
                return await self._finish(ref.ledger, key, outcome, ts, purses=purses)
            balances = PurseBalances(cash=st.cash, subsidy=st.subsidy)
            if st.reversed:  # reversed before it arrived: approve, move nothing
                return PaymentResult(Outcome.APPROVED, purses=balances)
            refusal = _card_refusal(st.status)
            if refusal is not None:
                return PaymentResult(refusal)
            if not force and not self._pin_ok(term, card_no, st, amount, pin_block):
                return PaymentResult(Outcome.INCORRECT_PIN)
            if not force and st.daily_limit is not None and st.spent + amount > st.daily_limit:
                return PaymentResult(Outcome.DAILY_LIMIT_EXCEEDED, purses=balances)
            from_subsidy, from_cash = split_subsidy_first(amount, st.subsidy)
            timeout = self.hold_timeout_s if hold else None
            transfers = [
                Transfer(id=tid, ledger=ref.ledger, debit_account_id=debit,
                         credit_account_id=term.account_id, amount=part, code=code, flags=flags,
                         timeout_s=timeout, user_data=f"{term.terminal_id}:{card_no}")
                for tid, debit, part in (
                    (ids[0], ref.subsidy_id, from_subsidy),
                    (ids[1], ref.purse_id, from_cash),
                )
                if part > 0
            ]
            outcome, ts = outcome_of(await self._submit(_chain(transfers)))
        return await self._finish(ref.ledger, key, outcome, ts, purses=purses)

    async def balance(
        self, term: Terminal, *, card_no: str, pin_block: bytes | None = None
    ) -> PaymentResult:
        """Balance inquiry: the purses' available fen. No PIN is required (no amount), but a
        PIN block that is sent must be right."""
        return await self._guard(self._balance(term, card_no, pin_block))

    async def _balance(
        self, term: Terminal, card_no: str, pin_block: bytes | None
    ) -> PaymentResult:
        if term.kind not in _INQUIRY_KINDS:
            return PaymentResult(Outcome.INVALID_TRANSACTION)
        ref = await self._card_ref(term.ledger, card_no)
        if ref is None:
            return PaymentResult(Outcome.INVALID_CARD)
        st = await self._card_state(ref, NIL_UUID, (), check_limit=False)
        refusal = _card_refusal(st.status)
        if refusal is not None:
            return PaymentResult(refusal)
        if pin_block is not None and st.pin is not None and not verify_pin(
            term.mac_key, card_no, st.pin, pin_block
        ):
            return PaymentResult(Outcome.INCORRECT_PIN)
        return PaymentResult(Outcome.APPROVED, purses=PurseBalances(st.cash, st.subsidy))

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
        return await self._guard(self._complete(term, hold_key, amount, key, card_no))

    async def _complete(
        self, term: Terminal, hold_key: UUID, amount: int, key: UUID, card_no: str | None
    ) -> PaymentResult:
        if term.kind not in _HOLD_KINDS:
            return PaymentResult(Outcome.INVALID_TRANSACTION)
        if amount < 0:
            return PaymentResult(Outcome.INVALID_AMOUNT)
        held_ids = {part_id(hold_key, p): p for p in (_SUBSIDY, _CASH)}
        done_ids = [part_id(key, p) for p in (_SUBSIDY, _CASH)]
        async with self._conn() as conn:
            rows = await conn.fetch(SQL_PARTS, term.ledger, [*held_ids, *done_ids])
            rev = {r["original_key"] for r in await conn.fetch(
                SQL_REVERSED, term.ledger, [hold_key, key])}
        parts = [_part(r) for r in rows]
        holds = [p for p in parts if p.id in held_ids and p.flags & _PENDING]
        done = [p for p in parts if p.id in done_ids]
        if not holds:
            if hold_key in rev and not done:  # the hold was reversed before it arrived
                return PaymentResult(Outcome.APPROVED)
            return PaymentResult(Outcome.ORIGINAL_NOT_FOUND)
        if any(h.credit_account_id != term.account_id for h in holds):
            return PaymentResult(Outcome.ORIGINAL_NOT_FOUND)  # not this terminal's hold
        async with self._conn() as conn:
            r = await conn.fetchrow(SQL_HOLDER_OF_ACCOUNT, term.ledger, holds[0].debit_account_id)
        purses = (r["purse_account_id"], r["subsidy_account_id"]) if r is not None else None
        if card_no is not None:
            ref = await self._card_ref(term.ledger, card_no)
            if ref is None:
                return PaymentResult(Outcome.INVALID_CARD)
            if purses != (ref.purse_id, ref.subsidy_id):
                return PaymentResult(Outcome.INVALID_TRANSACTION)
        if done:  # a retransmission
            posted = sum(p.amount for p in done if p.flags & _POST)
            pids = {p.pending_id for p in done}
            ok = posted == amount and pids <= {h.id for h in holds}
            outcome = Outcome.APPROVED if ok else Outcome.DUPLICATE_DIFFERENT
            ts = done[0].timestamp if ok else None
            return await self._finish(term.ledger, key, outcome, ts, purses=purses)
        if key in rev:  # the completion was reversed before it arrived
            return await self._finish(term.ledger, key, Outcome.APPROVED, None, purses=purses)
        if any(h.state == "expired" for h in holds):
            return PaymentResult(Outcome.ORIGINAL_NOT_FOUND)
        if any(h.state != "pending" for h in holds):
            return PaymentResult(Outcome.INVALID_TRANSACTION)
        if amount > sum(h.amount for h in holds):
            return PaymentResult(Outcome.INVALID_AMOUNT)
        holds.sort(key=lambda h: held_ids[h.id] != _SUBSIDY)  # settle the subsidy part first
        rest = amount
        transfers = []
        for h in holds:
            take = min(rest, h.amount)
            rest -= take
            # post_pending with amount 0 would mean "the full hold": a zero part is a void
            transfers.append(
                Transfer(id=part_id(key, held_ids[h.id]), ledger=term.ledger, pending_id=h.id,
                         amount=take, flags=(TransferFlag.POST_PENDING,))
                if take
                else Transfer(id=part_id(key, held_ids[h.id]), ledger=term.ledger,
                              pending_id=h.id, flags=(TransferFlag.VOID_PENDING,))
            )
        outcome, ts = outcome_of(await self._submit(_chain(transfers)))
        return await self._finish(term.ledger, key, outcome, ts, purses=purses)

    async def buy_electricity(
        self,
        term: Terminal,
        *,
        card_no: str,
        room_id: str,
        amount: int,
        key: UUID,
        pin_block: bytes | None = None,
    ) -> PaymentResult:
        """Buy electricity for a dorm room: the card's cash purse pays the room purse (code 3).
        Card state, PIN and daily limit apply; an unknown room is INVALID_TRANSACTION. Kiosk
        and POS terminals."""
        return await self._guard(
            self._buy_electricity(term, card_no, room_id, amount, key, pin_block)
        )

    async def _buy_electricity(
        self,
        term: Terminal,
        card_no: str,
        room_id: str,
        amount: int,
        key: UUID,
        pin_block: bytes | None,
    ) -> PaymentResult:
        if term.kind not in _ELECTRICITY_KINDS:
            return PaymentResult(Outcome.INVALID_TRANSACTION)
        if amount <= 0:
            return PaymentResult(Outcome.INVALID_AMOUNT)
        ref = await self._card_ref(term.ledger, card_no)
        if ref is None:
            return PaymentResult(Outcome.INVALID_CARD)
        room = room_account_id(term.ledger, room_id)
        tid = part_id(key, _CASH)
        purses = (ref.purse_id, ref.subsidy_id)
        async with self._holder_locks.hold((ref.ledger, ref.holder_id)):
            st = await self._card_state(ref, key, (tid,), check_limit=True)
            if st.existing:
                parts = await self._parts(ref.ledger, (tid,))
                ok = _matches(parts, credit=room, code=TransferCode.ELECTRICITY, amount=amount,
                              flags=0)
                outcome = Outcome.APPROVED if ok else Outcome.DUPLICATE_DIFFERENT
                ts = parts[0].timestamp if ok and parts else None
                return await self._finish(ref.ledger, key, outcome, ts, purses=purses, room=room)
            if st.reversed:
                return await self._finish(ref.ledger, key, Outcome.APPROVED, None,
                                          purses=purses, room=room)
            refusal = _card_refusal(st.status)
            if refusal is not None:
                return PaymentResult(refusal)
            if not self._pin_ok(term, card_no, st, amount, pin_block):
                return PaymentResult(Outcome.INCORRECT_PIN)
            if st.daily_limit is not None and st.spent + amount > st.daily_limit:
                return PaymentResult(Outcome.DAILY_LIMIT_EXCEEDED,
                                     purses=PurseBalances(st.cash, st.subsidy))
            transfer = Transfer(id=tid, ledger=ref.ledger, debit_account_id=ref.purse_id,
                                credit_account_id=room, amount=amount,
                                code=TransferCode.ELECTRICITY,
                                user_data=f"{term.terminal_id}:{card_no}")
            outcome, ts = outcome_of(await self._submit([transfer]))
        return await self._finish(ref.ledger, key, outcome, ts, purses=purses, room=room)

    async def meter_usage(
        self, term: Terminal, *, room_id: str, amount: int, key: UUID
    ) -> PaymentResult:
        """A room meter's consumption: room purse -> the meter's utility account, code 3,
        always posted with ``force``. APPROVED while the room balance after it is > 0,
        INSUFFICIENT_FUNDS (cut the power) when it is <= 0; ``room_balance`` either way.
        Meter terminals only; an unknown room is INVALID_TRANSACTION."""
        return await self._guard(self._meter_usage(term, room_id, amount, key))

    async def _meter_usage(
        self, term: Terminal, room_id: str, amount: int, key: UUID
    ) -> PaymentResult:
        if term.kind is not TerminalKind.METER:
            return PaymentResult(Outcome.INVALID_TRANSACTION)
        if amount <= 0:
            return PaymentResult(Outcome.INVALID_AMOUNT)
        room = room_account_id(term.ledger, room_id)
        tid = part_id(key, _ROOM)
        async with self._conn() as conn:
            rows = await conn.fetch(SQL_PARTS, term.ledger, [tid])
            reversed_ = await conn.fetchval(SQL_REVERSED, term.ledger, [key]) is not None
        if rows:
            ok = _matches([_part(r) for r in rows], credit=term.account_id,
                          code=TransferCode.ELECTRICITY, amount=amount,
                          flags=int(TransferFlags.FORCE)) and rows[0]["debit_account_id"] == room
            if not ok:
                return PaymentResult(Outcome.DUPLICATE_DIFFERENT)
            ts = rows[0]["timestamp"]
        elif reversed_:
            ts = None
        else:
            transfer = Transfer(id=tid, ledger=term.ledger, debit_account_id=room,
                                credit_account_id=term.account_id, amount=amount,
                                code=TransferCode.ELECTRICITY, flags=(TransferFlag.FORCE,),
                                user_data=f"{term.terminal_id}:{room_id}")
            outcome, ts = outcome_of(await self._submit([transfer]))
            if outcome is not Outcome.APPROVED:
                return PaymentResult(outcome)
        r = await self._finish(term.ledger, key, Outcome.APPROVED, ts, purses=None, room=room)
        if r.room_balance is None:
            return PaymentResult(Outcome.INVALID_TRANSACTION)
        return msgspec.structs.replace(
            r, outcome=Outcome.APPROVED if r.room_balance > 0 else Outcome.INSUFFICIENT_FUNDS
        )

    # -- reversals -------------------------------------------------------------------------------

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
        return await self._guard(self._reverse(term, original_key, key))

    async def _reverse(self, term: Terminal, original_key: UUID, key: UUID) -> PaymentResult:
        async with self._conn() as conn:
            await conn.execute(SQL_REMEMBER_REVERSAL, term.ledger, original_key, key,
                               term.terminal_id, time.time_ns())
        ts = await self._undo(term.ledger, original_key)
        return PaymentResult(Outcome.APPROVED, timestamp=ts)

    async def _undo(self, ledger: int, original_key: UUID) -> int | None:
        """Post the undo of every transfer the operation ``original_key`` posted (once: the
        ids are derived); returns the first undo's timestamp, if anything was undone."""
        ids = [part_id(original_key, p) for p in _ALL_PARTS]
        for _ in range(UNDO_ATTEMPTS):
            transfers: list[Transfer] = []
            for p in await self._parts(ledger, ids):
                if p.flags & _PENDING:
                    if p.state == "pending":
                        transfers.append(Transfer(id=reversal_id(p.id), ledger=ledger,
                                                  pending_id=p.id,
                                                  flags=(TransferFlag.VOID_PENDING,)))
                elif not p.flags & _VOID:
                    # money back, even out of a room purse already burnt down: it was never due
                    transfers.append(Transfer(
                        id=reversal_id(p.id), ledger=ledger,
                        debit_account_id=p.credit_account_id, credit_account_id=p.debit_account_id,
                        amount=p.amount, code=TransferCode.REVERSAL, flags=(TransferFlag.FORCE,),
                        user_data=str(p.id)))
            if not transfers:
                return None
            results = await self._submit(_chain(transfers))
            outcome, ts = outcome_of(results)
            if outcome is Outcome.APPROVED:
                return ts
            # a completion may have settled the hold between our read and our void: re-read
            log.warning("campus: undo of %s failed (%s); retrying", original_key,
                        [r.status.value for r in results])
        log.error("campus: could not undo %s", original_key)
        return None

    # -- registry: holders -----------------------------------------------------------------------

    async def create_holder(
        self, *, holder_id: str, ledger: int, name: str, kind: HolderKind
    ) -> HolderResult | Refused:
        """Register a holder and create its cash and subsidy purses (``purse``/``subsidy``
        with ``debits_must_not_exceed_credits``). Idempotent: the same holder again answers
        ``exists``; one whose name or kind differs ``exists_with_different_fields``."""
        async with self._conn() as conn:
            r = await conn.fetchrow(SQL_HOLDER, ledger, holder_id)
        if r is not None:
            return _holder_result(_holder(r), name, kind)
        purse_id, subsidy_id = holder_account_ids(ledger, holder_id)
        no_overdraft = (AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,)
        statuses = await self.engine.store.create_accounts([
            Account(id=purse_id, ledger=ledger, kind=AccountKind.PURSE, code=PURSE_CODE,
                    flags=no_overdraft, holder_id=holder_id, name=name),
            Account(id=subsidy_id, ledger=ledger, kind=AccountKind.SUBSIDY, code=SUBSIDY_CODE,
                    flags=no_overdraft, holder_id=holder_id, name=name),
        ])
        for aid, st in zip((purse_id, subsidy_id), statuses, strict=True):
            if st not in (AccountStatus.CREATED, AccountStatus.EXISTS):
                return Refused(Refusal.ACCOUNT_ID_TAKEN, f"account {aid} exists: {st}")
        async with self._conn() as conn:
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

    # -- registry: cards -------------------------------------------------------------------------

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
        unique across ledgers). Card numbers are unique across ledgers. Issuing the same card
        to the same holder again answers the stored card unchanged; a holder with an active
        card gets HOLDER_HAS_ACTIVE_CARD (use ``replace_card``)."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute(SQL_ADVISORY_LOCK, _CARD_LOCK, [card_no])
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
                card = _card(r)
                if (card.ledger, card.holder_id) != (ledger, holder_id):
                    return Refused(Refusal.CARD_NUMBER_TAKEN,
                                   f"card {card_no} belongs to another holder")
                return card
            active = await conn.fetchval(SQL_ACTIVE_CARD, ledger, holder_id)
            if active is not None:
                return Refused(Refusal.HOLDER_HAS_ACTIVE_CARD,
                               f"holder {holder_id!r} already has active card {active}")
            await conn.execute(SQL_INSERT_CARD, ledger, card_no, holder_id, daily_limit, pin,
                               pin_threshold, time.time_ns())
            await _sync_freeze(conn, ledger, holder_id)
        return Card(card_no, ledger, holder_id, CardStatus.ACTIVE, daily_limit, pin,
                    pin_threshold)

    async def get_card(self, card_no: str) -> Card | None:
        """The card with this number, or None."""
        async with self._conn() as conn:
            r = await conn.fetchrow(SQL_CARD_BY_NO, card_no)
        return None if r is None else _card(r)

    async def _transition(
        self,
        card_no: str,
        target: CardStatus,
        allowed: frozenset[CardStatus],
    ) -> Card | Refused:
        """Move a card to ``target`` (already there: answered unchanged) and re-derive the
        purses' frozen flag, all in one transaction under the holder's row lock."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute(SQL_ADVISORY_LOCK, _CARD_LOCK, [card_no])
            r = await conn.fetchrow(SQL_CARD_BY_NO, card_no)
            if r is None:
                return Refused(Refusal.CARD_NOT_FOUND, f"no card {card_no}")
            card = _card(r)
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

    async def report_lost(self, card_no: str) -> Card | Refused:
        """active -> lost: the holder's purses are frozen at once (debits refused by the ledger
        itself, whoever submits them). Reporting a lost card again changes nothing."""
        return await self._transition(card_no, CardStatus.LOST, frozenset({CardStatus.ACTIVE}))

    async def card_found(self, card_no: str) -> Card | Refused:
        """lost -> active (the card turned up): unfreezes the purses, unless the holder has
        been given another active card meanwhile."""
        return await self._transition(card_no, CardStatus.ACTIVE, frozenset({CardStatus.LOST}))

    async def close_card(self, card_no: str) -> Card | Refused:
        """active|lost -> closed. The purses keep their money (a closure payout is a transfer);
        they stay frozen only while another card of the holder is lost."""
        return await self._transition(
            card_no, CardStatus.CLOSED, frozenset({CardStatus.ACTIVE, CardStatus.LOST})
        )

    async def replace_card(self, card_no: str, new_card_no: str) -> Replacement | Refused:
        """active|lost -> replaced, and a new active card for the same holder with the same
        limits and PIN. The purses (and their balance) stay; no money moves; they are
        unfrozen. Repeating the same replacement answers it again."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute(SQL_ADVISORY_LOCK, _CARD_LOCK, sorted({card_no, new_card_no}))
            r = await conn.fetchrow(SQL_CARD_BY_NO, card_no)
            if r is None:
                return Refused(Refusal.CARD_NOT_FOUND, f"no card {card_no}")
            old = _card(r)
            await conn.fetchval(SQL_LOCK_HOLDER, old.ledger, old.holder_id)
            r = await conn.fetchrow(SQL_CARD_BY_NO, new_card_no)
            if old.status is CardStatus.REPLACED and old.replaced_by == new_card_no:
                assert r is not None
                return Replacement(old, _card(r))
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
            await conn.execute(SQL_INSERT_CARD, old.ledger, new_card_no, old.holder_id,
                               old.daily_limit, old.pin, old.pin_threshold, now)
            await _sync_freeze(conn, old.ledger, old.holder_id)
        return Replacement(
            msgspec.structs.replace(old, status=CardStatus.REPLACED, replaced_by=new_card_no),
            Card(new_card_no, old.ledger, old.holder_id, CardStatus.ACTIVE, old.daily_limit,
                 old.pin, old.pin_threshold),
        )

    async def card_balance(self, card_no: str) -> CardBalance | None:
        """The card and its holder's purses (whatever the card's state), or None."""
        async with self._conn() as conn:
            r = await conn.fetchrow(SQL_CARD_BY_NO, card_no)
            if r is None:
                return None
            card = _card(r)
            rows = await conn.fetch(SQL_PURSES, card.ledger, card.holder_id)
        purses = [Purse(r["id"], AccountKind(r["kind"]), r["balance"], r["available"])
                  for r in rows]
        return CardBalance(card, purses, sum(p.available for p in purses))

    # -- registry: terminals and rooms -----------------------------------------------------------

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
        """Register a terminal. It will credit only ``account_id``, which must be a merchant or
        utility account of the same ledger. Terminal ids are unique across ledgers; a
        registered terminal never changes (a different request answers
        ``exists_with_different_fields``)."""
        want = Terminal(terminal_id, merchant_id, ledger, kind, account_id, mac_key)
        async with self._conn() as conn, conn.transaction():
            await conn.execute(SQL_ADVISORY_LOCK, _TERMINAL_LOCK, [terminal_id])
            r = await conn.fetchrow(SQL_TERMINAL, terminal_id)
            if r is not None:
                if _terminal(r) == want:
                    return RegistryStatus.EXISTS
                return RegistryStatus.EXISTS_WITH_DIFFERENT_FIELDS
            account_kind = await conn.fetchval(SQL_ACCOUNT_KIND, ledger, account_id)
            if account_kind is None:
                return Refused(Refusal.ACCOUNT_NOT_FOUND,
                               f"no account {account_id} in ledger {ledger}")
            if account_kind not in (AccountKind.MERCHANT, AccountKind.UTILITY):
                return Refused(Refusal.ACCOUNT_NOT_CREDITABLE,
                               f"account {account_id} is a {account_kind} account; a terminal "
                               "credits a merchant or utility account")
            await conn.execute(SQL_INSERT_TERMINAL, ledger, terminal_id, merchant_id, str(kind),
                               account_id, mac_key, time.time_ns())
        return RegistryStatus.CREATED

    async def create_room(self, *, room_id: str, ledger: int) -> Room | Refused:
        """Create (idempotently) a dorm room and its ``room`` purse (no overdraft)."""
        account_id = room_account_id(ledger, room_id)
        [st] = await self.engine.store.create_accounts([
            Account(id=account_id, ledger=ledger, kind=AccountKind.ROOM, code=ROOM_CODE,
                    flags=(AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,), name=room_id)
        ])
        if st not in (AccountStatus.CREATED, AccountStatus.EXISTS):
            return Refused(Refusal.ACCOUNT_ID_TAKEN, f"account {account_id} exists: {st}")
        async with self._conn() as conn:
            await conn.execute(SQL_INSERT_ROOM, ledger, room_id, account_id, time.time_ns())
        return Room(room_id, ledger, account_id)


async def _sync_freeze(conn: asyncpg.pool.PoolConnectionProxy, ledger: int, holder_id: str) -> None:
    await conn.execute(SQL_LOCK_PURSES, ledger, holder_id)
    await conn.execute(SQL_SYNC_FREEZE, ledger, holder_id)


def _holder_result(h: Holder, name: str, kind: HolderKind) -> HolderResult:
    same = h.name == name and h.kind == kind
    return HolderResult(
        RegistryStatus.EXISTS if same else RegistryStatus.EXISTS_WITH_DIFFERENT_FIELDS, h
    )

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
  Wrong PINs are counted per card and campus-local day (``pin_tries``): after
  ``limits.PIN_TRIES_PER_DAY`` every PIN check of the card fails until the next day or a reset.

Terminal operations (``purchase`` … ``reverse``) return a :class:`PaymentResult`; every transfer
they post has an id derived from the request ``key``, so a retransmission never posts twice,
and goes through the engine's batcher (group commit). Registry operations used by the HTTP API
return their result or a :class:`Refused` with the reason.

Reversals are remembered in ``reversals`` before anything else happens, and every original
re-reads that memory after it posted: whichever of the two comes second sees the other, so an
original and its reversal racing on two connections (or two processes) always net to zero.

The hot path makes no database round trip of its own per request. Every read a terminal
operation needs (the card, the purses, today's spending, the reversal memory, an earlier
attempt's transfers, the balances after) goes through a :class:`Coalescer`: the requests that
arrive while one statement runs share the next one, exactly as the batcher's group commit
shares a transaction, so the reads grow with the load in rows, not in round trips. Card
numbers map to holders and purses through a cache (that mapping never changes); the card's
state itself is read fresh in the shared statement, so a report-lost, replacement or closure
takes effect at once, from any process. Today's spending is remembered per holder after a
first read and kept up to date from every commit the batcher reports, whatever its door (see
:class:`_SpendMemory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from typing import Any, Final, Generic, TypeVar
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from engine import limits
from engine.batcher import RETRYABLE, Batcher, Overloaded, TransferResult, Unavailable
from engine.pin import verify_pin
from engine.service import Engine
from ledger.account import Account
from ledger.ids import child
from ledger.status import AccountStatus, TransferStatus
from ledger.transfer import MAX_TIMEOUT_S, StoredTransfer, Transfer
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
# Requests one shared read statement serves at most (rows of its unnest arrays): bounds the
# statement's size and how long the requests behind it wait for the next one.
COALESCE_MAX_BATCH: Final = 2048
# A coalescer whose queue ran dry keeps its connection this long for the next request before
# it gives it back (giving it back costs a reset round trip; under load work comes every ms).
COALESCE_LINGER_S: Final = 0.05
# Run once on each connection a campus coalescer takes (the engine's pool already sets it as a
# session default; a pool with the default reset would undo a SET on release). A shared
# read of a large batch can be costed past jit_above_cost; compiling it takes ~40 ms, many
# times what running it takes.
COALESCE_SESSION: Final = "SET jit = off"
# Today's spending of a holder is re-read from the ledger at least this often, so spending
# through another engine process (whose commits this one does not hear) counts within this long.
SPEND_MEMORY_TTL_S: Final = 5.0
MAX_REMEMBERED_HOLDERS: Final = 262_144  # holders whose spending today is remembered

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
_SPENDING_CODE_SET: Final = frozenset(int(c) for c in _SPENDING_CODES)  # plain ints: hot path
_REVERSAL_CODE: Final = int(TransferCode.REVERSAL)
_NS_PER_S: Final = 1_000_000_000
_CARD_NO: Final = re.compile(r"[0-9]{8,19}")  # the cards table's CHECK
_ANY_LEDGER: Final = 0  # coalescing key of reads that find their ledger (terminals by id)
TERMINAL_ID_LEN: Final = 8  # field 41 (ans8); the terminals table's CHECK
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
    PIN_TRIES_EXCEEDED = "pin_tries_exceeded"
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


# Part names: the transfers one operation posts, each id = child(key, part): derived, and
# beside the request's key in time order (ledger/ids.py).
_SUBSIDY: Final = "subsidy"
_CASH: Final = "cash"
_ROOM: Final = "room"
_ALL_PARTS: Final = (_SUBSIDY, _CASH, _ROOM)


def part_id(key: UUID, part: str) -> UUID:
    """Id of one transfer of the operation ``key`` (deterministic: retries post nothing)."""
    return child(key, part)


def reversal_id(transfer_id: UUID) -> UUID:
    """Id of the transfer that undoes ``transfer_id``: one undo, however many reversals."""
    return child(transfer_id, "reversal")


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
    if len(transfers) < 2:
        return transfers
    linked = (TransferFlag.LINKED,)
    return [
        msgspec.structs.replace(t, flags=(*t.flags, *linked)) if i < len(transfers) - 1 else t
        for i, t in enumerate(transfers)
    ]


def split_subsidy_first(amount: int, subsidy_available: int) -> tuple[int, int]:
    """(from subsidy, from cash): the subsidy purse pays first, the cash purse the rest."""
    from_subsidy = min(amount, max(subsidy_available, 0))
    return from_subsidy, amount - from_subsidy


def _showable(*balances: int) -> bool:
    """Whether a terminal answer can show each of ``balances`` (field 54: 12 digits of fen)."""
    return all(abs(b) <= limits.TERMINAL_FIELD_MAX_FEN for b in balances)


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
# The hot-path reads below each serve a whole batch of requests of one ledger (see
# Coalescer): one row per request in, found by its ordinal, never a statement per request.

SQL_CARD_REFS = """
SELECT c.card_no, c.holder_id, h.purse_account_id, h.subsidy_account_id
FROM cards c JOIN holders h ON h.ledger = c.ledger AND h.id = c.holder_id
WHERE c.ledger = $1 AND c.card_no = ANY($2::text[])
"""
# Everything a card payment decides on. Today's spending is summed from the ledger itself
# (only where it is asked for and the card has a limit): spending codes debiting the holder's
# purses within the local day, a hold while it still holds (its post counts once settled),
# nothing that was reversed (a reversal carries the reversed transfer's id in user_data);
# with it the earliest timeout of the holds it counted, after which the sum falls by itself,
# and the ledger's clock as this statement saw it: every transfer stamped at or before it is in
# the sum, none after it (see _SpendMemory). The sum is numeric, capped at the bigint range:
# two purses' debits may add up past it, and one overflow would fail every payment sharing
# the statement (a capped sum is still over any limit).
# The sum walks transfers_debit per purse (and transfers_credit for the reversal check), never
# the ledger's whole day: the ranges are row comparisons on (account, timestamp), which no other
# index can serve, so even stale statistics (a fresh ledger) cannot turn a limited payment into
# a scan of every transfer of the day.
# The daily limit is the lower of the card office's and the holder's own (holder_limits, set
# at /self/limit): a holder can only ever tighten it.
SQL_CARD_STATES = f"""
SELECT q.i, c.status, least(c.daily_limit, hl.daily_limit) AS daily_limit, c.pin,
       c.pin_threshold,
       p.credits_posted - p.debits_posted - p.debits_pending AS cash,
       s.credits_posted - s.debits_posted - s.debits_pending AS subsidy,
       d.spent, d.hold_expiry,
       (SELECT l.last_timestamp FROM ledgers l WHERE l.ledger = $1) AS clock,
       EXISTS (SELECT 1 FROM reversals v WHERE v.ledger = $1 AND v.original_key = q.key)
           AS reversed,
       EXISTS (SELECT 1 FROM transfers e WHERE e.ledger = $1 AND e.id IN (q.part_a, q.part_b))
           AS existing
FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::uuid[], $6::uuid[], $7::uuid[],
            $8::bool[], $9::bigint[], $10::bigint[])
     WITH ORDINALITY AS q(card_no, purse_id, subsidy_id, key, part_a, part_b, want_spent,
                          day_start, day_end, i)
JOIN cards c ON c.ledger = $1 AND c.card_no = q.card_no
LEFT JOIN holder_limits hl ON hl.ledger = $1 AND hl.holder_id = c.holder_id
JOIN accounts p ON p.ledger = $1 AND p.id = q.purse_id
JOIN accounts s ON s.ledger = $1 AND s.id = q.subsidy_id
LEFT JOIN LATERAL (
    SELECT least(coalesce(sum(t.amount), 0), {INT64_MAX})::bigint AS spent,
           min(hd.expires_at) FILTER (WHERE hd.state = 'pending' AND hd.expires_at > 0)
               AS hold_expiry
    FROM unnest(ARRAY[q.purse_id, q.subsidy_id]) AS a(id)
    CROSS JOIN LATERAL (
        SELECT t.id, t.ledger, t.debit_account_id, t.amount, t.flags, t.timestamp
        FROM transfers t
        WHERE t.ledger = $1 AND t.debit_account_id = a.id
          AND (t.debit_account_id, t.timestamp) >= (a.id, q.day_start)
          AND (t.debit_account_id, t.timestamp) < (a.id, q.day_end)
          AND t.code IN ({", ".join(str(int(c)) for c in _SPENDING_CODES)})
          AND t.flags & {_VOID} = 0
        OFFSET 0  -- kept a subquery: scanned per purse, never hoisted into a ledger scan
    ) t
    LEFT JOIN holds hd ON hd.ledger = t.ledger AND hd.id = t.id
    WHERE q.want_spent AND coalesce(c.daily_limit, hl.daily_limit) IS NOT NULL
      AND (t.flags & {_PENDING} = 0 OR hd.state = 'pending')
      AND NOT EXISTS (
          SELECT 1 FROM transfers r
          WHERE r.ledger = $1 AND r.credit_account_id = t.debit_account_id
            AND (r.credit_account_id, r.timestamp) > (t.debit_account_id, t.timestamp)
            AND r.code = {int(TransferCode.REVERSAL)} AND r.user_data = t.id::text)
) d ON q.want_spent AND coalesce(c.daily_limit, hl.daily_limit) IS NOT NULL
"""
# Balances after operations ($2: every account asked about), and which of the operations
# ($3: their keys) a reversal has been remembered for meanwhile.
SQL_AFTER = """
SELECT a.id, a.credits_posted - a.debits_posted - a.debits_pending AS available,
       NULL::uuid AS reversed
FROM accounts a WHERE a.ledger = $1 AND a.id = ANY($2::bigint[])
UNION ALL
SELECT NULL, NULL, v.original_key FROM reversals v
WHERE v.ledger = $1 AND v.original_key = ANY($3::uuid[])
"""
# Transfers earlier operations posted ($2: their ids), with the hold state and the purses of
# the holder they debit; and the reversals remembered for $3 (rows with only `reversed`).
SQL_PARTS = """
SELECT t.id, t.debit_account_id, t.credit_account_id, t.amount, t.code, t.flags,
       t.pending_id, t.timestamp, hd.state, h.purse_account_id, h.subsidy_account_id,
       NULL::uuid AS reversed
FROM transfers t
LEFT JOIN holds hd ON hd.ledger = t.ledger AND hd.id = t.id
LEFT JOIN accounts a ON a.ledger = t.ledger AND a.id = t.debit_account_id
LEFT JOIN holders h ON h.ledger = a.ledger AND h.id = a.holder_id
WHERE t.ledger = $1 AND t.id = ANY($2::uuid[])
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, v.original_key
FROM reversals v WHERE v.ledger = $1 AND v.original_key = ANY($3::uuid[])
"""
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
SQL_REMEMBER_REVERSAL = """
INSERT INTO reversals (ledger, original_key, key, terminal_id, created_at)
VALUES ($1, $2, $3, $4, $5) ON CONFLICT (ledger, original_key) DO NOTHING
"""
# Terminal ids are unique across ledgers; should two ledgers ever hold one, the lowest wins.
SQL_TERMINALS = """
SELECT DISTINCT ON (terminal_id) terminal_id, merchant_id, ledger, kind, account_id, mac_key
FROM terminals WHERE terminal_id = ANY($1::text[]) ORDER BY terminal_id, ledger
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


class _StateQuery(msgspec.Struct, frozen=True):
    """One request's row of SQL_CARD_STATES."""

    ref: _CardRef
    key: UUID
    part_a: UUID
    part_b: UUID
    want_spent: bool
    day_start: int
    day_end: int


class _CardState(msgspec.Struct, frozen=True):
    status: CardStatus
    daily_limit: int | None
    pin: str | None
    pin_threshold: int | None
    cash: int
    subsidy: int
    spent: int | None  # None: not summed (not asked for, or the card has no limit)
    hold_expiry: int | None  # earliest timeout of the holds ``spent`` counts
    clock: int  # the ledger's last timestamp as the read saw it (0: no transfer yet)
    reversed: bool
    existing: bool


class _Part(msgspec.Struct, frozen=True):
    """A transfer some earlier operation posted, with its hold state if it is a hold, and the
    purses of the holder it debits (None when it debits no holder, e.g. a room)."""

    id: UUID
    debit_account_id: int
    credit_account_id: int
    amount: int
    code: int
    flags: int
    pending_id: UUID | None
    timestamp: int
    state: str | None
    purses: tuple[int, int] | None


def _part(r: asyncpg.Record) -> _Part:
    purse, subsidy = r["purse_account_id"], r["subsidy_account_id"]
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
        purses=None if purse is None else (purse, subsidy),
    )


class _PartsQuery(msgspec.Struct, frozen=True):
    """Transfers by id, and reversal memory by original key, for one request."""

    ids: tuple[UUID, ...]
    keys: tuple[UUID, ...] = ()


class _PartsAnswer(msgspec.Struct, frozen=True):
    parts: list[_Part]  # in timestamp order
    reversed: frozenset[UUID]


class _PinTry(msgspec.Struct, frozen=True):
    """One PIN check of a card on a campus-local day; ``wrong``: a wrong PIN block was sent
    (counted). A right or missing one only asks for the count."""

    card_no: str
    day: date
    wrong: bool


class _AfterQuery(msgspec.Struct, frozen=True):
    key: UUID
    accounts: tuple[int, ...]


class _AfterAnswer(msgspec.Struct, frozen=True):
    available: dict[int, int]
    reversed: bool


_I = TypeVar("_I")
_R = TypeVar("_R")
Connection = asyncpg.Connection | PoolConnectionProxy


class Coalescer(Generic[_I, _R]):
    """Turns concurrent one-item requests into one set-based statement per ledger.

    ``run(conn, ledger, items)`` answers a batch of items in order. While one statement runs,
    the next items gather (the batcher's group commit, in small), so under load one round trip
    serves many requests and the cost per request falls as the load rises. Only one statement
    is in flight per coalescer, on one pool connection that is held while work keeps coming
    and ``linger_s`` after: a pool release costs a round trip of its own (asyncpg resets the
    session). ``session`` (if any) runs once on each connection taken.

    A failed statement answers its batch with the exception; a connection that failed is
    released and the next batch takes a fresh one; when no connection can be had, everything
    waiting is answered with that error.
    """

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        run: Callable[[Connection, int, list[_I]], Awaitable[list[_R]]],
        *,
        max_batch: int = COALESCE_MAX_BATCH,
        acquire_timeout_s: float | None = limits.DB_ACQUIRE_TIMEOUT_S,
        linger_s: float = COALESCE_LINGER_S,
        session: str | None = None,
        name: str = "onecard-coalescer",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be positive")
        self._pool = pool
        self._run = run
        self._max = max_batch
        self._acquire_timeout_s = acquire_timeout_s
        self._linger_s = linger_s
        self._session = session
        self._name = name
        self._pending: dict[int, list[tuple[_I, asyncio.Future[_R]]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # set when work arrives while the flush task lingers
        self.statements = 0  # statements run (tests and metrics read it)
        self.acquired = 0  # connections taken from the pool (tests read it)

    async def submit(self, ledger: int, item: _I) -> _R:
        """Queue ``item`` for ``ledger`` and wait for its result."""
        fut: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(ledger, []).append((item, fut))
        if self._task is None:
            self._wake = asyncio.Event()  # of the running loop, whichever that is now
            self._task = asyncio.create_task(self._flush(), name=self._name)
        else:
            self._wake.set()
        return await fut

    async def _more(self) -> bool:
        """Whether there is work, waiting up to the linger for some when there is none."""
        if not self._pending and self._linger_s > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._linger_s):
                    await self._wake.wait()
        return bool(self._pending)

    def _take(self) -> tuple[int, list[tuple[_I, asyncio.Future[_R]]]]:
        ledger = next(iter(self._pending))
        queue = self._pending.pop(ledger)
        if len(queue) > self._max:
            # the rest goes to the back of the line: other ledgers' requests go first
            self._pending[ledger] = queue[self._max :]
            queue = queue[: self._max]
        return ledger, queue

    async def _flush(self) -> None:
        try:
            while self._pending:
                try:
                    async with self._pool().acquire(timeout=self._acquire_timeout_s) as conn:
                        self.acquired += 1
                        if self._session is not None:
                            await conn.execute(self._session)
                        while await self._more():
                            ledger, batch = self._take()
                            try:
                                self.statements += 1
                                results = await self._run(conn, ledger, [i for i, _ in batch])
                            except Exception as e:
                                _settle(batch, exc=e)
                                if isinstance(e, asyncpg.PostgresError) and not conn.is_closed():
                                    continue  # the statement failed, the connection did not
                                break
                            _settle(batch, results=results)
                except Exception as e:  # no connection to be had: everyone waiting hears why
                    waiting, self._pending = self._pending, {}
                    for queue in waiting.values():
                        _settle(queue, exc=e)
        finally:
            self._task = None


def _settle(
    batch: list[tuple[Any, asyncio.Future[Any]]],
    *,
    results: Sequence[Any] | None = None,
    exc: BaseException | None = None,
) -> None:
    """Answer every future of ``batch`` (a caller that went away has a done future)."""
    if results is not None and len(results) != len(batch):
        exc, results = AssertionError("a coalesced statement answered the wrong count"), None
    for n, (_, fut) in enumerate(batch):
        if fut.done():
            continue
        if results is not None:
            fut.set_result(results[n])
        else:
            fut.set_exception(exc or RuntimeError("no result"))


class _HolderSpend:
    """One holder's remembered spending: day start -> (fen, good until (monotonic s), earliest
    hold timeout it counts (engine ns, 0: none), the ledger clock the sum was read at)."""

    __slots__ = ("accounts", "days")

    def __init__(self, accounts: tuple[int, int]) -> None:
        self.accounts = accounts
        self.days: dict[int, tuple[int, float, int, int]] = {}


class _Reading:
    """A read of one holder's spending in flight, and what this process committed meanwhile
    that may or may not be in it: (timestamp, fen, hold timeout) of spending added, and
    whether anything lowered the spending (then the read is not remembered)."""

    __slots__ = ("accounts", "added", "lowered")

    def __init__(self, accounts: tuple[tuple[int, int], tuple[int, int]]) -> None:
        self.accounts = accounts
        self.added: list[tuple[int, int, int]] = []
        self.lowered = False


class _SpendMemory:
    """Today's spending per holder (for daily limits), remembered after a first read; the
    batcher's :class:`~engine.batcher.CommitObserver`.

    The ledger's own sum is read on first touch (in the shared card-state statement, with the
    ledger's clock as that statement saw it). From then on every group this process commits is
    reported here, whatever door it came through (a terminal, ``POST /v1/transfers``, a
    subsidy), and the spending it adds is added: what the read counts (``SQL_CARD_STATES``),
    the spending codes debiting the holder's purses, a hold while it holds. A transfer stamped
    at or before the clock of the read is in the sum already and is not added twice; one
    committed while the read was in flight is collected for it (:class:`_Reading`) and added
    if the read did not see it. Anything that lowers spending (a hold posted or voided, a
    reversal crediting the purse, a hold reaching its timeout) drops the holder's entry, and
    the next payment reads the sum again. So within this process the remembered sum is the
    ledger's, never lower. A commit whose outcome is unknown (``unknown``) forgets everything.

    Spending through *another* engine process is not reported here; it is counted once the
    entry ages out (``ttl_s``) and the sum is read again: the limit is exact per process (see
    :class:`Campus`), the money is exact everywhere (the ledger refuses every overdraft and
    every debit of a frozen purse whoever submits it).

    Until :meth:`watching` (the Campus registered it with a batcher that reports commits)
    nothing is remembered: every limited payment reads the sum.
    """

    def __init__(self, *, ttl_s: float, max_holders: int, day_of: Callable[[int], int]) -> None:
        self._ttl_s = ttl_s
        self._max = max_holders
        self._day_of = day_of
        self.watching = False
        # (ledger, purse id) and (ledger, subsidy id) both name the holder's one record
        self._holders: dict[tuple[int, int], _HolderSpend] = {}
        self._reading: dict[tuple[int, int], _Reading] = {}  # at most one per holder (its lock)

    def lookup(self, ledger: int, purse: int, day: int) -> int | None:
        """The remembered spending of the local day starting at ``day``, or None."""
        rec = self._holders.get((ledger, purse))
        entry = None if rec is None else rec.days.get(day)
        if entry is not None:
            assert rec is not None
            spent, until, hold_expiry, _ = entry
            if time.monotonic() < until and (not hold_expiry or time.time_ns() < hold_expiry):
                return spent
            del rec.days[day]
        return None

    def begin(self, ledger: int, purse: int, subsidy: int) -> _Reading:
        """A read of the holder's spending starts now: collect what commits meanwhile."""
        r = _Reading(((ledger, purse), (ledger, subsidy)))
        for k in r.accounts:
            self._reading[k] = r
        return r

    def end(self, r: _Reading) -> None:
        """The read is over (answered or failed): stop collecting for it."""
        for k in r.accounts:
            if self._reading.get(k) is r:
                del self._reading[k]

    def finish(self, r: _Reading, day: int, spent: int, hold_expiry: int | None,
               as_of: int) -> int:
        """The read answered ``spent`` at ledger clock ``as_of``: remember it (unless something
        lowered the spending meanwhile) and return it with what committed after it."""
        self.end(r)
        expiry = hold_expiry or 0
        for ts, amount, hold in r.added:
            if ts > as_of and self._day_of(ts) == day:
                spent += amount
                expiry = hold if hold and (not expiry or hold < expiry) else expiry
        if self.watching and not r.lowered:
            self._store(r.accounts, day, spent, expiry, as_of)
        return spent

    def _store(self, accounts: tuple[tuple[int, int], tuple[int, int]], day: int, spent: int,
               hold_expiry: int, as_of: int) -> None:
        (ledger, purse), (_, subsidy) = accounts
        rec = self._holders.get((ledger, purse))
        if rec is None:
            if len(self._holders) >= 2 * self._max:
                oldest = next(iter(self._holders))  # dicts keep insertion order
                for aid in self._holders[oldest].accounts:
                    self._holders.pop((oldest[0], aid), None)
            rec = _HolderSpend((purse, subsidy))
            self._holders[(ledger, purse)] = rec
            self._holders[(ledger, subsidy)] = rec
        now = time.monotonic()
        for d in [d for d, (_, until, _, _) in rec.days.items() if until <= now]:
            del rec.days[d]
        rec.days[day] = (spent, now + self._ttl_s, hold_expiry, as_of)

    def committed(self, ledger: int, created: Sequence[StoredTransfer]) -> None:
        """The batcher committed ``created`` on ``ledger`` (any door, this process)."""
        holders, reading = self._holders, self._reading
        if not holders and not reading:
            return
        for t in created:  # per transfer: a set lookup, nothing more for the rest
            if t.code in _SPENDING_CODE_SET:
                key = (ledger, t.debit_account_id)
                if key not in holders and key not in reading:
                    continue
                if t.flags & (_POST | _VOID):  # a hold resolved: the sum falls, read it again
                    self._lower(key)
                else:
                    expiry = (t.timestamp + t.timeout_s * _NS_PER_S
                              if t.flags & _PENDING and t.timeout_s else 0)
                    self._add(key, t.timestamp, t.amount, expiry)
            elif t.code == _REVERSAL_CODE:  # spending given back no longer counts
                key = (ledger, t.credit_account_id)
                if key in holders or key in reading:
                    self._lower(key)

    def unknown(self, ledger: int) -> None:
        """Something may have committed unreported: forget everything, read sums again."""
        self._holders.clear()
        for r in self._reading.values():
            r.lowered = True  # not remembered; still exact as far as it saw

    def _add(self, key: tuple[int, int], ts: int, amount: int, hold_expiry: int) -> None:
        r = self._reading.get(key)
        if r is not None:
            r.added.append((ts, amount, hold_expiry))
        rec = self._holders.get(key)
        if rec is None:
            return
        day = self._day_of(ts)
        entry = rec.days.get(day)
        if entry is None:
            return  # nothing remembered for that day: the next read sums it from the ledger
        spent, until, expiry, as_of = entry
        if ts <= as_of:
            return  # the read that made the entry counted it already
        if hold_expiry and (not expiry or hold_expiry < expiry):
            expiry = hold_expiry
        rec.days[day] = (spent + amount, until, expiry, as_of)

    def _lower(self, key: tuple[int, int]) -> None:
        r = self._reading.get(key)
        if r is not None:
            r.lowered = True
        rec = self._holders.get(key)
        if rec is not None:
            rec.days.clear()

    def drop(self, ledger: int, account: int) -> None:
        """Forget the spending of the holder owning ``account`` (any account: no-op)."""
        self._lower((ledger, account))


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
    """Mutual exclusion per key (FIFO), free for a key nobody else holds: waiters are queued
    only when the key is contended, and the key's entry goes with its last user."""

    def __init__(self) -> None:
        self._queues: dict[Hashable, deque[asyncio.Future[None]]] = {}

    def hold(self, key: Hashable) -> _Held:
        """``async with locks.hold(key):`` runs the block while holding ``key``."""
        return _Held(self, key)

    async def acquire(self, key: Hashable) -> None:
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = deque()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if not fut.cancelled():  # the key was handed over just as we were cancelled
                self.release(key)
            raise

    def release(self, key: Hashable) -> None:
        queue = self._queues[key]
        while queue:
            fut = queue.popleft()
            if not fut.done():  # a waiter that was cancelled meanwhile is skipped
                fut.set_result(None)  # the key passes to it without ever being free
                return
        del self._queues[key]

    def __len__(self) -> int:
        return len(self._queues)


class _Held:
    __slots__ = ("_key", "_locks")

    def __init__(self, locks: _KeyedLocks, key: Hashable) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        await self._locks.acquire(self._key)

    async def __aexit__(self, *exc: object) -> None:
        self._locks.release(self._key)


def _bounded_put(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))  # oldest first: dicts keep insertion order
    cache[key] = value


# -- the campus --------------------------------------------------------------------------------


class Campus:
    """Holders, cards, terminals and rooms of every ledger, over one started :class:`Engine`.

    Daily limits count every spending this process commits, whatever door it came through:
    today's sum is read from the ledger once, and then the batcher reports every committed
    group to the spending memory (see :class:`_SpendMemory`), so a meal posted with
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

    ``clock`` (default: the wall clock) only decides which campus-local day it is now; each
    transfer counts towards the local day of its engine timestamp. Operations are tied to
    terminal kinds: purchases at POS and kiosk terminals, holds and completions at water
    terminals, electricity at kiosks and POS, meter usage at meters, inquiries anywhere but a
    meter; anything else is INVALID_TRANSACTION.

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
        tz: str = DEFAULT_TZ,
        hold_timeout_s: int = DEFAULT_HOLD_TIMEOUT_S,
        clock: Callable[[], datetime] | None = None,
        spend_ttl_s: float = SPEND_MEMORY_TTL_S,
        max_batch: int = COALESCE_MAX_BATCH,
        max_amount: int = limits.TERMINAL_MAX_AMOUNT_FEN,
    ) -> None:
        if not 0 < hold_timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"hold_timeout_s must be in 1..{MAX_TIMEOUT_S}")
        if not 0 < max_amount <= limits.TERMINAL_FIELD_MAX_FEN:
            raise ValueError(f"max_amount must be in 1..{limits.TERMINAL_FIELD_MAX_FEN}")
        self.engine = engine
        self.max_amount = max_amount
        self.tz = ZoneInfo(tz)
        self.hold_timeout_s = hold_timeout_s
        self._clock = clock or (lambda: datetime.now(UTC))
        self._terminals: dict[str, Terminal] = {}
        self._cards: dict[tuple[int, str], _CardRef] = {}
        self._holder_locks = _KeyedLocks()
        self._spent = _SpendMemory(ttl_s=spend_ttl_s, max_holders=MAX_REMEMBERED_HOLDERS,
                                   day_of=self._day_of)
        self._watched: object = None  # the batcher the spending memory hears commits from
        self._day: tuple[int, int] = (0, 0)  # the local day _day_of answered last: [start, end)

        def pool() -> asyncpg.Pool:
            return self.engine.store.pool

        def reads(name: str, run: Callable[[Connection, int, list[_I]], Awaitable[list[_R]]]
                  ) -> Coalescer[_I, _R]:
            return Coalescer(pool, run, max_batch=max_batch, session=COALESCE_SESSION,
                             name=f"onecard-campus-{name}")

        self._ref_reads: Coalescer[str, _CardRef | None] = reads("cards", self._read_card_refs)
        self._state_reads: Coalescer[_StateQuery, _CardState | None] = reads(
            "states", self._read_states)
        self._part_reads: Coalescer[_PartsQuery, _PartsAnswer] = reads("parts", self._read_parts)
        self._after_reads: Coalescer[_AfterQuery, _AfterAnswer] = reads("after", self._read_after)
        self._terminal_reads: Coalescer[str, Terminal | None] = reads(
            "terminals", self._read_terminals)
        self._pin_tries: Coalescer[_PinTry, int] = reads("pins", self._count_pin_tries)

    @property
    def statements(self) -> int:
        """Shared hot-path read statements run so far (each serves a batch of requests)."""
        return sum(c.statements for c in (self._ref_reads, self._state_reads, self._part_reads,
                                          self._after_reads, self._terminal_reads,
                                          self._pin_tries))

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
        now = self._clock()
        return self._day_bounds(_ns(now), now)

    def _day_of(self, ns: int) -> int:
        """Start (engine ns) of the campus-local day containing engine timestamp ``ns``."""
        return self._day_bounds(ns)[0]

    def _day_bounds(self, ns: int, at: datetime | None = None) -> tuple[int, int]:
        start, end = self._day
        if not start <= ns < end:  # one zone lookup per local day, not per request
            at = at or EPOCH + timedelta(microseconds=ns // 1000)
            start, end = self._day = local_day_bounds(at, self.tz)
        return start, end

    # -- shared reads (one statement per batch of requests, see Coalescer) ----------------------

    async def _card_ref(self, ledger: int, card_no: str) -> _CardRef | None:
        ref = self._cards.get((ledger, card_no))
        if ref is None:
            if not _CARD_NO.fullmatch(card_no):
                return None  # cannot be stored (cards CHECK); must not fail a shared read
            ref = await self._ref_reads.submit(ledger, card_no)
            if ref is None:
                return None  # not cached: the card may be issued a moment later
            _bounded_put(self._cards, (ledger, card_no), ref, MAX_CACHED_CARDS)
        return ref

    async def _read_card_refs(
        self, conn: Connection, ledger: int, card_nos: list[str]
    ) -> list[_CardRef | None]:
        rows = await conn.fetch(SQL_CARD_REFS, ledger, list(set(card_nos)))
        found = {
            r["card_no"]: _CardRef(ledger, r["card_no"], r["holder_id"], r["purse_account_id"],
                                   r["subsidy_account_id"])
            for r in rows
        }
        return [found.get(c) for c in card_nos]

    async def _card_state(
        self,
        ref: _CardRef,
        key: UUID,
        parts: Sequence[UUID],
        *,
        day: tuple[int, int],
        want_spent: bool,
    ) -> _CardState:
        a = parts[0] if parts else NIL_UUID
        b = parts[1] if len(parts) > 1 else a
        st = await self._state_reads.submit(
            ref.ledger, _StateQuery(ref, key, a, b, want_spent, day[0], day[1])
        )
        assert st is not None, "cards, holders and accounts are never deleted"
        return st

    async def _read_states(
        self, conn: Connection, ledger: int, qs: list[_StateQuery]
    ) -> list[_CardState | None]:
        rows = await conn.fetch(
            SQL_CARD_STATES,
            ledger,
            [q.ref.card_no for q in qs],
            [q.ref.purse_id for q in qs],
            [q.ref.subsidy_id for q in qs],
            [q.key for q in qs],
            [q.part_a for q in qs],
            [q.part_b for q in qs],
            [q.want_spent for q in qs],
            [q.day_start for q in qs],
            [q.day_end for q in qs],
        )
        out: list[_CardState | None] = [None] * len(qs)
        for r in rows:
            out[r["i"] - 1] = _CardState(
                status=CardStatus(r["status"]),
                daily_limit=r["daily_limit"],
                pin=r["pin"],
                pin_threshold=r["pin_threshold"],
                cash=r["cash"],
                subsidy=r["subsidy"],
                spent=r["spent"],
                hold_expiry=r["hold_expiry"],
                clock=r["clock"] or 0,
                reversed=r["reversed"],
                existing=r["existing"],
            )
        return out

    async def _parts(
        self, ledger: int, ids: Sequence[UUID], keys: Sequence[UUID] = ()
    ) -> _PartsAnswer:
        """The transfers ``ids`` that exist (timestamp order) and which of ``keys`` have a
        remembered reversal."""
        return await self._part_reads.submit(ledger, _PartsQuery(tuple(ids), tuple(keys)))

    async def _read_parts(
        self, conn: Connection, ledger: int, qs: list[_PartsQuery]
    ) -> list[_PartsAnswer]:
        ids = list({i for q in qs for i in q.ids})
        keys = list({k for q in qs for k in q.keys})
        parts: dict[UUID, _Part] = {}
        reversed_: set[UUID] = set()
        for r in await conn.fetch(SQL_PARTS, ledger, ids, keys):
            if r["reversed"] is not None:
                reversed_.add(r["reversed"])
            else:
                parts[r["id"]] = _part(r)
        out = []
        for q in qs:
            mine = sorted((parts[i] for i in set(q.ids) if i in parts), key=lambda p: p.timestamp)
            out.append(_PartsAnswer(mine, frozenset(k for k in q.keys if k in reversed_)))
        return out

    async def _after(
        self, ledger: int, key: UUID, accounts: Sequence[int]
    ) -> tuple[dict[int, int], bool]:
        a = await self._after_reads.submit(ledger, _AfterQuery(key, tuple(accounts)))
        return a.available, a.reversed

    async def _read_after(
        self, conn: Connection, ledger: int, qs: list[_AfterQuery]
    ) -> list[_AfterAnswer]:
        accounts = list({a for q in qs for a in q.accounts})
        keys = list({q.key for q in qs})
        available: dict[int, int] = {}
        reversed_: set[UUID] = set()
        for r in await conn.fetch(SQL_AFTER, ledger, accounts, keys):
            if r["reversed"] is not None:
                reversed_.add(r["reversed"])
            else:
                available[r["id"]] = r["available"]
        return [
            _AfterAnswer({a: available[a] for a in q.accounts if a in available},
                         q.key in reversed_)
            for q in qs
        ]

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

    # -- daily spending --------------------------------------------------------------------------

    def _watch(self) -> bool:
        """Register the spending memory with the engine's batcher (again after a restart made a
        new one); False if the batcher cannot report commits (nothing is remembered then)."""
        batcher = self.engine.batcher
        if self._watched is not batcher:
            self._watched = batcher
            self._spent.unknown(0)  # commits of the old batcher's last moments were not heard
            # a stand-in (tests wrap the batcher) reports nothing: then nothing is remembered
            self._spent.watching = isinstance(batcher, Batcher)
            if isinstance(batcher, Batcher):
                batcher.observe(self._spent)
        return self._spent.watching

    async def _state_and_spending(
        self, ref: _CardRef, key: UUID, parts: Sequence[UUID], *, day: tuple[int, int],
        want_spent: bool,
    ) -> tuple[_CardState, int]:
        """The card's state and, if ``want_spent``, today's spending for the limit check (0 for
        a card without a limit): remembered, or read with the state and then remembered."""
        remembered = (
            self._spent.lookup(ref.ledger, ref.purse_id, day[0])
            if want_spent and self._watch() else None
        )
        if remembered is not None or not want_spent:
            st = await self._card_state(ref, key, parts, day=day, want_spent=False)
            return st, remembered or 0
        reading = self._spent.begin(ref.ledger, ref.purse_id, ref.subsidy_id)
        try:
            st = await self._card_state(ref, key, parts, day=day, want_spent=True)
        finally:
            self._spent.end(reading)
        if st.spent is None:  # the card has no limit: nothing summed, nothing to remember
            return st, 0
        return st, self._spent.finish(reading, day[0], st.spent, st.hold_expiry, st.clock)

    async def _post_spending(self, ledger: int, transfers: list[Transfer]) -> list[TransferResult]:
        """Submit a spending chain (the batcher reports what it posted to the spending memory);
        if the outcome is unknown (the batcher failed), forget the holder's spending so it is
        read again."""
        try:
            return await self._submit(_chain(transfers))
        except BaseException:
            for t in transfers:
                self._spent.drop(ledger, t.debit_account_id)
            raise

    # -- amounts and PINs ------------------------------------------------------------------------

    def _amount_ok(self, amount: int) -> bool:
        """A terminal amount this campus moves in one operation."""
        return 0 < amount <= self.max_amount

    async def _pin_refusal(
        self, term: Terminal, card_no: str, st: _CardState, day: tuple[int, int],
        pin_block: bytes | None, *, required: bool,
    ) -> Outcome | None:
        """None when the PIN lets the request through (no PIN asked for, or the right one
        within the day's tries), else INCORRECT_PIN or PIN_TRIES_EXCEEDED.

        Every PIN check asks ``pin_tries`` at decision time, the right PIN too: a stale count
        would let a burst of guesses sent at once all see "no failures yet". A missing PIN is
        not a guess (not counted) but is refused 75 once the tries are used up, like any."""
        if st.pin is None or not required:
            return None
        right = pin_block is not None and verify_pin(term.mac_key, card_no, st.pin, pin_block)
        attempt = _PinTry(card_no, self._local_date(day[0]), pin_block is not None and not right)
        failures = await self._pin_tries.submit(term.ledger, attempt)
        if failures >= limits.PIN_TRIES_PER_DAY:
            return Outcome.PIN_TRIES_EXCEEDED
        return None if right else Outcome.INCORRECT_PIN

    @staticmethod
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

    def _local_date(self, day_start: int) -> date:
        """The campus-local date of the day starting at ``day_start`` (engine ns)."""
        return (EPOCH + timedelta(microseconds=day_start // 1000)).astimezone(self.tz).date()

    # -- terminals -------------------------------------------------------------------------------

    async def terminal(self, terminal_id: str) -> Terminal | None:
        """The registered terminal with this id (cached: a terminal never changes), or None."""
        term = self._terminals.get(terminal_id)
        if term is None:
            if len(terminal_id) != TERMINAL_ID_LEN or "\x00" in terminal_id:
                return None  # cannot be stored (terminals CHECK); must not fail a shared read
            # every terminal signs on at once after a restart: one statement for all of them
            found = await self._terminal_reads.submit(_ANY_LEDGER, terminal_id)
            if found is None:
                return None  # not cached: it may be registered a moment later
            term = found
            _bounded_put(self._terminals, terminal_id, term, MAX_CACHED_TERMINALS)
        return term

    @staticmethod
    async def _read_terminals(
        conn: Connection, _: int, terminal_ids: list[str]
    ) -> list[Terminal | None]:
        rows = await conn.fetch(SQL_TERMINALS, list(set(terminal_ids)))
        found = {r["terminal_id"]: _terminal(r) for r in rows}
        return [found.get(t) for t in terminal_ids]

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
        if not self._amount_ok(amount):
            return PaymentResult(Outcome.INVALID_AMOUNT)
        ref = await self._card_ref(term.ledger, card_no)
        if ref is None:
            return PaymentResult(Outcome.INVALID_CARD)
        code = TransferCode.HOT_WATER if hold else TransferCode.MEAL
        flags = (TransferFlag.PENDING,) if hold else (TransferFlag.FORCE,) if force else ()
        ids = (part_id(key, _SUBSIDY), part_id(key, _CASH))
        purses = (ref.purse_id, ref.subsidy_id)
        async with self._holder_locks.hold((ref.ledger, ref.holder_id)):
            day = self.today()
            st, spent = await self._state_and_spending(ref, key, ids, day=day,
                                                       want_spent=not force)
            if st.existing:  # a retransmission: answer from what the first attempt posted
                parts = (await self._parts(ref.ledger, ids)).parts
                ok = _matches(parts, credit=term.account_id, code=code, amount=amount,
                              flags=_PENDING if hold else int(TransferFlags.FORCE) if force else 0)
                outcome = Outcome.APPROVED if ok else Outcome.DUPLICATE_DIFFERENT
                ts = parts[0].timestamp if ok and parts else None
                return await self._finish(ref.ledger, key, outcome, ts, purses=purses)
            balances = PurseBalances(cash=st.cash, subsidy=st.subsidy)
            if st.reversed:  # reversed before it arrived: approve, move nothing
                return PaymentResult(Outcome.APPROVED, purses=balances)
            refusal = _card_refusal(st.status)
            if refusal is None and not force:
                refusal = await self._pin_refusal(term, card_no, st, day, pin_block,
                                                  required=amount > (st.pin_threshold or 0))
            if refusal is not None:
                return PaymentResult(refusal)
            if not force and st.daily_limit is not None and spent + amount > st.daily_limit:
                return PaymentResult(Outcome.DAILY_LIMIT_EXCEEDED, purses=balances)
            from_subsidy, from_cash = split_subsidy_first(amount, st.subsidy)
            # Without force the ledger keeps each purse between 0 and where it was; an advice
            # posts past zero, so it is refused (13) where its answer could not show the rest.
            if force and not _showable(st.cash - from_cash, st.subsidy - from_subsidy,
                                       balances.total - amount):
                return PaymentResult(Outcome.INVALID_AMOUNT)
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
            outcome, ts = outcome_of(await self._post_spending(ref.ledger, transfers))
        return await self._finish(ref.ledger, key, outcome, ts, purses=purses)

    async def balance(
        self, term: Terminal, *, card_no: str, pin_block: bytes | None = None
    ) -> PaymentResult:
        """Balance inquiry: the purses' available fen. No PIN is required (no amount), but a
        PIN block that is sent must be right, and a wrong one counts towards the day's tries
        (otherwise inquiries would be a free PIN oracle)."""
        return await self._guard(self._balance(term, card_no, pin_block))

    async def _balance(
        self, term: Terminal, card_no: str, pin_block: bytes | None
    ) -> PaymentResult:
        if term.kind not in _INQUIRY_KINDS:
            return PaymentResult(Outcome.INVALID_TRANSACTION)
        ref = await self._card_ref(term.ledger, card_no)
        if ref is None:
            return PaymentResult(Outcome.INVALID_CARD)
        day = self.today()
        st = await self._card_state(ref, NIL_UUID, (), day=day, want_spent=False)
        refusal = _card_refusal(st.status)
        if refusal is None:  # a PIN block that is sent is a PIN check: it counts, and 75 applies
            refusal = await self._pin_refusal(term, card_no, st, day, pin_block,
                                              required=pin_block is not None)
        if refusal is not None:
            return PaymentResult(refusal)
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
        if not 0 <= amount <= self.max_amount:  # 0 releases the whole hold
            return PaymentResult(Outcome.INVALID_AMOUNT)
        held_ids = {part_id(hold_key, p): p for p in (_SUBSIDY, _CASH)}
        done_ids = [part_id(key, p) for p in (_SUBSIDY, _CASH)]
        got = await self._parts(term.ledger, [*held_ids, *done_ids], [hold_key, key])
        parts, rev = got.parts, got.reversed
        holds = [p for p in parts if p.id in held_ids and p.flags & _PENDING]
        done = [p for p in parts if p.id in done_ids]
        if not holds:
            if hold_key in rev and not done:  # the hold was reversed before it arrived
                return PaymentResult(Outcome.APPROVED)
            return PaymentResult(Outcome.ORIGINAL_NOT_FOUND)
        if any(h.credit_account_id != term.account_id for h in holds):
            return PaymentResult(Outcome.ORIGINAL_NOT_FOUND)  # not this terminal's hold
        purses = holds[0].purses
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
        try:
            results = await self._submit(_chain(transfers))
        finally:  # the hold stops counting, its post counts: today's spending is read again
            for h in holds:
                self._spent.drop(term.ledger, h.debit_account_id)
        outcome, ts = outcome_of(results)
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
        pin_waived: bool = False,
    ) -> PaymentResult:
        """Buy electricity for a dorm room: the card's cash purse pays the room purse (code 3).
        Card state, PIN and daily limit apply; an unknown room is INVALID_TRANSACTION. Kiosk
        and POS terminals. ``pin_waived``: the holder proved who they are another way (their
        password, at /self), so no PIN is asked for."""
        return await self._guard(
            self._buy_electricity(term, card_no, room_id, amount, key, pin_block, pin_waived)
        )

    async def _buy_electricity(
        self,
        term: Terminal,
        card_no: str,
        room_id: str,
        amount: int,
        key: UUID,
        pin_block: bytes | None,
        pin_waived: bool,
    ) -> PaymentResult:
        if term.kind not in _ELECTRICITY_KINDS:
            return PaymentResult(Outcome.INVALID_TRANSACTION)
        if not self._amount_ok(amount):
            return PaymentResult(Outcome.INVALID_AMOUNT)
        ref = await self._card_ref(term.ledger, card_no)
        if ref is None:
            return PaymentResult(Outcome.INVALID_CARD)
        room = room_account_id(term.ledger, room_id)
        tid = part_id(key, _CASH)
        purses = (ref.purse_id, ref.subsidy_id)
        async with self._holder_locks.hold((ref.ledger, ref.holder_id)):
            day = self.today()
            # the room's balance is read beside the card's: the answer must be able to show it
            (st, spent), (rooms, _) = await asyncio.gather(
                self._state_and_spending(ref, key, (tid,), day=day, want_spent=True),
                self._after(ref.ledger, key, (room,)),
            )
            if st.existing:
                parts = (await self._parts(ref.ledger, (tid,))).parts
                ok = _matches(parts, credit=room, code=TransferCode.ELECTRICITY, amount=amount,
                              flags=0)
                outcome = Outcome.APPROVED if ok else Outcome.DUPLICATE_DIFFERENT
                ts = parts[0].timestamp if ok and parts else None
                return await self._finish(ref.ledger, key, outcome, ts, purses=purses, room=room)
            if st.reversed:
                return await self._finish(ref.ledger, key, Outcome.APPROVED, None,
                                          purses=purses, room=room)
            refusal = _card_refusal(st.status)
            if refusal is None and not pin_waived:
                refusal = await self._pin_refusal(term, card_no, st, day, pin_block,
                                                  required=amount > (st.pin_threshold or 0))
            if refusal is not None:
                return PaymentResult(refusal)
            if st.daily_limit is not None and spent + amount > st.daily_limit:
                return PaymentResult(Outcome.DAILY_LIMIT_EXCEEDED,
                                     purses=PurseBalances(st.cash, st.subsidy))
            # the cash purse stays between 0 and where it was (no force); the room could grow
            # past what its answer can show
            if not _showable(rooms.get(room, 0) + amount):
                return PaymentResult(Outcome.INVALID_AMOUNT)
            transfer = Transfer(id=tid, ledger=ref.ledger, debit_account_id=ref.purse_id,
                                credit_account_id=room, amount=amount,
                                code=TransferCode.ELECTRICITY,
                                user_data=f"{term.terminal_id}:{card_no}")
            outcome, ts = outcome_of(await self._post_spending(ref.ledger, [transfer]))
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
        if not self._amount_ok(amount):
            return PaymentResult(Outcome.INVALID_AMOUNT)
        room = room_account_id(term.ledger, room_id)
        tid = part_id(key, _ROOM)
        # A room's advices take turns (in this process): each posts against the balance it
        # checked, which its answer must be able to show (force posts past zero, unbounded).
        async with self._holder_locks.hold(("room", term.ledger, room)):
            got, (rooms, _) = await asyncio.gather(self._parts(term.ledger, [tid], [key]),
                                                   self._after(term.ledger, key, (room,)))
            if got.parts:
                ok = _matches(got.parts, credit=term.account_id,
                              code=TransferCode.ELECTRICITY, amount=amount,
                              flags=int(TransferFlags.FORCE)
                              ) and got.parts[0].debit_account_id == room
                if not ok:
                    return PaymentResult(Outcome.DUPLICATE_DIFFERENT)
                ts = got.parts[0].timestamp
            elif got.reversed:
                ts = None
            elif not _showable(rooms.get(room, 0) - amount):
                return PaymentResult(Outcome.INVALID_AMOUNT)
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
        return (await self._undo_parts(ledger, original_key, ids))[1]

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
        ids = [part_id(key, p) for p in _ALL_PARTS]
        if hold_key is not None:
            ids += [part_id(hold_key, p) for p in (_SUBSIDY, _CASH)]
        try:
            done, _ = await self._undo_parts(ledger, key, ids)
        except Overloaded:
            return False
        except (Unavailable, *RETRYABLE, asyncpg.PostgresError) as e:
            log.warning("campus: could not take back %s yet: %s", key, e)
            return False
        return done

    async def _undo_parts(
        self, ledger: int, label: UUID, ids: Sequence[UUID]
    ) -> tuple[bool, int | None]:
        """Undo those of the transfers ``ids`` that exist: a pending hold is voided, anything
        else posted is paid back; one linked chain, with derived ids (an undo already posted is
        read, not posted again). Returns (nothing is left to undo, the first undo's timestamp);
        ``label`` names the operation in the log."""
        undo_ids = {reversal_id(i): i for i in ids}
        for _ in range(UNDO_ATTEMPTS):
            transfers: list[Transfer] = []
            got = (await self._parts(ledger, [*ids, *undo_ids])).parts
            undone = {undo_ids[p.id]: p.timestamp for p in got if p.id in undo_ids}
            parts = [p for p in got if p.id not in undo_ids]
            stamps = [undone[p.id] for p in parts if p.id in undone]
            for p in parts:
                if p.flags & _PENDING:
                    if p.state == "pending":
                        transfers.append(Transfer(id=reversal_id(p.id), ledger=ledger,
                                                  pending_id=p.id,
                                                  flags=(TransferFlag.VOID_PENDING,)))
                elif not p.flags & _VOID and p.id not in undone:
                    # money back, even out of a room purse already burnt down: it was never due
                    transfers.append(Transfer(
                        id=reversal_id(p.id), ledger=ledger,
                        debit_account_id=p.credit_account_id, credit_account_id=p.debit_account_id,
                        amount=p.amount, code=TransferCode.REVERSAL, flags=(TransferFlag.FORCE,),
                        user_data=str(p.id)))
            if not transfers:
                return True, min(stamps, default=None)
            try:
                results = await self._submit(_chain(transfers))
            finally:  # spending given back no longer counts: today's sum is read again
                for p in parts:
                    self._spent.drop(ledger, p.debit_account_id)
            outcome, ts = outcome_of(results)
            if outcome is Outcome.APPROVED:
                return True, min([*stamps, *([ts] if ts else [])], default=None)
            # a completion may have settled the hold between our read and our void: re-read
            log.warning("campus: undo of %s failed (%s); retrying", label,
                        [r.status.value for r in results])
        log.error("campus: could not undo %s", label)
        return False, None

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

    async def reset_pin_tries(self, card_no: str) -> Card | Refused:
        """The card office's reset: the card's wrong PINs are forgotten (every day's), so the
        right PIN gets in again at once. The card itself is unchanged."""
        async with self._conn() as conn:
            r = await conn.fetchrow(SQL_CARD_BY_NO, card_no)
            if r is None:
                return Refused(Refusal.CARD_NOT_FOUND, f"no card {card_no}")
            card = _card(r)
            await conn.execute(SQL_RESET_PIN_TRIES, card.ledger, card_no)
        return card

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

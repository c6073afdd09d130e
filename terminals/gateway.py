"""The ISO 8583 terminal gateway (contract §5): an asyncio TCP server in front of the campus.

Every frame runs the contract's checks in order, the first failure answering: format (``30``),
terminal and MAC (``63``), merchant id (``03``), then the business rules of
``engine.campus.Campus``, whose Outcome becomes field 39. Every answer carries a MAC except
the unknown-terminal ``63`` (and a ``30`` to a frame that names no known terminal); a frame
that does not decode is answered from what ``iso8583.salvage`` reads of it (fields 7, 11, 41).

Idempotency: a request's key is derived from terminal id + STAN + field 7 (``message_key``:
time-ordered by field 7, the rest a hash, see ``ledger.ids``). The campus
derives every transfer id from it, so the ledger never posts a request twice; the gateway
additionally stores each financial answer (``gateway_responses``) *before* sending it, so a
retransmission, even after a restart, gets the identical answer (same RRN, same field 54)
and a different message under the same key gets ``94`` without reaching the campus. Two
copies of one request in flight at once share one execution (single flight).

A ``96`` means that no money moved for that request, ever (contract §5 v4), also when the
deadline (``request_timeout_s``) passes while the work goes on, and when the database fails
under the work (perhaps after its posting committed): the gateway then gives the request up
before it answers (``Gateway._give_up``): the 96 is stored as its answer together with the
request's own reversal, and whatever the work posts, before or after, is taken back exactly
once (``Campus.withdraw``). A retransmission gets that stored 96 and posts nothing. When the
gateway cannot tell whether a money-moving request moved money (its answer memory is away) it
closes the connection unanswered rather than send a 96 that may be false.

Connections: 2-byte length frames, pipelining up to a per-connection bound (answers go back
in request order), an idle timeout, a write timeout, a connection cap, a global in-flight
cap. Overload (a full batcher queue or too many requests in flight) answers ``96`` at once.
A connection is *unverified* until one of its frames carries a good MAC for a known terminal:
it must get there within a short first-frame deadline, and a newcomer that finds the gateway
(or its own peer address) full takes the slot of an unverified connection (engine/slots.py),
so idle connections without credentials cannot lock the terminals out.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final
from uuid import UUID
from zoneinfo import ZoneInfo

import msgspec
from prometheus_client import Counter, Gauge, Histogram

from engine import limits, metrics
from engine.calendar import campus_tz_name
from engine.campus import Campus, Outcome, PaymentResult, Terminal
from engine.db.coalesce import Coalescer, Connection
from engine.db.pool import create_pool
from engine.service import Engine
from engine.slots import PeerSlots, peer_of
from ledger.ids import ordered
from terminals.framing import FrameError, frame, read_frame
from terminals.iso8583 import (
    AccountType,
    AmountBlock,
    FormatError,
    Message,
    Mti,
    ProcessingCode,
    ResponseCode,
    decode_message,
    encode_amounts,
    encode_message,
    encode_message_unmac,
    is_digits,
    parse_original,
    response_mti,
    salvage,
)

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "KEY_NAMESPACE",
    "Gateway",
    "Operation",
    "auth_id_for",
    "classify",
    "message_key",
    "request_digest",
    "response_code_for",
    "rrn_for",
]

log = logging.getLogger(__name__)

KEY_NAMESPACE: Final = UUID("27550517-1e7c-5e53-939a-ff7d64c3588b")
"""Hashed into every request key; fixed forever (stored keys and transfer ids depend on it)."""

# An RRN collision inside one ledger (62 bits of a hash) is astronomically rare; each retry
# derives the next candidate, so a handful of attempts is certainty in practice.
_RRN_ATTEMPTS: Final = 8
_RRN_LEN: Final = 12
_AUTH_ID_LEN: Final = 6
_BASE36: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"

GATEWAY_RESPONSES: Final = Counter(
    "onecard_gateway_responses_total",
    "Terminal answers sent, by response MTI and field 39.",
    ["mti", "code"],
    registry=metrics.REGISTRY,
)
GATEWAY_SECONDS: Final = Histogram(
    "onecard_gateway_request_seconds",
    "Time from a complete frame to its answer being ready.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=metrics.REGISTRY,
)
GATEWAY_CONNECTIONS: Final = Gauge(
    "onecard_gateway_connections", "Open terminal connections.", registry=metrics.REGISTRY
)
GATEWAY_REFUSED: Final = Counter(
    "onecard_gateway_refused_connections_total",
    "Connections closed at once because the gateway was full or stopping.",
    registry=metrics.REGISTRY,
)
GATEWAY_UNVERIFIED_DROPPED: Final = Counter(
    "onecard_gateway_unverified_dropped_total",
    "Connections closed before any frame of theirs had a good MAC: evicted to make room for a "
    "newcomer, or past the first-frame deadline.",
    ["reason"],
    registry=metrics.REGISTRY,
)

# Set by each connection's reader; every answer task it starts inherits it. ``_decide`` calls
# it once a frame's MAC verified for a known terminal, which marks the connection verified
# at that moment (not when the answer is ready: a slow first purchase must not run into the
# first-frame deadline).
_ON_VERIFIED: Final[ContextVar[Callable[[], None] | None]] = ContextVar(
    "onecard_gateway_on_verified", default=None
)


def _frame_verified() -> None:
    callback = _ON_VERIFIED.get()
    if callback is not None:
        callback()


# ---------------------------------------------------------------------------------------
# Pure helpers: keys, digests, RRNs, classification, field 39 and field 54


class Operation(enum.Enum):
    """What a request message asks for, from its MTI, processing code and fields."""

    SIGN_ON = "sign_on"
    PURCHASE = "purchase"
    INQUIRY = "inquiry"
    ADVICE = "advice"
    HOLD = "hold"
    COMPLETION = "completion"
    ELECTRICITY = "electricity"
    METER = "meter"
    REVERSAL = "reversal"
    UNSUPPORTED = "unsupported"  # a well-formed request the profile does not offer: 12


def message_key(terminal_id: str, stan: str, transmission_dt: str) -> UUID:
    """The idempotency key of a request, derived from terminal id, STAN and field 7 only.

    Its first 48 bits are field 7 read as the number MMDDhhmmss (which grows with time within
    a year), so the transfers of the same minute sit together in the ledger's index
    (``ledger.ids``); the other 74 are a hash of all three fields. Nothing else (no year, no
    clock) enters: a retransmission or reversal months later derives the same key.
    """
    dt = transmission_dt
    prefix = int(dt) if is_digits(dt, 10) else 0
    return ordered(prefix, KEY_NAMESPACE.bytes, terminal_id.encode(), stan.encode(), dt.encode())


def request_digest(msg: Message) -> bytes:
    """SHA-256 of a request's business content (MTI and fields 2, 3, 4, 42, 52, 90, 102).

    Fields 12/13 are left out on purpose: a terminal may restamp its local clock when it
    retransmits, and that does not make it a different transaction.
    """
    content = (
        msg.mti,
        msg.card_no,
        msg.processing_code,
        msg.amount,
        msg.merchant_id,
        msg.pin_data,
        msg.original_data,
        msg.room_id,
    )
    return hashlib.sha256(msgspec.msgpack.encode(content)).digest()


# Two base-36 digits per step (least significant first, as one digit per step would give):
# RRNs and authorisation ids are stored, so the output must never change, only its cost.
_BASE36_PAIRS: Final = tuple(_BASE36[q % 36] + _BASE36[q // 36] for q in range(36 * 36))


def _base36(data: bytes, length: int) -> str:
    """The ``length`` least significant base-36 digits of ``data``, least significant first."""
    n = int.from_bytes(data, "big")
    out = []
    for _ in range(length // 2):
        n, q = divmod(n, 36 * 36)
        out.append(_BASE36_PAIRS[q])
    if length % 2:
        out.append(_BASE36[n % 36])
    return "".join(out)


def rrn_for(key: UUID, attempt: int = 0) -> str:
    """Field 37 for the request ``key``: 12 base-36 characters of a hash of key and attempt.

    Deterministic, so even an answer recomputed after a crash carries the same RRN;
    ``attempt`` moves to another candidate after a (per-ledger) collision.
    """
    h = hashlib.sha256(key.bytes + attempt.to_bytes(2, "big")).digest()
    return _base36(h[:16], _RRN_LEN)


def auth_id_for(key: UUID) -> str:
    """Field 38 (approvals only): 6 base-36 characters derived from the request key."""
    return _base36(hashlib.sha256(b"auth:" + key.bytes).digest()[:8], _AUTH_ID_LEN)


_REQUIRED: Final[dict[Operation, tuple[tuple[str, int], ...]]] = {
    Operation.SIGN_ON: (),
    Operation.PURCHASE: (("card_no", 2), ("amount", 4)),
    Operation.INQUIRY: (("card_no", 2),),
    Operation.ADVICE: (("card_no", 2), ("amount", 4)),
    Operation.HOLD: (("card_no", 2), ("amount", 4)),
    Operation.COMPLETION: (("amount", 4),),
    Operation.ELECTRICITY: (("card_no", 2), ("amount", 4), ("room_id", 102)),
    Operation.METER: (("amount", 4), ("room_id", 102)),
    Operation.REVERSAL: (("original_data", 90),),
    Operation.UNSUPPORTED: (),
}
_COMMON: Final = (("terminal_id", 41), ("stan", 11), ("transmission_dt", 7))
_BY_CODE: Final[dict[str, dict[str, Operation]]] = {
    Mti.FINANCIAL: {
        ProcessingCode.PURCHASE: Operation.PURCHASE,
        ProcessingCode.INQUIRY: Operation.INQUIRY,
        ProcessingCode.ELECTRICITY_PURCHASE: Operation.ELECTRICITY,
    },
    Mti.ADVICE: {
        ProcessingCode.PURCHASE: Operation.ADVICE,  # COMPLETION when field 90 is present
        ProcessingCode.ROOM_METER: Operation.METER,
    },
    Mti.AUTHORIZATION: {ProcessingCode.PURCHASE: Operation.HOLD},
}


def classify(msg: Message) -> Operation:
    """The operation a decoded request asks for.

    Raises FormatError when a field the operation needs is missing (or field 2 is present on a
    room meter advice); an MTI or processing code outside the profile is UNSUPPORTED (``12``).
    """
    for attr, number in _COMMON:
        if getattr(msg, attr) is None:
            raise FormatError(f"field {number} is missing")
    op = _operation(msg)
    for attr, number in _REQUIRED[op]:
        if getattr(msg, attr) is None:
            raise FormatError(f"field {number} is required for {op.value}")
    if op is Operation.METER and msg.card_no is not None:
        raise FormatError("a room meter advice carries no field 2")
    if op is Operation.COMPLETION:
        assert msg.original_data is not None
        parse_original(msg.original_data)  # decode_message checked it; keep classify total
    return op


def _operation(msg: Message) -> Operation:
    if msg.mti == Mti.NETWORK:
        return Operation.SIGN_ON
    if msg.mti == Mti.REVERSAL:
        return Operation.REVERSAL
    codes = _BY_CODE.get(msg.mti)
    if codes is None:
        return Operation.UNSUPPORTED
    if msg.processing_code is None:
        raise FormatError("field 3 is missing")
    op = codes.get(msg.processing_code, Operation.UNSUPPORTED)
    if op is Operation.ADVICE and msg.original_data is not None:
        return Operation.COMPLETION
    return op


_OUTCOME_CODES: Final[dict[Outcome, ResponseCode]] = {
    Outcome.APPROVED: ResponseCode.APPROVED,
    Outcome.INSUFFICIENT_FUNDS: ResponseCode.INSUFFICIENT_FUNDS,
    Outcome.LOST_CARD: ResponseCode.LOST_CARD,
    Outcome.CARD_NOT_ACTIVE: ResponseCode.CARD_NOT_ACTIVE,
    Outcome.INVALID_CARD: ResponseCode.INVALID_CARD,
    Outcome.INCORRECT_PIN: ResponseCode.INCORRECT_PIN,
    Outcome.PIN_TRIES_EXCEEDED: ResponseCode.PIN_TRIES_EXCEEDED,
    Outcome.DAILY_LIMIT_EXCEEDED: ResponseCode.EXCEEDS_DAILY_LIMIT,
    Outcome.INVALID_AMOUNT: ResponseCode.INVALID_AMOUNT,
    Outcome.ORIGINAL_NOT_FOUND: ResponseCode.ORIGINAL_NOT_FOUND,
    Outcome.INVALID_TRANSACTION: ResponseCode.INVALID_TRANSACTION,
    Outcome.DUPLICATE_DIFFERENT: ResponseCode.DUPLICATE_DIFFERENT,
    Outcome.OVERLOADED: ResponseCode.SYSTEM_ERROR,
    Outcome.UNAVAILABLE: ResponseCode.SYSTEM_ERROR,
}

# Answers that are not remembered: a plain 96 (one that moved nothing for certain: an overload,
# nothing queued; or an operation that moves no money or only gives it back) asks the terminal
# to try again, and a campus-level 94 means the ledger already holds a different transaction
# under this key that this gateway has no answer for, so no answer can be the "identical" one
# yet. A money-moving request whose work failed is not answered with a plain 96 (_work).
_NOT_REMEMBERED: Final = frozenset({ResponseCode.SYSTEM_ERROR, ResponseCode.DUPLICATE_DIFFERENT})


def response_code_for(outcome: Outcome) -> ResponseCode:
    """Field 39 for a campus Outcome."""
    return _OUTCOME_CODES[outcome]


# Which field 54 blocks an answer carries (contract §5).
_PURSE_BLOCKS: Final = frozenset(
    {
        Operation.PURCHASE,
        Operation.ADVICE,
        Operation.HOLD,
        Operation.COMPLETION,
        Operation.INQUIRY,
    }
)


def _amounts(op: Operation, result: PaymentResult) -> str | None:
    blocks: list[AmountBlock] = []
    purses = result.purses
    if op in _PURSE_BLOCKS and purses is not None:
        blocks = [
            AmountBlock(account_type=AccountType.ALL, amount=purses.cash + purses.subsidy),
            AmountBlock(account_type=AccountType.CASH, amount=purses.cash),
            AmountBlock(account_type=AccountType.SUBSIDY, amount=purses.subsidy),
        ]
    elif op is Operation.ELECTRICITY:
        if purses is not None:
            blocks.append(AmountBlock(account_type=AccountType.CASH, amount=purses.cash))
        if result.room_balance is not None:
            blocks.append(AmountBlock(account_type=AccountType.ROOM, amount=result.room_balance))
    elif op is Operation.METER and result.room_balance is not None:
        blocks.append(AmountBlock(account_type=AccountType.ROOM, amount=result.room_balance))
    if not blocks:
        return None
    try:
        return encode_amounts(blocks)
    except FormatError:
        # A balance beyond 12 digits. The campus refuses (13) what would leave one there, so
        # only a purse pushed there some other way (raw transfers with force) gets here; its
        # answer goes without field 54 rather than as a 96 for money that may have moved.
        log.error("gateway: a balance field 54 cannot show: %s", [b.amount for b in blocks])
        return None


# Operations that move money: when the deadline passes while one of them is still at work, or
# its work fails, its 96 is made true before it is sent (Gateway._give_up). An inquiry moves
# nothing. A reversal only ever gives money back, and it is irrevocable once remembered (an
# original that arrives later moves nothing), so its 96 keeps meaning "not confirmed yet": the
# terminal repeats it (see Gateway._work).
_WITHDRAWABLE: Final = frozenset(
    {
        Operation.PURCHASE,
        Operation.ADVICE,
        Operation.HOLD,
        Operation.COMPLETION,
        Operation.ELECTRICITY,
        Operation.METER,
    }
)


def _given_up(answer: _Answer) -> bool:
    """Whether a stored answer is the 96 of a request the gateway gave up (the only 96 that is
    ever stored: every other one is sent without being remembered)."""
    return answer.response.response_code == ResponseCode.SYSTEM_ERROR


# Operations that move money need a positive amount (a completion's amount is the campus's
# business: it knows the hold).
_POSITIVE_AMOUNT: Final = frozenset(
    {Operation.PURCHASE, Operation.ADVICE, Operation.HOLD, Operation.ELECTRICITY, Operation.METER}
)


def _is_request_mti(head: bytes) -> bool:
    return len(head) == 4 and head.isdigit() and head[:1] == b"0" and int(head[2:3]) % 2 == 0


# ---------------------------------------------------------------------------------------
# The answer memory: gateway_responses, looked up and written set-based


SQL_LOOKUP_ANSWERS: Final = """
SELECT key, request_digest, response
FROM gateway_responses
WHERE ledger = $1 AND key = ANY($2::uuid[])
"""
SQL_STORE_ANSWERS: Final = """
INSERT INTO gateway_responses (ledger, key, terminal_id, request_digest, rrn, response)
SELECT $1, u.key, u.terminal_id, u.digest, u.rrn, u.response
FROM unnest($2::uuid[], $3::text[], $4::bytea[], $5::text[], $6::bytea[])
     AS u(key, terminal_id, digest, rrn, response)
ON CONFLICT DO NOTHING
RETURNING key
"""
# A given-up request's 96 stored as its answer and, in the same statement (both or neither), a
# reversal of the request itself remembered in the campus's reversal memory (see
# engine.campus.SQL_REMEMBER_REVERSAL; the reversal's key is the request's own). Only a key
# whose answer this statement stores is reversed: an answer stored before stays the truth.
SQL_CLAIM_ANSWERS: Final = """
WITH stored AS (
    INSERT INTO gateway_responses (ledger, key, terminal_id, request_digest, rrn, response)
    SELECT $1, u.key, u.terminal_id, u.digest, u.rrn, u.response
    FROM unnest($2::uuid[], $3::text[], $4::bytea[], $5::text[], $6::bytea[])
         AS u(key, terminal_id, digest, rrn, response)
    ON CONFLICT DO NOTHING
    RETURNING key, terminal_id
), reversed AS (
    INSERT INTO reversals (ledger, original_key, key, terminal_id, created_at)
    SELECT $1, s.key, s.key, s.terminal_id, $7 FROM stored s
    ON CONFLICT (ledger, original_key) DO NOTHING
)
SELECT key FROM stored
"""
# Requests given up since $1 (engine ns): the reversals a request made of itself.
SQL_GIVEN_UP: Final = """
SELECT ledger, original_key FROM reversals
WHERE key = original_key AND created_at >= $1
ORDER BY created_at LIMIT $2
"""


class _Answer(msgspec.Struct, frozen=True):
    """A decided answer: the digest of the request it answers, the answer, and whether it is
    stored (so a retransmission gets it again)."""

    digest: bytes
    response: Message
    remembered: bool


class _Row(msgspec.Struct, frozen=True):
    key: UUID
    terminal_id: str
    digest: bytes
    rrn: str
    response: bytes


_encode_answer = msgspec.json.Encoder().encode
_decode_answer = msgspec.json.Decoder(Message).decode


class AnswerMemory:
    """Remembered answers in ``gateway_responses`` (see migrations/0003_gateway.sql).

    Lookups and stores are each coalesced (engine.db.coalesce.Coalescer): the requests that arrive
    while one statement runs share the next, so each is one statement per batch of requests,
    on one connection held while the work keeps coming.
    """

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = limits.GATEWAY_MEMORY_BATCH):
        self._pool = pool

        def get_pool() -> asyncpg.Pool:
            return self._pool

        self._lookups: Coalescer[UUID, _Answer | None] = Coalescer(
            get_pool, self._lookup_batch, max_batch=max_batch, name="onecard-gateway-lookups"
        )
        self._stores: Coalescer[_Row, bool] = Coalescer(
            get_pool, self._store_batch, max_batch=max_batch, name="onecard-gateway-stores"
        )
        self._claims: Coalescer[_Row, bool] = Coalescer(
            get_pool, self._claim_batch, max_batch=max_batch, name="onecard-gateway-claims"
        )

    @property
    def statements(self) -> int:
        """Statements run so far (each serves a batch of lookups or of stores)."""
        return self._lookups.statements + self._stores.statements + self._claims.statements

    async def lookup(self, ledger: int, key: UUID) -> _Answer | None:
        """The remembered answer for ``key``, or None."""
        return await self._lookups.ask(ledger, key)

    async def remember(
        self, ledger: int, key: UUID, terminal_id: str, digest: bytes, response: Message
    ) -> _Answer:
        """Store ``response`` (with its RRN) unless an answer for ``key`` exists already;
        return the answer that is stored (this one, or the earlier one that won)."""
        return await self._store(self._stores, ledger, key, terminal_id, digest, response)

    async def claim(
        self, ledger: int, key: UUID, terminal_id: str, digest: bytes, response: Message
    ) -> _Answer:
        """Store a given-up request's 96 as :meth:`remember` does and, in the same statement,
        remember a reversal of the request itself (SQL_CLAIM_ANSWERS), unless an answer for
        ``key`` exists already; return the answer that is stored (the 96, or the earlier one,
        which is then left alone and nothing is reversed)."""
        return await self._store(self._claims, ledger, key, terminal_id, digest, response)

    async def _store(
        self,
        writer: Coalescer[_Row, bool],
        ledger: int,
        key: UUID,
        terminal_id: str,
        digest: bytes,
        response: Message,
    ) -> _Answer:
        for attempt in range(_RRN_ATTEMPTS):
            answer = msgspec.structs.replace(response, rrn=rrn_for(key, attempt))
            row = _Row(key, terminal_id, digest, answer.rrn or "", _encode_answer(answer))
            if await writer.ask(ledger, row):
                return _Answer(digest, answer, True)
            stored = await self.lookup(ledger, key)
            if stored is not None:
                return stored
            # neither inserted nor present: the RRN is taken in this ledger; next candidate
        raise RuntimeError(f"no free RRN for {key} after {_RRN_ATTEMPTS} attempts")

    @staticmethod
    async def _lookup_batch(
        conn: Connection, ledger: int, keys: list[UUID]
    ) -> list[_Answer | None]:
        rows = await conn.fetch(SQL_LOOKUP_ANSWERS, ledger, list(set(keys)))
        found = {
            r["key"]: _Answer(bytes(r["request_digest"]), _decode_answer(r["response"]), True)
            for r in rows
        }
        return [found.get(k) for k in keys]

    @staticmethod
    async def _store_batch(conn: Connection, ledger: int, rows: list[_Row]) -> list[bool]:
        inserted = await conn.fetch(
            SQL_STORE_ANSWERS,
            ledger,
            [r.key for r in rows],
            [r.terminal_id for r in rows],
            [r.digest for r in rows],
            [r.rrn for r in rows],
            [r.response for r in rows],
        )
        done = {r["key"] for r in inserted}
        return [r.key in done for r in rows]

    @staticmethod
    async def _claim_batch(conn: Connection, ledger: int, rows: list[_Row]) -> list[bool]:
        inserted = await conn.fetch(
            SQL_CLAIM_ANSWERS,
            ledger,
            [r.key for r in rows],
            [r.terminal_id for r in rows],
            [r.digest for r in rows],
            [r.rrn for r in rows],
            [r.response for r in rows],
            time.time_ns(),
        )
        done = {r["key"] for r in inserted}
        return [r.key in done for r in rows]


# ---------------------------------------------------------------------------------------
# The gateway


class _Reply(msgspec.Struct, frozen=True):
    """An answer to send: the message and the key to MAC it with (None: no MAC)."""

    message: Message
    mac_key: bytes | None


class _Flight:
    """One execution of a request key in this gateway, and who stores its answer.

    ``verdict`` is the one task in this process that stores the key's answer: the work's own
    answer (AnswerMemory.remember), or the 96 of a give-up (AnswerMemory.claim), whichever
    starts first; the other then takes the verdict's answer instead of storing its own, so the
    late work can never replace a 96 with an approval. ``fresh``: the work found no answer
    stored for the key. ``promise``: the 96 a give-up may send before its claim is stored
    (only when the claim is then certain to store it: the work was fresh and had not started
    storing its own answer). ``given_up``: the deadline passed or the work failed, and the
    verdict is the 96's claim (a retransmission then waits for that, not for the work; the
    flight stays registered until the claim is stored, see ``Gateway._landed``).
    ``answer_by``: when the waiters of a give-up stop waiting for the verdict to be stored
    (one moment for all of them, however each came to wait).
    """

    __slots__ = (
        "answer_by", "digest", "fresh", "given_up", "key", "msg", "op", "promise", "task", "term",
        "verdict",
    )

    def __init__(
        self, term: Terminal, op: Operation, key: UUID, digest: bytes, msg: Message
    ) -> None:
        self.term = term
        self.op = op
        self.key = key
        self.digest = digest
        self.msg = msg
        self.task: asyncio.Task[_Answer | None] | None = None
        self.verdict: asyncio.Task[_Answer] | None = None
        self.fresh = False
        self.given_up = False
        self.promise: _Answer | None = None
        self.answer_by: float | None = None  # loop time: give-up waiters answer by then


class Gateway:
    """The terminal gateway over a started Engine. ``start``/``stop`` bracket its life."""

    def __init__(
        self,
        engine: Engine,
        *,
        campus: Campus | None = None,
        tz: str | None = None,
        max_connections: int = limits.GATEWAY_MAX_CONNECTIONS,
        max_connections_per_peer: int = limits.GATEWAY_MAX_CONNECTIONS_PER_PEER,
        first_frame_timeout_s: float = limits.GATEWAY_FIRST_FRAME_TIMEOUT_S,
        max_frame_bytes: int = limits.GATEWAY_MAX_FRAME_BYTES,
        idle_timeout_s: float = limits.GATEWAY_IDLE_TIMEOUT_S,
        write_timeout_s: float = limits.GATEWAY_WRITE_TIMEOUT_S,
        max_inflight_per_connection: int = limits.GATEWAY_MAX_INFLIGHT_PER_CONNECTION,
        max_inflight: int = limits.GATEWAY_MAX_INFLIGHT,
        request_timeout_s: float = limits.GATEWAY_REQUEST_TIMEOUT_S,
    ) -> None:
        """Configure the gateway; ``campus`` defaults to a Campus over ``engine`` in ``tz``
        (default ``$ONECARD_TZ``, else Asia/Shanghai)."""
        self.engine = engine
        self.tz = campus_tz_name(tz)
        self._zone = ZoneInfo(self.tz)
        if campus is None:
            campus = Campus(engine, tz=self.tz)
        self.campus = campus
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.first_frame_timeout_s = first_frame_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.idle_timeout_s = idle_timeout_s
        self.write_timeout_s = write_timeout_s
        self.max_inflight_per_connection = max_inflight_per_connection
        self.max_inflight = max_inflight
        self.request_timeout_s = request_timeout_s
        self._server: asyncio.Server | None = None
        self._pool: asyncpg.Pool | None = None
        self._memory: AnswerMemory | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._peer_slots: PeerSlots[_Connection] = PeerSlots(
            max_total=max_connections, max_per_peer=max_connections_per_peer
        )
        self._flights: dict[UUID, _Flight] = {}
        # given-up requests whose postings are being taken back (Gateway._settle), by key
        self._settling: dict[UUID, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[int] | None = None
        self._inflight = 0
        self._stopping = False
        self._counters: dict[tuple[str, str | None], Counter] = {}
        self._local: tuple[int, str, str] = (-1, "", "")  # (unix second, field 12, field 13)

    # -- life cycle ------------------------------------------------------------------------

    async def start(
        self, host: str = "127.0.0.1", port: int = 8583, *, sweep: bool = False
    ) -> None:
        """Open the answer memory's pool and start listening on ``host:port`` (0: any).

        ``sweep`` (``onecard serve`` sets it): also take back, in the background, whatever the
        requests given up lately may still have posted (see ``sweep``)."""
        self._pool = await create_pool(self.engine.dsn, max_size=limits.GATEWAY_DB_POOL_MAX)
        self._memory = AnswerMemory(self._pool)
        self._stopping = False
        self._server = await asyncio.start_server(
            self._on_connect, host, port, backlog=limits.GATEWAY_LISTEN_BACKLOG
        )
        if sweep:
            self._sweeper = asyncio.create_task(self.sweep(), name="onecard-gateway-sweep")

    async def sweep(self) -> int:
        """Take back what the requests given up in the last GATEWAY_SWEEP_WINDOW_S may still
        have posted; returns how many there were.

        A give-up stores its 96 and its reversal first and takes the postings back after; a
        process that died in between (or stopped before the database came back) left that
        undo to do. It is idempotent, so every start simply does it again for the recent ones.
        A completion's hold is not released here (its key is not stored): it expires by itself.
        """
        assert self._pool is not None, "gateway not started"
        since = time.time_ns() - int(limits.GATEWAY_SWEEP_WINDOW_S * 1_000_000_000)
        delay = limits.GATEWAY_GIVE_UP_RETRY_S
        while True:
            try:
                async with self._pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
                    rows = await conn.fetch(SQL_GIVEN_UP, since, limits.GATEWAY_SWEEP_MAX)
                break
            except Exception as e:
                log.warning("gateway: sweep postponed (%s)", e)
            await asyncio.sleep(delay)
            delay = min(2 * delay, limits.GATEWAY_GIVE_UP_RETRY_MAX_S)
        await asyncio.gather(*(self._withdraw(r["ledger"], r["original_key"]) for r in rows))
        if rows:
            log.info("gateway: swept %d given-up requests", len(rows))
        return len(rows)

    @property
    def port(self) -> int:
        """The TCP port listened on (after ``start``)."""
        assert self._server is not None, "gateway not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        """Open terminal connections."""
        return len(self._connections)

    async def stop(self, *, grace_s: float = limits.GATEWAY_STOP_GRACE_S) -> None:
        """Stop accepting, stop reading, answer what was read, then close everything."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections.values()):
            conn.stop_reading()
        tasks = list(self._connections)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for t in late:
                self._connections[t].abort()
                t.cancel()
            if late:
                await asyncio.wait(late)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._flights:  # work whose connection went away still finishes and is stored
            await asyncio.wait([f.task for f in self._flights.values() if f.task], timeout=grace_s)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self._stop_settling(grace_s)
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        conn = _Connection(self, reader, writer)
        peer = peer_of(peername[0] if isinstance(peername, tuple) else None)
        admitted, victim = (False, None) if self._stopping else self._peer_slots.admit(conn, peer)
        if victim is not None:  # its slot is this newcomer's now
            GATEWAY_UNVERIFIED_DROPPED.labels("evicted").inc()
            victim.abort()
        if not admitted:  # full of verified terminals (or of this peer's), or stopping
            GATEWAY_REFUSED.inc()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = conn
        GATEWAY_CONNECTIONS.set(len(self._connections))
        try:
            await conn.run()
        finally:
            self._peer_slots.leave(conn)
            self._connections.pop(task, None)
            GATEWAY_CONNECTIONS.set(len(self._connections))

    # -- one frame -------------------------------------------------------------------------

    async def answer(self, payload: bytes) -> bytes | None:
        """The framed-payload answer to one request payload, or None to close the connection.

        Never raises for anything a peer can send.
        """
        t0 = time.perf_counter()
        try:
            reply = await self._decide(payload)
        except Exception:
            log.exception("gateway: unexpected error; closing the connection")
            return None
        if reply is None:
            return None
        msg = reply.message
        data = (
            encode_message_unmac(msg)
            if reply.mac_key is None
            else encode_message(msg, reply.mac_key)
        )
        counter = self._counters.get((msg.mti, msg.response_code))
        if counter is None:  # a labelled child per (MTI, code): looked up once, not per answer
            counter = GATEWAY_RESPONSES.labels(msg.mti, msg.response_code or "")
            self._counters[(msg.mti, msg.response_code)] = counter
        counter.inc()
        GATEWAY_SECONDS.observe(time.perf_counter() - t0)
        return data

    async def _decide(self, payload: bytes) -> _Reply | None:
        try:
            decoded = decode_message(payload)
        except FormatError as e:
            log.debug("gateway: undecodable frame (%s)", e.reason)
            if not _is_request_mti(payload[:4]):
                return None  # nothing to pair an answer with: a clean close
            salvaged = salvage(payload)  # fields 7, 11 and 41, as far as they can be read
            assert salvaged is not None, "a request MTI is four digits"
            return await self._format_error(salvaged)
        msg = decoded.message
        if not _is_request_mti(msg.mti.encode()):
            return None  # an answer MTI sent to us: a confused peer
        try:
            op = classify(msg)
        except FormatError as e:
            log.debug("gateway: format error (%s)", e.reason)
            return await self._format_error(msg)
        assert msg.terminal_id is not None
        try:
            term = await self.campus.terminal(msg.terminal_id)
        except Exception:
            # Without the terminal there is no key to MAC a 96 with; closing tells the
            # terminal to try again just as well.
            log.warning("gateway: terminal lookup failed", exc_info=True)
            return None
        if term is None:
            return _Reply(self._reply(msg, ResponseCode.MAC_FAILURE), None)
        if not decoded.verify(term.mac_key):
            return _Reply(self._reply(msg, ResponseCode.MAC_FAILURE), term.mac_key)
        _frame_verified()  # a terminal's own frame: its connection is no longer evictable
        if msg.merchant_id != term.merchant_id:
            return _Reply(self._reply(msg, ResponseCode.INVALID_MERCHANT), term.mac_key)
        if op is Operation.SIGN_ON:
            return _Reply(self._reply(msg, ResponseCode.APPROVED), term.mac_key)
        if self._overloaded():
            return _Reply(self._reply(msg, ResponseCode.SYSTEM_ERROR), term.mac_key)
        answer = await self._once(term, op, msg)
        if answer is None:
            return None  # not known whether it moved money: no answer rather than a wrong one
        return _Reply(answer, term.mac_key)

    async def _format_error(self, msg: Message) -> _Reply | None:
        """The 30 to a malformed frame (decoded, or what ``salvage`` read of it), echoing what
        it could read, MACed whenever field 41 names a known terminal (contract §5: every
        answer to a known terminal carries a MAC; only 41 tells whose key that is)."""
        key = None
        if msg.terminal_id is not None:
            try:
                term = await self.campus.terminal(msg.terminal_id)
            except Exception:
                # Maybe a known terminal: an unMACed answer would break the rule, and closing
                # tells the terminal to try again just as well (as for a well-formed frame).
                log.warning("gateway: terminal lookup failed", exc_info=True)
                return None
            key = None if term is None else term.mac_key
        return _Reply(self._reply(msg, ResponseCode.FORMAT_ERROR), key)

    def _overloaded(self) -> bool:
        batcher = self.engine.batcher
        return self._inflight >= self.max_inflight or batcher.queued >= batcher.max_queued

    # -- idempotency -----------------------------------------------------------------------

    async def _once(self, term: Terminal, op: Operation, msg: Message) -> Message | None:
        assert msg.stan is not None and msg.transmission_dt is not None
        key = message_key(term.terminal_id, msg.stan, msg.transmission_dt)
        digest = request_digest(msg)
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight(term, op, key, digest, msg)
            flight.task = asyncio.create_task(self._execute(flight))
            self._flights[key] = flight
            flight.task.add_done_callback(functools.partial(self._landed, key))
        task = flight.task
        assert task is not None
        self._inflight += 1
        try:
            # The flight is never awaited directly: a timed-out or disconnected caller must
            # not cancel posting half-way; it finishes and stores its answer for the
            # retransmission. (One future and one timer per request, which is what
            # wait_for(shield(...)) costs several times over.)
            if not flight.given_up:
                await _landing(task, self.request_timeout_s)
            if task.done():
                if task.cancelled() or task.exception() is not None:  # logged once, by _landed
                    if flight.op in _WITHDRAWABLE:
                        return None  # whether it moved money is not known: no answer
                    return self._reply(msg, ResponseCode.SYSTEM_ERROR)
                answer = task.result()
            elif flight.op in _WITHDRAWABLE:
                answer = await self._give_up(flight, "still at work at the deadline")
            else:
                log.warning("gateway: no answer for %s within %.1f s", key,
                            self.request_timeout_s)
                return self._reply(msg, ResponseCode.SYSTEM_ERROR)
        finally:
            self._inflight -= 1
        if answer is None:
            return None  # not known whether it moved money: no answer rather than a wrong one
        if answer.digest != digest:
            return self._reply(msg, ResponseCode.DUPLICATE_DIFFERENT)
        return answer.response

    def _landed(self, key: UUID, task: asyncio.Task[_Answer | None]) -> None:
        flight = self._flights.get(key)
        verdict = None if flight is None else flight.verdict
        if verdict is not None and not verdict.done():
            # Answered with a 96 whose claim is not stored yet (the database is away): the
            # flight stays, so that a retransmission gets that 96 rather than a new execution.
            verdict.add_done_callback(functools.partial(self._forget, key, flight))
        else:
            self._flights.pop(key, None)
        # Retrieved here, not by the waiters: they may all have timed out or gone away.
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("gateway: request %s failed", key, exc_info=exc)

    def _forget(self, key: UUID, flight: _Flight | None, _: object) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    async def _execute(self, flight: _Flight) -> _Answer | None:
        """The answer to ``flight``'s request: the one stored for its key, or the work's (stored
        before it is sent unless it is a plain 96 or a 94, see ``_NOT_REMEMBERED``), or the
        stored 96 of a give-up; None when it is not known whether the request moved money (the
        connection is then closed unanswered, and the retransmission learns the truth).

        A money-moving request whose work fails without saying what it did (``_work``) is
        given up like one whose deadline passed (``_give_up``), so its 96 is true before it is
        sent. If its stored answer cannot be looked up, an earlier attempt of the same message
        may have moved money and been answered: a 96 could be false, so there is no answer.
        If the work's own answer cannot be stored, the retransmission recomputes it from the
        ledger (every transfer id is derived from the key): no answer either.
        """
        assert self._memory is not None, "gateway not started"
        term, key, digest = flight.term, flight.key, flight.digest
        withdrawable = flight.op in _WITHDRAWABLE
        try:
            stored = await self._memory.lookup(term.ledger, key)
        except Exception as e:
            if not withdrawable:
                raise
            log.warning("gateway: answer of %s not looked up (%s); no answer", key, e)
            return None if flight.verdict is None else await flight.verdict
        if stored is not None:
            if _given_up(stored) and withdrawable:
                self._settle_later(flight)  # idempotent; completes one a crash cut short
            return stored
        if flight.verdict is not None:  # given up while we looked: it is the answer
            return await flight.verdict
        flight.fresh = True
        response = await self._work(flight)
        if flight.verdict is None:  # nobody gave up: this is the key's answer
            if response is None:
                return await self._give_up(flight, "failed without saying what it did")
            if response.response_code in _NOT_REMEMBERED:
                return _Answer(digest, response, False)
            flight.verdict = asyncio.create_task(
                self._memory.remember(term.ledger, key, term.terminal_id, digest, response)
            )
        try:  # given up meanwhile: the late work's answer is not stored, the 96 is the answer
            return await flight.verdict
        except Exception as e:  # only storing the work's own answer can fail
            if not withdrawable:
                raise
            log.warning("gateway: answer of %s not stored (%s); no answer", key, e)
            return None

    async def _work(self, flight: _Flight) -> Message | None:
        """The answer the business rules give ``flight``'s request (not stored yet), or None
        when the work of a money-moving request failed without saying what it did.

        The campus answers UNAVAILABLE (or raises) when the database failed under the work:
        maybe before anything was posted, maybe after the posting committed (the read after
        it failed, or the last retry of a commit whose outcome the batcher could not learn).
        For an operation that moves money that is no 96 yet: ``_execute`` gives it up first.
        OVERLOADED is a plain 96 and stays cheap: the batcher's queue was full, nothing was
        queued. An inquiry moves nothing. A reversal (0400) keeps its plain 96, not stored: it
        only ever gives money back, it is remembered before it undoes anything and cannot be
        revoked once remembered, so its 96 means "not confirmed yet" and the terminal repeats
        it until it gets its 00 (each repetition undoes nothing twice: the undo ids are
        derived). Making that 96 "true" would mean charging again what the terminal asked to
        cancel; at worst a reversal's money comes back before the terminal hears of it.
        """
        term, op, key, msg = flight.term, flight.op, flight.key, flight.msg
        result: PaymentResult | None = None
        if op is Operation.UNSUPPORTED:
            code = ResponseCode.INVALID_TRANSACTION
        elif op in _POSITIVE_AMOUNT and not msg.amount:
            code = ResponseCode.INVALID_AMOUNT
        else:
            try:
                result = await self._business(term, op, key, msg)
            except Exception:
                log.exception("gateway: campus failed on %s %s", op.value, key)
                return None if op in _WITHDRAWABLE else self._reply(msg, ResponseCode.SYSTEM_ERROR)
            if result.outcome is Outcome.UNAVAILABLE and op in _WITHDRAWABLE:
                return None
            code = response_code_for(result.outcome)
        return self._reply(
            msg,
            code,
            auth_id=auth_id_for(key) if code == ResponseCode.APPROVED else None,
            amounts=None if result is None else _amounts(op, result),
            timestamp=None if result is None else result.timestamp,
        )

    # -- giving up a request whose deadline passed -------------------------------------------

    async def _give_up(self, flight: _Flight, why: str) -> _Answer | None:
        """The answer to a money-moving request whose deadline passed while its work went on,
        or whose work failed without saying what it did (``why``, for the log): a ``96`` that
        is true, or the answer already stored for the request.

        The 96 is stored as the request's answer together with the request's own reversal, in
        one statement (AnswerMemory.claim), unless an answer is stored already: then that one
        is sent, it is the truth. Once the claim is stored the work still going on cannot move
        money for good: what it posted already is taken back by ``_settle``; what it posts
        later is undone by its own read of the reversal memory after posting (Campus), and
        ``_settle`` takes back again whatever is left once the work has landed; each undo has
        derived ids, so the money comes back exactly once. In this process only one answer is
        ever stored per key (``_Flight.verdict``), so the late work cannot replace the 96.

        If the claim is not stored within GATEWAY_GIVE_UP_WAIT_S of the give-up (the database
        is away), it is retried in the background until it is, and then the postings are taken
        back. The 96 is sent meanwhile only if nothing but it can be stored for the key any
        more (the work found no stored answer and had not started storing its own); otherwise
        the connection is closed unanswered: the gateway does not know the truth yet, and the
        terminal's retransmission will get the stored answer. The one thing this cannot rule
        out is the same key in flight in another gateway process while the database is away.
        A work that failed has landed: all it posted is there for ``_settle`` to take back.

        Should the process die after the claim and before the undo, the undo is completed by
        the retransmission of the request (``_execute`` finds the stored 96) or by the sweep
        when a gateway starts (``_sweep``).
        """
        if flight.verdict is None:
            log.warning("gateway: %s %s: given up (96, taken back)", flight.key, why)
            response = msgspec.structs.replace(
                self._reply(flight.msg, ResponseCode.SYSTEM_ERROR), rrn=rrn_for(flight.key)
            )
            if flight.fresh:
                flight.promise = _Answer(flight.digest, response, True)
            flight.given_up = True
            flight.verdict = asyncio.create_task(self._claim(flight, response))
            self._settle_later(flight)
        now = asyncio.get_running_loop().time()
        if flight.answer_by is None:
            flight.answer_by = now + limits.GATEWAY_GIVE_UP_WAIT_S
        verdict = flight.verdict
        await _landing(verdict, flight.answer_by - now)
        if verdict.done() and not verdict.cancelled() and verdict.exception() is None:
            return verdict.result()
        return flight.promise

    async def _claim(self, flight: _Flight, response: Message) -> _Answer:
        """Store ``response`` (the 96) with the request's own reversal, retried until stored."""
        assert self._memory is not None
        term = flight.term
        delay = limits.GATEWAY_GIVE_UP_RETRY_S
        while True:
            try:
                return await self._memory.claim(
                    term.ledger, flight.key, term.terminal_id, flight.digest, response
                )
            except Exception as e:
                log.warning("gateway: the 96 of %s is not stored yet (%s); retrying", flight.key, e)
            await asyncio.sleep(delay)
            delay = min(2 * delay, limits.GATEWAY_GIVE_UP_RETRY_MAX_S)

    def _settle_later(self, flight: _Flight) -> None:
        """Start taking back what a given-up request posted (once per key at a time)."""
        if flight.key in self._settling:
            return
        task = asyncio.create_task(self._settle(flight))
        self._settling[flight.key] = task
        task.add_done_callback(functools.partial(self._settled, flight.key))

    def _settled(self, key: UUID, task: asyncio.Task[None]) -> None:
        if self._settling.get(key) is task:
            del self._settling[key]
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("gateway: taking back %s failed", key, exc_info=exc)

    async def _settle(self, flight: _Flight) -> None:
        """Once the 96 is the stored answer: take back what the request posted, and again once
        its work has landed (its own undo may have met a database error), each retried until
        done. Nothing when another answer was stored first: that one is the truth."""
        hold_key = None
        if flight.op is Operation.COMPLETION:
            hold_key = self._original_key(flight.term, flight.msg)
        ledger, key, task = flight.term.ledger, flight.key, flight.task
        if flight.verdict is None:  # a retransmission found the stored 96
            await self._withdraw(ledger, key, hold_key)
            return
        if not _given_up(await flight.verdict):
            return
        await self._withdraw(ledger, key, hold_key)
        if task is not None and not task.done():
            await asyncio.wait([task])
            await self._withdraw(ledger, key, hold_key)

    async def _withdraw(self, ledger: int, key: UUID, hold_key: UUID | None = None) -> None:
        delay = limits.GATEWAY_GIVE_UP_RETRY_S
        while not await self.campus.withdraw(ledger, key=key, hold_key=hold_key):
            await asyncio.sleep(delay)
            delay = min(2 * delay, limits.GATEWAY_GIVE_UP_RETRY_MAX_S)

    async def _stop_settling(self, grace_s: float) -> None:
        """Give the undo in progress ``grace_s``, then stop it (the retransmission or the next
        start's sweep completes it) along with the claims still waiting for the database."""
        if self._settling:
            await asyncio.wait(list(self._settling.values()), timeout=grace_s)
        late: list[asyncio.Task[Any]] = [*self._settling.values()]
        late += [f.verdict for f in self._flights.values() if f.verdict is not None]
        for t in late:
            t.cancel()
        if late:
            await asyncio.wait(late)

    async def _business(
        self, term: Terminal, op: Operation, key: UUID, msg: Message
    ) -> PaymentResult:
        campus = self.campus
        card, amount, pin = msg.card_no or "", msg.amount or 0, msg.pin_data
        match op:
            case Operation.PURCHASE:
                return await campus.purchase(
                    term, card_no=card, amount=amount, key=key, pin_block=pin
                )
            case Operation.ADVICE:
                return await campus.purchase(
                    term, card_no=card, amount=amount, key=key, pin_block=pin, force=True
                )
            case Operation.INQUIRY:
                return await campus.balance(term, card_no=card, pin_block=pin)
            case Operation.HOLD:
                return await campus.hold(term, card_no=card, amount=amount, key=key, pin_block=pin)
            case Operation.COMPLETION:
                return await campus.complete(
                    term,
                    hold_key=self._original_key(term, msg),
                    amount=amount,
                    key=key,
                    card_no=msg.card_no,
                )
            case Operation.ELECTRICITY:
                return await campus.buy_electricity(
                    term,
                    card_no=card,
                    room_id=msg.room_id or "",
                    amount=amount,
                    key=key,
                    pin_block=pin,
                )
            case Operation.METER:
                return await campus.meter_usage(
                    term, room_id=msg.room_id or "", amount=amount, key=key
                )
            case Operation.REVERSAL:
                return await campus.reverse(
                    term, original_key=self._original_key(term, msg), key=key
                )
        raise AssertionError(f"no business rule for {op}")

    @staticmethod
    def _original_key(term: Terminal, msg: Message) -> UUID:
        # A terminal can only name its own messages: the key embeds its terminal id.
        assert msg.original_data is not None
        original = parse_original(msg.original_data)
        return message_key(term.terminal_id, original.stan, original.transmission_dt)

    # -- answers ---------------------------------------------------------------------------

    def _reply(
        self,
        msg: Message,
        code: ResponseCode,
        *,
        auth_id: str | None = None,
        amounts: str | None = None,
        timestamp: int | None = None,
    ) -> Message:
        """The answer to ``msg``: its identifying fields echoed, fields 12/13 in campus time."""
        second = (time.time_ns() if timestamp is None else timestamp) // 1_000_000_000
        if second != self._local[0]:  # fields 12/13 change once a second, not per answer
            local = datetime.fromtimestamp(second, self._zone)
            self._local = (second, local.strftime("%H%M%S"), local.strftime("%m%d"))
        _, local_time, local_date = self._local
        return Message(
            mti=response_mti(msg.mti),
            card_no=msg.card_no,
            processing_code=msg.processing_code,
            amount=msg.amount,
            transmission_dt=msg.transmission_dt,
            stan=msg.stan,
            local_time=local_time,
            local_date=local_date,
            auth_id=auth_id,
            response_code=code,
            terminal_id=msg.terminal_id,
            merchant_id=msg.merchant_id,
            additional_amounts=amounts,
            original_data=msg.original_data,
            room_id=msg.room_id,
        )


async def _landing(flight: asyncio.Future[Any], timeout_s: float) -> None:
    """Wait until ``flight`` is done or ``timeout_s`` has passed, whichever is first, without
    ever cancelling it (cancelling the waiter leaves the flight running)."""
    if flight.done():
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    flight.add_done_callback(wake)
    timer = loop.call_later(timeout_s, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        flight.remove_done_callback(wake)


class _Connection:
    """One terminal connection: a reader that dispatches frames and a writer that sends the
    answers in request order; at most ``max_inflight_per_connection`` unanswered frames.

    Unverified (evictable, see ``Gateway._on_connect``) until a frame's MAC verifies, which
    must happen within ``first_frame_timeout_s`` of the connection opening."""

    def __init__(
        self, gateway: Gateway, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.gateway = gateway
        self.reader = reader
        self.writer = writer
        self._slots = asyncio.Semaphore(gateway.max_inflight_per_connection)
        self._out: asyncio.Queue[asyncio.Task[bytes | None] | None] = asyncio.Queue()
        self._read_task: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.verified = False

    def stop_reading(self) -> None:
        """Read no further frame; answers to frames already read are still sent."""
        if self._read_task is not None:
            self._read_task.cancel()

    def abort(self) -> None:
        """Drop the connection now (a stop whose grace ran out)."""
        self.writer.transport.abort()

    async def run(self) -> None:
        """Serve the connection until EOF, an error, the idle timeout, the first-frame
        deadline, an eviction or the gateway's stop."""
        self._deadline = asyncio.get_running_loop().call_later(
            self.gateway.first_frame_timeout_s, self._unverified_too_long
        )
        self._read_task = asyncio.create_task(self._read_loop())
        write_task = asyncio.create_task(self._write_loop())
        try:
            await asyncio.wait({self._read_task})
            self._out.put_nowait(None)
            await write_task
        finally:
            self._deadline.cancel()
            self._read_task.cancel()
            write_task.cancel()
            while not self._out.empty():
                pending = self._out.get_nowait()
                if pending is not None:
                    pending.cancel()  # the shielded flight behind it still finishes
            self.writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(self.gateway.write_timeout_s):
                    await self.writer.wait_closed()

    def _on_verified(self) -> None:
        if not self.verified:
            self.verified = True
            self.gateway._peer_slots.settle(self)
            if self._deadline is not None:
                self._deadline.cancel()

    def _unverified_too_long(self) -> None:
        if not self.verified:
            GATEWAY_UNVERIFIED_DROPPED.labels("first_frame_deadline").inc()
            self.gateway._peer_slots.leave(self)  # the slot is free now, not after pending answers
            self.abort()

    async def _read_loop(self) -> None:
        gw = self.gateway
        _ON_VERIFIED.set(self._on_verified)  # for the answer tasks started below
        while True:
            await self._slots.acquire()
            try:
                async with asyncio.timeout(gw.idle_timeout_s):
                    payload = await read_frame(self.reader, max_len=gw.max_frame_bytes)
            except (TimeoutError, FrameError, ConnectionError) as e:
                # FrameError leaves the stream position unknown: only closing is safe.
                log.debug("gateway: closing connection (%s)", type(e).__name__)
                return
            if payload is None:
                return
            self._out.put_nowait(asyncio.create_task(gw.answer(payload)))

    async def _write_loop(self) -> None:
        while (task := await self._out.get()) is not None:
            try:
                data = await task
            finally:
                self._slots.release()
            if data is None:
                break  # the answer is "close": nothing after it is sent
            try:
                self.writer.write(frame(data))
                async with asyncio.timeout(self.gateway.write_timeout_s):
                    await self.writer.drain()
            except (ConnectionError, TimeoutError):
                break
        if self._read_task is not None:
            self._read_task.cancel()

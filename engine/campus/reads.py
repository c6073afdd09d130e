"""The hot-path reads of the campus: one shared statement per batch of requests.

Every read a terminal operation needs goes through a coalescer (engine/db/coalesce.py): the
card's holder and purses (cached: that mapping never changes), the card's state with its
purses' balances, today's spending and whether the operation exists or was reversed, the
transfers earlier operations posted, the balances after an operation, and terminals by id
(cached: a terminal never changes). Each statement below serves a whole batch of requests of
one ledger: one row per request in, found by its ordinal, never a statement per request.

(Over 400 lines on purpose: the five statements, the structs their rows fill and their batch
runners are one piece; the operations import the structs from here.)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar
from uuid import UUID

import asyncpg
import msgspec

from engine import limits
from engine.access.secretbox import SecretBox, SecretError
from engine.campus.model import (
    CARD_NO,
    SPENDING_CODES,
    TERMINAL_ID_LEN,
    CardStatus,
    Terminal,
)
from engine.campus.secrets import payment_pin, terminal_row
from engine.campus.unique import terminal_ledgers
from engine.db.coalesce import Coalescer, Connection
from ledger.types import INT64_MAX, NIL_UUID, TransferCode, TransferFlags

log = logging.getLogger(__name__)

# Run once on each connection a campus coalescer takes (the engine's pool already sets it as a
# session default; a pool with the default reset would undo a SET on release). A shared
# read of a large batch can be costed past jit_above_cost; compiling it takes ~40 ms, many
# times what running it takes.
SQL_READER_SESSION: Final = "SET jit = off"

_PENDING: Final = int(TransferFlags.PENDING)
_VOID: Final = int(TransferFlags.VOID_PENDING)
_ANY_LEDGER: Final = 0  # coalescing key of reads that find their ledger (terminals by id)


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
# the sum, none after it (see spending.py). The sum is numeric, capped at the bigint range:
# two purses' debits may add up past it, and one overflow would fail every payment sharing
# the statement (a capped sum is still over any limit).
# The sum walks transfers_debit per purse (and transfers_credit for the reversal check), never
# the ledger's whole day: the ranges are row comparisons on (account, timestamp), which no other
# index can serve, so even stale statistics (a fresh ledger) cannot turn a limited payment into
# a scan of every transfer of the day.
# The daily limit is the lower of the card office's and the holder's own (holder_limits, set
# at /self/limit): a holder can only ever tighten it.
# Every table is bound to the ledger by `= $1` itself, never only through a join (`hd.ledger =
# t.ledger` would reach $1 through the kept subquery only): that is what lets Citus send the
# whole statement to the one worker owning the ledger (tests/citus/test_router.py).
SQL_CARD_STATES = f"""
SELECT q.i, c.status, least(c.daily_limit, hl.daily_limit) AS daily_limit, c.pin, c.pin_enc,
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
          AND t.code IN ({", ".join(str(int(c)) for c in SPENDING_CODES)})
          AND t.flags & {_VOID} = 0
        OFFSET 0  -- kept a subquery: scanned per purse, never hoisted into a ledger scan
    ) t
    LEFT JOIN holds hd ON hd.ledger = $1 AND hd.id = t.id
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

# Terminals of one ledger by id: their ledgers come first from terminal_ids (unique across
# ledgers, engine/campus/unique.py), so no read visits a ledger a terminal is not in.
SQL_TERMINALS = """
SELECT terminal_id, merchant_id, ledger, kind, account_id, mac_key, mac_key_enc
FROM terminals WHERE ledger = $1 AND terminal_id = ANY($2::text[])
"""


class CardRef(msgspec.Struct, frozen=True):
    """What never changes about a card: its holder and the holder's purses."""

    ledger: int
    card_no: str
    holder_id: str
    purse_id: int
    subsidy_id: int


class StateQuery(msgspec.Struct, frozen=True):
    """One request's row of SQL_CARD_STATES."""

    ref: CardRef
    key: UUID
    part_a: UUID
    part_b: UUID
    want_spent: bool
    day_start: int
    day_end: int


class CardState(msgspec.Struct, frozen=True):
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


class Part(msgspec.Struct, frozen=True):
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


def _part(r: asyncpg.Record) -> Part:
    purse, subsidy = r["purse_account_id"], r["subsidy_account_id"]
    return Part(
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


class PartsQuery(msgspec.Struct, frozen=True):
    """Transfers by id, and reversal memory by original key, for one request."""

    ids: tuple[UUID, ...]
    keys: tuple[UUID, ...] = ()


class PartsAnswer(msgspec.Struct, frozen=True):
    parts: list[Part]  # in timestamp order
    reversed: frozenset[UUID]



class AfterQuery(msgspec.Struct, frozen=True):
    key: UUID
    accounts: tuple[int, ...]


class AfterAnswer(msgspec.Struct, frozen=True):
    available: dict[int, int]
    reversed: bool



def _bounded_put(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))  # oldest first: dicts keep insertion order
    cache[key] = value


_I = TypeVar("_I")
_R = TypeVar("_R")


def campus_coalescer(
    pool: Callable[[], asyncpg.Pool],
    run: Callable[[Connection, int, list[_I]], Awaitable[list[_R]]],
    *,
    max_batch: int,
    name: str,
) -> Coalescer[_I, _R]:
    """A coalescer for one of the campus's shared statements (jit off on its connections)."""
    return Coalescer(pool, run, max_batch=max_batch, session=SQL_READER_SESSION,
                     name=f"onecard-campus-{name}")


class Reads:
    """The campus's coalesced reads and the caches in front of them (one per Campus).

    ``pool`` is asked for the engine's pool at each connection taken (an engine restarted
    after a failure has a new one)."""

    def __init__(
        self, pool: Callable[[], asyncpg.Pool], *, max_batch: int, box: SecretBox
    ) -> None:
        self._terminals: dict[str, Terminal] = {}
        self._cards: dict[tuple[int, str], CardRef] = {}
        self._refs: Coalescer[str, CardRef | None] = campus_coalescer(
            pool, _read_card_refs, max_batch=max_batch, name="cards")
        self._states: Coalescer[StateQuery, CardState | None] = campus_coalescer(
            pool, functools.partial(_read_states, box), max_batch=max_batch, name="states")
        self._parts: Coalescer[PartsQuery, PartsAnswer] = campus_coalescer(
            pool, _read_parts, max_batch=max_batch, name="parts")
        self._after: Coalescer[AfterQuery, AfterAnswer] = campus_coalescer(
            pool, _read_after, max_batch=max_batch, name="after")
        self._terminal_reads: Coalescer[str, Terminal | None] = campus_coalescer(
            pool, functools.partial(_read_terminals, box), max_batch=max_batch,
            name="terminals")

    @property
    def statements(self) -> int:
        """Shared statements run so far (each serves a batch of requests)."""
        return sum(c.statements for c in (self._refs, self._states, self._parts, self._after,
                                          self._terminal_reads))

    async def card_ref(self, ledger: int, card_no: str) -> CardRef | None:
        """The card's holder and purses, or None for a card that is not issued (yet)."""
        ref = self._cards.get((ledger, card_no))
        if ref is None:
            if not CARD_NO.fullmatch(card_no):
                return None  # cannot be stored (cards CHECK); must not fail a shared read
            ref = await self._refs.ask(ledger, card_no)
            if ref is None:
                return None  # not cached: the card may be issued a moment later
            _bounded_put(self._cards, (ledger, card_no), ref, limits.MAX_CACHED_CARDS)
        return ref

    async def card_state(
        self,
        ref: CardRef,
        key: UUID,
        parts: Sequence[UUID],
        *,
        day: tuple[int, int],
        want_spent: bool,
    ) -> CardState:
        """The card's state now (never cached), its purses, whether the operation ``key`` was
        reversed or any of its ``parts`` (at most two) exists, and, if ``want_spent``, today's
        spending summed from the ledger (``day``: the local day's [start, end))."""
        a = parts[0] if parts else NIL_UUID
        b = parts[1] if len(parts) > 1 else a
        st = await self._states.ask(
            ref.ledger, StateQuery(ref, key, a, b, want_spent, day[0], day[1])
        )
        assert st is not None, "cards, holders and accounts are never deleted"
        return st

    async def parts(
        self, ledger: int, ids: Sequence[UUID], keys: Sequence[UUID] = ()
    ) -> PartsAnswer:
        """The transfers ``ids`` that exist (timestamp order) and which of ``keys`` have a
        remembered reversal."""
        return await self._parts.ask(ledger, PartsQuery(tuple(ids), tuple(keys)))

    async def after(
        self, ledger: int, key: UUID, accounts: Sequence[int]
    ) -> tuple[dict[int, int], bool]:
        """The available balances of ``accounts`` now, and whether a reversal of the
        operation ``key`` is remembered."""
        a = await self._after.ask(ledger, AfterQuery(key, tuple(accounts)))
        return a.available, a.reversed

    async def terminal(self, terminal_id: str) -> Terminal | None:
        """The registered terminal with this id (cached: a terminal never changes), or None."""
        term = self._terminals.get(terminal_id)
        if term is None:
            if len(terminal_id) != TERMINAL_ID_LEN or "\x00" in terminal_id:
                return None  # cannot be stored (terminals CHECK); must not fail a shared read
            # every terminal signs on at once after a restart: one statement for all of them
            found = await self._terminal_reads.ask(_ANY_LEDGER, terminal_id)
            if found is None:
                return None  # not cached: it may be registered a moment later
            term = found
            _bounded_put(self._terminals, terminal_id, term, limits.MAX_CACHED_TERMINALS)
        return term


# -- the shared statements' runners (one call answers a batch, in order) ------------------------


async def _read_card_refs(conn: Connection, ledger: int, card_nos: list[str]
                          ) -> list[CardRef | None]:
    rows = await conn.fetch(SQL_CARD_REFS, ledger, list(set(card_nos)))
    found = {
        r["card_no"]: CardRef(ledger, r["card_no"], r["holder_id"], r["purse_account_id"],
                              r["subsidy_account_id"])
        for r in rows
    }
    return [found.get(c) for c in card_nos]


async def _read_states(box: SecretBox, conn: Connection, ledger: int, qs: list[StateQuery]
                       ) -> list[CardState | None]:
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
    out: list[CardState | None] = [None] * len(qs)
    for r in rows:
        q = qs[r["i"] - 1]
        out[r["i"] - 1] = CardState(
            status=CardStatus(r["status"]),
            daily_limit=r["daily_limit"],
            pin=payment_pin(box, ledger, q.ref.card_no, r),
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


async def _read_parts(conn: Connection, ledger: int, qs: list[PartsQuery]) -> list[PartsAnswer]:
    ids = list({i for q in qs for i in q.ids})
    keys = list({k for q in qs for k in q.keys})
    parts: dict[UUID, Part] = {}
    reversed_: set[UUID] = set()
    for r in await conn.fetch(SQL_PARTS, ledger, ids, keys):
        if r["reversed"] is not None:
            reversed_.add(r["reversed"])
        else:
            parts[r["id"]] = _part(r)
    out = []
    for q in qs:
        mine = sorted((parts[i] for i in set(q.ids) if i in parts), key=lambda p: p.timestamp)
        out.append(PartsAnswer(mine, frozenset(k for k in q.keys if k in reversed_)))
    return out


async def _read_after(conn: Connection, ledger: int, qs: list[AfterQuery]) -> list[AfterAnswer]:
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
        AfterAnswer({a: available[a] for a in q.accounts if a in available}, q.key in reversed_)
        for q in qs
    ]


async def _read_terminals(box: SecretBox, conn: Connection, _: int, terminal_ids: list[str]
                          ) -> list[Terminal | None]:
    owners = await terminal_ledgers(conn, terminal_ids)
    rows = []
    for ledger in sorted(set(owners.values())):
        ids = [t for t, owner in owners.items() if owner == ledger]
        rows += await conn.fetch(SQL_TERMINALS, ledger, ids)
    found = {}
    for r in rows:
        try:
            found[r["terminal_id"]] = terminal_row(r, box)
        except SecretError as e:  # unknown to the gateway (63), not a failed batch
            log.error("campus: the MAC key of terminal %s does not open: %s",
                      r["terminal_id"], e)
    return [found.get(t) for t in terminal_ids]

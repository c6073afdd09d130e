"""The operator log (contract §6): every write made by an operator or an API key, append-only
and hash-chained.

``hash = sha256(prev_hash || canonical(entry))`` with ``canonical`` the JSON array
``[id, at, actor, role, action, target, outcome]`` (as ``ledger.audit`` does for transfers).
Ids are consecutive and come from the chain's head row (``operator_log_heads``), which every
append locks: a gap is a deleted entry, a row past the head an inserted one, a hash that does
not recompute a changed one (``check_chain``, run by ``onecard verify``).

Appends are group-committed (:class:`OperatorLog`): requests writing at the same time share one
transaction, so logging every write by a key does not cost a transaction per request. A caller
is answered once its entry is committed: an answered write is always in the log.

What goes in is chosen by the callers (ids, names, statuses), never a request body, a password,
a key, a PIN or an activation code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from engine import limits
from engine.db.stream import stream
from ledger.types import INT64_MAX

GENESIS: Final = "0" * 64
CHAIN: Final = 0  # the installation's one chain lives under ledger 0

_encode = msgspec.json.Encoder().encode


def _encode_text(value: Any) -> str:
    return _encode(value).decode()

Conn = asyncpg.Connection | PoolConnectionProxy


class Entry(msgspec.Struct, frozen=True):
    """What is recorded about one write (``at`` and ``id`` are added when it is appended)."""

    actor: str  # username or key name (``cli:<user>`` for the command line)
    role: str
    action: str  # e.g. "POST /v1/cards/{card_no}/report-lost", "apikey revoke"
    target: str  # what it acted on
    outcome: str  # e.g. "200 lost", "403 forbidden", "created"


class Logged(msgspec.Struct, frozen=True):
    """A stored entry."""

    id: int
    at: int  # wall clock, ns
    actor: str
    role: str
    action: str
    target: str
    outcome: str


def clip(text: str) -> str:
    """A field as stored: control characters replaced, at most MAX_OPERATOR_LOG_FIELD chars."""
    limit = limits.MAX_OPERATOR_LOG_FIELD
    if len(text) <= limit and text.isprintable():
        return text  # the usual case, without a pass per character
    cleaned = "".join(c if c.isprintable() else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def entry_hash(prev_hash: str, e: Logged) -> str:
    """The chain hash of ``e`` after ``prev_hash``."""
    return _hash(prev_hash, [e.id, e.at, e.actor, e.role, e.action, e.target, e.outcome])


def _hash(prev_hash: str, fields: list[Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + _encode(fields)).hexdigest()


# One statement, one round trip: the head moves from ($2, $3) to ($4, $5) and the entries are
# inserted only if the head still was ($2, $3); otherwise (another process appended) nothing
# is written and the caller re-reads the head and tries again. Appenders racing for the head
# row queue on its row lock, and the loser re-checks the moved head (READ COMMITTED).
SQL_APPEND: Final = """
WITH moved AS (
    UPDATE operator_log_heads SET last_id = $4, head = $5
    WHERE ledger = $1 AND last_id = $2 AND head = $3 RETURNING 1)
INSERT INTO operator_log (ledger, id, at, actor, role, action, target, outcome, prev_hash, hash)
SELECT $1, x.* FROM json_to_recordset($6::json) AS x(
    id bigint, at bigint, actor text, role text, action text, target text, outcome text,
    prev_hash text, hash text)
WHERE EXISTS (SELECT 1 FROM moved)
"""
MAX_APPEND_TRIES: Final = 100  # appenders racing for the head: each try re-reads it
SQL_PAGE: Final = """
SELECT id, at, actor, role, action, target, outcome FROM operator_log
WHERE ledger = $1 AND id < $2 ORDER BY id DESC LIMIT $3
"""
SQL_HEAD: Final = "SELECT last_id, head FROM operator_log_heads WHERE ledger = $1"
SQL_ALL: Final = """
SELECT id, at, actor, role, action, target, outcome, prev_hash, hash FROM operator_log
WHERE ledger = $1 ORDER BY id
"""


Head = tuple[int, str]  # (last id, last hash) of the chain


class _Row(msgspec.Struct):
    """One row as sent (the rows travel as one JSON parameter: one value to encode, not nine
    arrays of many)."""

    id: int
    at: int
    actor: str
    role: str
    action: str
    target: str
    outcome: str
    prev_hash: str
    hash: str


def _chained(head: Head, entries: Sequence[tuple[Entry, int]]) -> tuple[list[_Row], Head]:
    """The rows of ``entries`` appended after ``head``, and the head after them."""
    last_id, prev = head
    rows = []
    for e, at in entries:
        last_id += 1
        actor, role, action = clip(e.actor), clip(e.role), clip(e.action)
        target, outcome = clip(e.target), clip(e.outcome)
        # as entry_hash(prev, Logged(...)), without making one
        h = _hash(prev, [last_id, at, actor, role, action, target, outcome])
        rows.append(_Row(last_id, at, actor, role, action, target, outcome, prev, h))
        prev = h
    return rows, (last_id, prev)


async def append(
    conn: Conn, entries: Sequence[tuple[Entry, int]], *, head: Head | None = None
) -> tuple[list[int], Head]:
    """Append (entry, at) pairs to the chain atomically; returns their ids and the new head.
    ``head``: the head as last seen (saves reading it; a stale one costs a retry)."""
    for _ in range(MAX_APPEND_TRIES):
        if head is None:
            r = await conn.fetchrow(SQL_HEAD, CHAIN)
            assert r is not None, "migration 0012 creates the head row"
            head = (r["last_id"], r["head"])
        rows, after = _chained(head, entries)
        status = await conn.execute(SQL_APPEND, CHAIN, *head, *after, _encode_text(rows))
        if int(status.split()[-1]) == len(entries):
            return [r.id for r in rows], after
        head = None  # another appender moved the head: read it again
    raise RuntimeError("operator log: could not append (the head kept moving)")


async def record(conn: Conn, entry: Entry, *, at: int | None = None) -> int:
    """Append one entry now (the command line's writes); returns its id."""
    ids, _ = await append(conn, [(entry, at if at is not None else time.time_ns())])
    return ids[0]


class OperatorLog:
    """Group-committed appends for a running engine: ``await log.record(entry)`` returns once
    the entry is committed, sharing its transaction with whatever else arrived meanwhile."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        *,
        clock: Callable[[], int] = time.time_ns,
        max_batch: int = limits.MAX_OPERATOR_LOG_BATCH,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._max = max_batch
        self._pending: list[tuple[Entry, int, asyncio.Future[int]]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._head: Head | None = None  # as this process last left it
        self.transactions = 0  # appends committed (tests and measurements read it)

    async def record(self, entry: Entry) -> int:
        """Append ``entry``; returns its id once committed (raises if the database fails)."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, self._clock(), fut))
        if self._task is None:
            self._wake = asyncio.Event()  # of the running loop
            self._task = asyncio.create_task(self._flush(), name="onecard-operator-log")
        else:
            self._wake.set()
        return await fut

    async def _more(self) -> bool:
        """Whether entries wait, lingering a little for some when none do (as the campus's
        coalescers do: a connection taken per append would cost more than the append)."""
        if not self._pending:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limits.OPERATOR_LOG_LINGER_S):
                    await self._wake.wait()
        return bool(self._pending)

    async def _flush(self) -> None:
        try:
            while self._pending:
                try:
                    async with self._pool().acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as c:
                        while await self._more():
                            await self._append(c)
                except Exception as exc:  # no connection: everyone waiting hears why
                    self._head = None
                    waiting, self._pending = self._pending, []
                    for _, _, fut in waiting:
                        if not fut.done():
                            fut.set_exception(exc)
        finally:
            self._task = None

    async def _append(self, conn: Conn) -> None:
        batch, self._pending = self._pending[: self._max], self._pending[self._max :]
        try:
            ids, self._head = await append(conn, [(e, at) for e, at, _ in batch],
                                           head=self._head)
        except Exception as exc:
            self._head = None
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncpg.PostgresError) and not conn.is_closed():
                return  # the statement failed, the connection did not
            raise
        self.transactions += 1
        for (_, _, fut), entry_id in zip(batch, ids, strict=True):
            if not fut.done():
                fut.set_result(entry_id)


async def page(conn: Conn, *, limit: int, before: int | None) -> tuple[list[Logged], int | None]:
    """Entries newest first, ``limit`` at a time, older than id ``before``; with the id to ask
    for next (None when nothing older exists)."""
    rows = await conn.fetch(SQL_PAGE, CHAIN, before or INT64_MAX, limit + 1)
    entries = [Logged(*r) for r in rows[:limit]]
    return entries, entries[-1].id if len(rows) > limit else None


# -- verification --------------------------------------------------------------------------------


class ChainFault(msgspec.Struct, frozen=True):
    """Something wrong with the chain: ``subject`` names the entry."""

    subject: str
    detail: str


def _subject(entry_id: int) -> str:
    return f"operator log entry {entry_id}"


async def check_chain(conn: Conn) -> tuple[int, list[ChainFault]]:
    """Recompute the chain (a cursor reads it in bounded memory, in one snapshot); returns how
    many entries were checked and what is wrong, in chain order."""
    if not conn.is_in_transaction():
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            return await check_chain(conn)
    faults: list[ChainFault] = []
    head = await conn.fetchrow(SQL_HEAD, CHAIN)
    last_id, head_hash = (head["last_id"], head["head"]) if head else (0, GENESIS)
    prev_id, prev_hash, count = 0, GENESIS, 0
    async for chunk in stream(conn, SQL_ALL, CHAIN):
        for r in chunk:
            count += 1
            e = Logged(*r[:7])
            if e.id > last_id:
                faults.append(ChainFault(_subject(e.id), f"inserted outside the engine: the "
                                         f"chain's head ends at entry {last_id}"))
                continue
            if e.id > prev_id + 1:
                gone = f"{prev_id + 1}" + (f"..{e.id - 1}" if e.id - 1 > prev_id + 1 else "")
                faults.append(ChainFault(_subject(prev_id + 1), f"deleted: entry {gone} is "
                                         "missing from the chain"))
            elif r["prev_hash"] != prev_hash:
                faults.append(ChainFault(_subject(e.id), "its prev_hash does not continue the "
                                         f"chain: entry {prev_id} was changed or replaced, or "
                                         "this one inserted in its place"))
            if entry_hash(r["prev_hash"], e) != r["hash"]:
                faults.append(ChainFault(_subject(e.id), "changed after it was written: its "
                                         "hash no longer matches"))
            prev_id, prev_hash = e.id, r["hash"]
    if prev_id < last_id:
        gone = f"{prev_id + 1}" + (f"..{last_id}" if last_id > prev_id + 1 else "")
        faults.append(ChainFault(_subject(prev_id + 1),
                                 f"deleted: entry {gone} is missing from the end of the chain"))
    elif prev_hash != head_hash:
        faults.append(ChainFault("operator log", "the chain's head does not match its last "
                                 "entry: entries were removed, inserted or altered"))
    return count, faults

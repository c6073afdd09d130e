"""Server-side sessions of the web pages in PostgreSQL (table ``web_sessions``, migration 0015).

A session is a random id in an HttpOnly cookie; the table keeps only the id's SHA-256, the
kind (``self`` for holders, ``console`` for operators), the subject (holder id or operator),
a CSRF secret for its forms, and when it began and was last used. A session unused for
``limits.WEB_SESSION_IDLE_S`` is over. A login always starts a new session (a new id: a
session id planted before the login is worth nothing after it).

Times come from the caller's clock (the web state's, which tests move); nothing here reads
the wall clock.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Final

import asyncpg
import msgspec

from engine import limits
from engine.db.coalesce import Coalescer, Connection

IDLE: Final = timedelta(seconds=limits.WEB_SESSION_IDLE_S)
TOUCH: Final = timedelta(seconds=limits.WEB_SESSION_TOUCH_S)
# secrets.token_urlsafe(32) is 43 characters; anything much longer is not one of ours
_MAX_ID_CHARS: Final = 64


class SessionKind(enum.StrEnum):
    """Whose session: a card holder's (/self) or an operator's (/console)."""

    SELF = "self"
    CONSOLE = "console"


class Session(msgspec.Struct, frozen=True):
    """A live session."""

    id_hash: bytes
    kind: SessionKind
    subject: str
    csrf: bytes
    created_at: datetime
    last_seen: datetime


_INSERT: Final = """
INSERT INTO web_sessions (id_hash, kind, subject, csrf, created_at, last_seen)
VALUES ($1, $2, $3, $4, $5, $5)"""
_FIND: Final = """
SELECT subject, csrf, created_at, last_seen FROM web_sessions
WHERE id_hash = $1 AND kind = $2 AND last_seen > $3"""
# Guarded by the same expiry test as the read: a session that expired in between stays over.
_TOUCH: Final = """
UPDATE web_sessions SET last_seen = $2 WHERE id_hash = $1 AND last_seen > $3 AND last_seen < $2"""
# The sessions of concurrent page loads, in one statement (see SessionReads).
_FIND_MANY: Final = """
SELECT q.i, s.subject, s.csrf, s.created_at, s.last_seen
FROM unnest($1::bytea[], $2::text[], $3::timestamptz[])
     WITH ORDINALITY AS q(id_hash, kind, after, i)
JOIN web_sessions s ON s.id_hash = q.id_hash AND s.kind = q.kind AND s.last_seen > q.after"""
_END: Final = "DELETE FROM web_sessions WHERE id_hash = $1"
_END_SUBJECT: Final = "DELETE FROM web_sessions WHERE kind = $1 AND subject = $2"
_PURGE: Final = "DELETE FROM web_sessions WHERE last_seen <= $1"


def hash_id(session_id: str) -> bytes:
    """What the table keeps of a session id."""
    return hashlib.sha256(session_id.encode("utf-8", "replace")).digest()


async def start(
    pool: asyncpg.Pool, kind: SessionKind, subject: str, *, now: datetime, replacing: str | None
) -> tuple[str, Session]:
    """A new session for a verified subject: its id (for the cookie) and the session.

    ``replacing`` is the id the browser sent, ended here; expired sessions are deleted too
    (at each login, so the table holds about the live sessions and no sweeper is needed).
    """
    session_id = secrets.token_urlsafe(32)
    session = Session(
        id_hash=hash_id(session_id),
        kind=kind,
        subject=subject,
        csrf=secrets.token_bytes(32),
        created_at=now,
        last_seen=now,
    )
    async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
        if replacing:
            await conn.execute(_END, hash_id(replacing))
        await conn.execute(_PURGE, now - IDLE)
        await conn.execute(
            _INSERT, session.id_hash, kind.value, subject, session.csrf, now
        )
    return session_id, session


async def find(
    pool: asyncpg.Pool, kind: SessionKind, session_id: str | None, *, now: datetime
) -> Session | None:
    """The live session of that id and kind, or None; marks it used (at most every
    ``limits.WEB_SESSION_TOUCH_S``)."""
    if not session_id or len(session_id) > _MAX_ID_CHARS:
        return None
    id_hash = hash_id(session_id)
    async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
        row = await conn.fetchrow(_FIND, id_hash, kind.value, now - IDLE)
        if row is None:
            return None
        if now - row["last_seen"] >= TOUCH:
            await conn.execute(_TOUCH, id_hash, now, now - IDLE)
    return Session(
        id_hash=id_hash,
        kind=kind,
        subject=row["subject"],
        csrf=row["csrf"],
        created_at=row["created_at"],
        last_seen=row["last_seen"],
    )


async def end(pool: asyncpg.Pool, session_id: str) -> None:
    """End one session (logout)."""
    async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
        await conn.execute(_END, hash_id(session_id))


async def end_all(pool: asyncpg.Pool, kind: SessionKind, subject: str) -> int:
    """End every session of a subject (its password changed, an operator disabled); how many."""
    async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
        status: str = await conn.execute(_END_SUBJECT, kind.value, subject)
    return int(status.rsplit(" ", 1)[-1])


class _Ask(msgspec.Struct, frozen=True):
    id_hash: bytes
    kind: SessionKind
    after: datetime  # the session must have been used after this (not idle for too long)


class SessionReads:
    """``find`` for every page load of a process: the session reads of concurrent page loads
    share one statement (a :class:`Coalescer`, as the terminal path's reads do), so under load
    a page costs a fraction of a round trip for its session. Same answers as ``find``."""

    def __init__(self, pool: Callable[[], asyncpg.Pool]) -> None:
        self._pool = pool
        self._reads: Coalescer[_Ask, Session | None] = Coalescer(
            pool, self._run, name="onecard-web-sessions")

    @property
    def statements(self) -> int:
        """Session reads run so far (each serves a batch of page loads)."""
        return self._reads.statements

    async def find(
        self, kind: SessionKind, session_id: str | None, *, now: datetime
    ) -> Session | None:
        """The live session of that id and kind, or None; marks it used (at most every
        ``limits.WEB_SESSION_TOUCH_S``)."""
        if not session_id or len(session_id) > _MAX_ID_CHARS:
            return None
        found = await self._reads.ask(0, _Ask(hash_id(session_id), kind, now - IDLE))
        if found is not None and now - found.last_seen >= TOUCH:
            async with self._pool().acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
                await conn.execute(_TOUCH, found.id_hash, now, now - IDLE)
        return found

    @staticmethod
    async def _run(conn: Connection, _: int, asks: list[_Ask]) -> list[Session | None]:
        rows = await conn.fetch(_FIND_MANY, [a.id_hash for a in asks],
                                [a.kind.value for a in asks], [a.after for a in asks])
        out: list[Session | None] = [None] * len(asks)
        for r in rows:
            ask = asks[r["i"] - 1]
            out[r["i"] - 1] = Session(id_hash=ask.id_hash, kind=ask.kind, subject=r["subject"],
                                      csrf=r["csrf"], created_at=r["created_at"],
                                      last_seen=r["last_seen"])
        return out

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
from datetime import datetime, timedelta
from typing import Final

import asyncpg
import msgspec

from engine import limits

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

"""Login sessions of the web doors (contract §7/§8), for the self-service pages and the console.

A session is a random 256-bit token (the cookie's value) stored as its SHA-256 only. Every use
(``resolve``) re-reads the session together with its operator, so a disabled operator's session
ends at its next request and a changed role takes effect at once; a session unused for
``SESSION_IDLE_S`` is gone. ``now`` (engine ns) is the caller's, so tests move the clock.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import time
from typing import Final

import msgspec

from engine import limits
from engine.access.lockout import Conn
from engine.access.operators import INSTALLATION
from engine.access.roles import Role

_NS: Final = 1_000_000_000

SQL_OPEN: Final = """
INSERT INTO sessions (ledger, token_hash, kind, subject_ledger, subject, created_at,
                      last_seen_at)
VALUES ($1, $2, $3, $4, $5, $6, $6)
"""
# The session with its operator (if it is one); touched in the same statement.
SQL_RESOLVE: Final = """
UPDATE sessions s SET last_seen_at = $3
FROM (SELECT s2.token_hash, o.role, o.disabled_at
      FROM sessions s2
      LEFT JOIN operators o ON s2.kind = 'operator' AND o.ledger = s2.ledger
                           AND o.username = s2.subject
      WHERE s2.ledger = $1 AND s2.token_hash = $2 AND s2.last_seen_at > $3::bigint - $4::bigint) x
WHERE s.ledger = $1 AND s.token_hash = x.token_hash
RETURNING s.kind, s.subject_ledger, s.subject, x.role, x.disabled_at
"""
SQL_CLOSE: Final = "DELETE FROM sessions WHERE ledger = $1 AND token_hash = $2"
SQL_EXPIRE: Final = "DELETE FROM sessions WHERE ledger = $1 AND last_seen_at <= $2"


class SessionKind(enum.StrEnum):
    """Whose session it is."""

    HOLDER = "holder"
    OPERATOR = "operator"


class Session(msgspec.Struct, frozen=True):
    """A live session: a holder (``ledger``, ``subject`` = holder id) or an operator
    (``subject`` = username, with its current ``role``)."""

    kind: SessionKind
    ledger: int
    subject: str
    role: Role | None = None


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


async def open_session(
    conn: Conn, kind: SessionKind, subject: str, *, ledger: int = INSTALLATION,
    now: int | None = None,
) -> str:
    """A new session for a holder (its ``ledger`` and id) or an operator (username); returns
    the token for the cookie (stored nowhere)."""
    token = secrets.token_urlsafe(32)
    await conn.execute(SQL_OPEN, INSTALLATION, _hash(token), str(kind), ledger, subject,
                       now if now is not None else time.time_ns())
    return token


async def resolve(conn: Conn, token: str, *, now: int | None = None) -> Session | None:
    """The live session of ``token`` (touching it), or None: unknown, idle too long, or its
    operator disabled (or gone)."""
    now = now if now is not None else time.time_ns()
    r = await conn.fetchrow(SQL_RESOLVE, INSTALLATION, _hash(token), now,
                            limits.SESSION_IDLE_S * _NS)
    if r is None:
        return None
    kind = SessionKind(r["kind"])
    if kind is SessionKind.HOLDER:
        return Session(kind, r["subject_ledger"], r["subject"])
    if r["role"] is None or r["disabled_at"] is not None:
        await conn.execute(SQL_CLOSE, INSTALLATION, _hash(token))
        return None
    return Session(kind, r["subject_ledger"], r["subject"], Role(r["role"]))


async def close_session(conn: Conn, token: str) -> None:
    """End a session (logout)."""
    await conn.execute(SQL_CLOSE, INSTALLATION, _hash(token))


async def expire_idle(conn: Conn, *, now: int | None = None) -> int:
    """Delete sessions idle past ``SESSION_IDLE_S``; returns how many."""
    now = now if now is not None else time.time_ns()
    status = await conn.execute(SQL_EXPIRE, INSTALLATION, now - limits.SESSION_IDLE_S * _NS)
    return int(status.split()[-1])

"""Form tokens against cross-site requests: every form carries a hidden ``csrf`` field.

A logged-in page's forms carry the session's own secret (``web_sessions.csrf``). A page shown
before a login (the login form itself) has no session yet: its browser gets a random
"pre-session" cookie, and the form carries HMAC(key, portal, that cookie) with a key made once
per database (``web_keys``), so another site can neither read nor forge it, and every server
process computes the same token. Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Final

import asyncpg

from engine import limits

FIELD: Final = "csrf"

_KEY_NAME: Final = "csrf"
_MAKE_KEY: Final = "INSERT INTO web_keys (name, key) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING"
_READ_KEY: Final = "SELECT key FROM web_keys WHERE name = $1"


def _text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def session_token(csrf_secret: bytes) -> str:
    """The token of a logged-in session's forms."""
    return _text(csrf_secret)


def new_pre_session() -> str:
    """A fresh pre-session cookie value."""
    return secrets.token_urlsafe(32)


def anonymous_token(key: bytes, portal: str, pre_session: str) -> str:
    """The token of a form shown before a login, bound to the pre-session cookie."""
    message = f"{portal}\x00{pre_session}".encode("utf-8", "replace")
    return _text(hmac.new(key, message, hashlib.sha256).digest())


def matches(sent: str | None, expected: str | None) -> bool:
    """The token a form sent is the expected one (constant-time; any text is safe here)."""
    if sent is None or expected is None:
        return False
    return hmac.compare_digest(sent.encode("utf-8", "replace"), expected.encode("ascii"))


async def load_key(pool: asyncpg.Pool) -> bytes:
    """The database's form key, made by whichever process asks first."""
    async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
        await conn.execute(_MAKE_KEY, _KEY_NAME, secrets.token_bytes(32))
        key: bytes = await conn.fetchval(_READ_KEY, _KEY_NAME)
    return key

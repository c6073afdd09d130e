"""API keys (contract §6): bearer tokens for machines, each with one role.

A key is 256 random bits (``ock_`` + 43 URL-safe characters), shown once when created; only its
SHA-256 is stored (a fast hash suffices for a random 256-bit secret, and it keeps the check
cheap). The check hashes the presented token and looks the hash up, so no key is ever
compared as text. A ``topup`` key carries its own clearing account.

:class:`KeyRing` is the per-process lookup: a looked-up key is trusted for at most
``CREDENTIAL_CACHE_S`` without asking again, and a revocation clears every process's cache at
once through ``NOTIFY onecard_credentials`` (one LISTEN connection per process; if it is lost,
the cache time is the bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

import asyncpg
import msgspec

from engine import limits
from engine.access.lockout import Conn
from engine.access.operators import CREDENTIALS_CHANNEL, INSTALLATION, NAME, SQL_NOTIFY
from engine.access.roles import Role

log = logging.getLogger(__name__)

PREFIX: Final = "ock_"
_TOKEN_CHARS: Final = 43  # token_urlsafe(32)
KEY_LENGTH: Final = len(PREFIX) + _TOKEN_CHARS

SQL_INSERT: Final = """
INSERT INTO api_keys (ledger, name, role, key_hash, clearing_ledger, clearing_account_id,
                      created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (ledger, name) DO NOTHING RETURNING name
"""
_COLS: Final = "name, role, clearing_ledger, clearing_account_id, created_at, revoked_at"
SQL_BY_HASH: Final = f"SELECT {_COLS} FROM api_keys WHERE ledger = $1 AND key_hash = $2"
SQL_LIST: Final = f"SELECT {_COLS} FROM api_keys WHERE ledger = $1 ORDER BY name"
SQL_BY_NAME: Final = f"SELECT {_COLS} FROM api_keys WHERE ledger = $1 AND name = $2"
SQL_REVOKE: Final = """
UPDATE api_keys SET revoked_at = $3 WHERE ledger = $1 AND name = $2 AND revoked_at IS NULL
RETURNING name
"""
SQL_CLEARING: Final = """
SELECT ledger, kind FROM accounts WHERE id = $1 AND ($2::int IS NULL OR ledger = $2)
ORDER BY ledger LIMIT 2
"""


class ApiKey(msgspec.Struct, frozen=True):
    """A key as stored (never its hash)."""

    name: str
    role: Role
    clearing_ledger: int | None = None
    clearing_account_id: int | None = None
    created_at: int = 0
    revoked_at: int | None = None


class Refusal(enum.StrEnum):
    """Why a key was not created."""

    NAME_TAKEN = "name_taken"
    CLEARING_REQUIRED = "clearing_required"  # a topup key needs its clearing account
    CLEARING_NOT_ALLOWED = "clearing_not_allowed"  # only a topup key has one
    CLEARING_NOT_FOUND = "clearing_not_found"
    CLEARING_AMBIGUOUS = "clearing_ambiguous"  # the id exists in several ledgers: name one
    NOT_A_CLEARING_ACCOUNT = "not_a_clearing_account"


class Created(msgspec.Struct, frozen=True):
    """A new key and its secret (shown once, stored nowhere)."""

    key: ApiKey
    secret: str


class RevokeStatus(enum.StrEnum):
    """Outcome of ``revoke_key``."""

    REVOKED = "revoked"
    ALREADY_REVOKED = "already_revoked"
    NOT_FOUND = "not_found"


def key_hash(token: str) -> bytes:
    """What is stored of a key: its SHA-256."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def looks_like_key(token: str) -> bool:
    """Whether a bearer token has an API key's shape (others are never looked up)."""
    return len(token) == KEY_LENGTH and token.startswith(PREFIX)


def _key(r: asyncpg.Record) -> ApiKey:
    return ApiKey(r["name"], Role(r["role"]), r["clearing_ledger"], r["clearing_account_id"],
                  r["created_at"], r["revoked_at"])


async def _clearing_ledger(conn: Conn, account_id: int, ledger: int | None) -> int | Refusal:
    """The ledger of the clearing account ``account_id`` (``ledger`` narrows the search)."""
    rows = await conn.fetch(SQL_CLEARING, account_id, ledger)
    if not rows:
        return Refusal.CLEARING_NOT_FOUND
    if len(rows) > 1:
        return Refusal.CLEARING_AMBIGUOUS
    if rows[0]["kind"] != "clearing":
        return Refusal.NOT_A_CLEARING_ACCOUNT
    found: int = rows[0]["ledger"]
    return found


async def create_key(
    conn: Conn,
    *,
    role: Role,
    name: str | None = None,
    clearing: int | None = None,
    clearing_ledger: int | None = None,
    now: int | None = None,
) -> Created | Refusal:
    """Create a key with ``role`` (a ``topup`` key with its ``clearing`` account, resolved to
    its ledger). Raises ValueError for a malformed name."""
    name = name or f"{role}-{secrets.token_hex(3)}"
    if not NAME.fullmatch(name):
        raise ValueError("a key name is 1..64 of A-Z a-z 0-9 . _ @ -")
    ledger = None
    if role is Role.TOPUP:
        if clearing is None:
            return Refusal.CLEARING_REQUIRED
        found = await _clearing_ledger(conn, clearing, clearing_ledger)
        if isinstance(found, Refusal):
            return found
        ledger = found
    elif clearing is not None:
        return Refusal.CLEARING_NOT_ALLOWED
    secret = PREFIX + secrets.token_urlsafe(32)
    at = now if now is not None else time.time_ns()
    done = await conn.fetchval(SQL_INSERT, INSTALLATION, name, str(role), key_hash(secret),
                               ledger, clearing if ledger is not None else None, at)
    if done is None:
        return Refusal.NAME_TAKEN
    return Created(ApiKey(name, role, ledger, clearing if ledger is not None else None, at),
                   secret)


async def revoke_key(conn: Conn, name: str, *, now: int | None = None) -> RevokeStatus:
    """Revoke a key for good; every engine process refuses it from its next request."""
    async with conn.transaction():
        done = await conn.fetchval(SQL_REVOKE, INSTALLATION, name,
                                   now if now is not None else time.time_ns())
        if done is not None:
            await conn.execute(SQL_NOTIFY, CREDENTIALS_CHANNEL, f"key:{name}")
            return RevokeStatus.REVOKED
    if await conn.fetchrow(SQL_BY_NAME, INSTALLATION, name) is None:
        return RevokeStatus.NOT_FOUND
    return RevokeStatus.ALREADY_REVOKED


async def list_keys(conn: Conn) -> list[ApiKey]:
    """Every key (revoked ones too), by name."""
    return [_key(r) for r in await conn.fetch(SQL_LIST, INSTALLATION)]


class KeyRing:
    """Looks bearer tokens up as API keys, with a short, bounded cache that every revocation
    clears at once (see the module docstring). ``listen_dsn`` None: no LISTEN (the cache time
    alone bounds how long a revoked key keeps working)."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        *,
        listen_dsn: Callable[[], str | None] | None = None,
        ttl_s: float = limits.CREDENTIAL_CACHE_S,
        max_cached: int = limits.MAX_CACHED_CREDENTIALS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._listen_dsn = listen_dsn
        self._ttl = ttl_s
        self._max = max_cached
        self._clock = clock
        self._cache: dict[bytes, tuple[ApiKey | None, float]] = {}
        self._inflight: dict[bytes, asyncio.Future[ApiKey | None]] = {}
        self._generation = 0  # bumped by every notification: a lookup begun before it is stale
        self._listener: asyncpg.Connection | None = None
        self._listening: asyncio.Task[None] | None = None
        self._listen_tried = -float("inf")
        self._closed = False
        self.lookups = 0  # database lookups made (tests and measurements read it)

    @property
    def listening(self) -> bool:
        """Whether revocations reach this process by notification (else by the cache time)."""
        return self._listener is not None

    def invalidate(self, *_: Any) -> None:
        """Forget every cached key (a notification arrived, or this process revoked one)."""
        self._generation += 1
        self._cache.clear()

    async def lookup(self, token: str) -> ApiKey | None:
        """The live (not revoked) key ``token`` is, or None."""
        h = key_hash(token)
        hit = self._cache.get(h)
        if hit is not None and hit[1] > self._clock():
            return hit[0]
        self._listen()
        fut = self._inflight.get(h)
        if fut is None:  # one database read per key however many requests wait for it
            fut = asyncio.ensure_future(self._fetch(h))
            self._inflight[h] = fut
            fut.add_done_callback(lambda _: self._inflight.pop(h, None))
        return await asyncio.shield(fut)

    async def _fetch(self, h: bytes) -> ApiKey | None:
        generation = self._generation
        self.lookups += 1
        async with self._pool().acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
            r = await conn.fetchrow(SQL_BY_HASH, INSTALLATION, h)
        key = None if r is None or r["revoked_at"] is not None else _key(r)
        if generation == self._generation:  # no revocation was announced meanwhile
            if len(self._cache) >= self._max:
                self._cache.pop(next(iter(self._cache)))
            self._cache[h] = (key, self._clock() + self._ttl)
        return key

    def _listen(self) -> None:
        """Start (or restart, at most once a second) the LISTEN connection in the background."""
        if (self._listen_dsn is None or self._closed or self._listener is not None
                or self._listening is not None):
            return
        if self._clock() - self._listen_tried < 1.0:
            return
        self._listen_tried = self._clock()
        self._listening = asyncio.create_task(self._connect(), name="onecard-credentials-listen")

    async def _connect(self) -> None:
        assert self._listen_dsn is not None
        dsn = self._listen_dsn()
        try:
            if dsn is None:
                return
            conn = await asyncpg.connect(dsn, timeout=limits.DB_CONNECT_TIMEOUT_S)
            await conn.add_listener(CREDENTIALS_CHANNEL, self.invalidate)
            conn.add_termination_listener(self._lost)
            self._listener = conn
            self.invalidate()  # anything revoked before we listened is re-read
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
            log.warning("credentials: cannot LISTEN (%s); revocations take up to %.1fs",
                        type(e).__name__, self._ttl)
        finally:
            self._listening = None

    def _lost(self, *_: Any) -> None:
        self._listener = None
        self.invalidate()

    async def close(self) -> None:
        """Stop listening (for good)."""
        self._closed = True
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening
        conn, self._listener = self._listener, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)

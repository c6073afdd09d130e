"""Bounding password and code guessing (contract §7): per subject and for the whole process.

* **Per subject** (a holder id, an operator's username): ``LOCKOUT_FAILURES`` failed tries
  within ``LOCKOUT_WINDOW_S`` lock it for ``LOCKOUT_S``; while locked even the right password is
  refused. Counted in the database (``login_failures``), so every engine process sees the same
  count; the row is locked while it is updated, so concurrent failures all count.
* **Globally** (:class:`RateLimiter`): a token bucket of ``LOGIN_ATTEMPTS_PER_S`` per process,
  so a spray over many subjects is bounded too, and so is the Argon2 hashing it would cause.

Times are engine nanoseconds passed in by the caller (``now``), so tests move the clock
instead of sleeping.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from typing import Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from engine import limits

Conn = asyncpg.Connection | PoolConnectionProxy
_NS: Final = 1_000_000_000


class Realm(enum.StrEnum):
    """Whose tries are counted."""

    HOLDER = "holder"
    OPERATOR = "operator"


class LoginOutcome(enum.StrEnum):
    """The answer to a password or activation-code try."""

    OK = "ok"
    INVALID = "invalid"  # unknown subject, wrong password or code (never says which)
    LOCKED = "locked"  # too many failures: try again after ``locked_until``
    RATE_LIMITED = "rate_limited"  # too many tries on this engine right now: try again soon
    REJECTED = "rejected"  # the new password is not acceptable (too short, ...)


class RateLimiter:
    """A token bucket: ``allow()`` is True for at most ``burst`` tries at once and ``rate``
    per second on average. ``clock`` (monotonic seconds) is injectable for tests."""

    def __init__(
        self,
        *,
        rate: float = limits.LOGIN_ATTEMPTS_PER_S,
        burst: int = limits.LOGIN_ATTEMPTS_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Take one try from the bucket if there is one."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True


_LIMITER = RateLimiter()


def process_limiter() -> RateLimiter:
    """This process's global bound on login and activation tries."""
    return _LIMITER


SQL_LOCKED_UNTIL: Final = """
SELECT locked_until FROM login_failures WHERE ledger = $1 AND realm = $2 AND subject = $3
"""
SQL_ENSURE: Final = """
INSERT INTO login_failures (ledger, realm, subject, failures, window_start)
VALUES ($1, $2, $3, 0, $4) ON CONFLICT (ledger, realm, subject) DO NOTHING
"""
SQL_LOCK_ROW: Final = """
SELECT failures, window_start, locked_until FROM login_failures
WHERE ledger = $1 AND realm = $2 AND subject = $3 FOR UPDATE
"""
SQL_UPDATE: Final = """
UPDATE login_failures SET failures = $4, window_start = $5, locked_until = $6
WHERE ledger = $1 AND realm = $2 AND subject = $3
"""
SQL_CLEAR: Final = "DELETE FROM login_failures WHERE ledger = $1 AND realm = $2 AND subject = $3"


async def locked_until(conn: Conn, realm: Realm, ledger: int, subject: str, now: int) -> int:
    """When the subject's lock ends (engine ns), or 0 when it is not locked at ``now``."""
    until = await conn.fetchval(SQL_LOCKED_UNTIL, ledger, str(realm), subject)
    return until if until is not None and until > now else 0


async def register_failure(conn: Conn, realm: Realm, ledger: int, subject: str, now: int) -> int:
    """Count a failed try; returns when the lock this failure set (or that holds) ends, or 0."""
    window, lock = limits.LOCKOUT_WINDOW_S * _NS, limits.LOCKOUT_S * _NS
    async with conn.transaction():
        await conn.execute(SQL_ENSURE, ledger, str(realm), subject, now)
        r = await conn.fetchrow(SQL_LOCK_ROW, ledger, str(realm), subject)
        assert r is not None
        failures, start, until = r["failures"], r["window_start"], r["locked_until"]
        if failures == 0 or now - start >= window:
            failures, start = 0, now  # a new window (also once a lock has run out)
        failures += 1
        if failures >= limits.LOCKOUT_FAILURES and until <= now:
            until = now + lock
        await conn.execute(SQL_UPDATE, ledger, str(realm), subject, failures, start, until)
    return until if until > now else 0


async def clear(conn: Conn, realm: Realm, ledger: int, subject: str) -> None:
    """Forget the subject's failures (after a success)."""
    await conn.execute(SQL_CLEAR, ledger, str(realm), subject)

"""Operators (contract §6): the people of the card office, finance and IT, each with one role
and an Argon2id password of at least 10 characters.

``check_operator_password`` is the console's login: it applies the global attempt bound and the
per-username lockout (engine/access/lockout.py) and never says whether a username exists. A
disabled operator cannot log in, and every console session of theirs ends at its next page
(engine/web/console_auth.py re-reads the operator on every page; tests/web/test_console.py).
"""

from __future__ import annotations

import enum
import re
import time
from typing import Final

import asyncpg
import msgspec

from engine import limits
from engine.access import lockout
from engine.access.lockout import LoginOutcome, RateLimiter, Realm
from engine.access.passwords import check_new_password, hash_password, verify_password
from engine.access.roles import OPERATOR_ROLES, Role

INSTALLATION: Final = 0  # operators belong to the installation, not to one campus (ledger)
NAME: Final = re.compile(r"[A-Za-z0-9._@-]{1,64}")  # the operators table's CHECK
# Sent on every change that must end cached trust at once, in every engine process.
CREDENTIALS_CHANNEL: Final = "onecard_credentials"

SQL_INSERT: Final = """
INSERT INTO operators (ledger, username, role, password_hash, created_at)
VALUES ($1, $2, $3, $4, $5) ON CONFLICT (ledger, username) DO NOTHING RETURNING username
"""
SQL_GET: Final = """
SELECT username, role, created_at, disabled_at FROM operators WHERE ledger = $1 AND username = $2
"""
SQL_GET_WITH_HASH: Final = """
SELECT username, role, created_at, disabled_at, password_hash FROM operators
WHERE ledger = $1 AND username = $2
"""
SQL_LIST: Final = """
SELECT username, role, created_at, disabled_at FROM operators WHERE ledger = $1 ORDER BY username
"""
SQL_DISABLE: Final = """
UPDATE operators SET disabled_at = $3
WHERE ledger = $1 AND username = $2 AND disabled_at IS NULL RETURNING username
"""
SQL_NOTIFY: Final = "SELECT pg_notify($1, $2)"


class Operator(msgspec.Struct, frozen=True):
    """An operator as stored (without the password hash)."""

    username: str
    role: Role
    created_at: int
    disabled_at: int | None = None

    @property
    def enabled(self) -> bool:
        """False once disabled."""
        return self.disabled_at is None


class AddStatus(enum.StrEnum):
    """Outcome of ``add_operator``."""

    CREATED = "created"
    EXISTS = "exists"  # the username is taken; nothing changed


class DisableStatus(enum.StrEnum):
    """Outcome of ``disable_operator``."""

    DISABLED = "disabled"
    ALREADY_DISABLED = "already_disabled"
    NOT_FOUND = "not_found"


class OperatorLogin(msgspec.Struct, frozen=True):
    """The answer to a login: the operator when OK; when LOCKED, until when (engine ns)."""

    outcome: LoginOutcome
    operator: Operator | None = None
    locked_until: int = 0


def _operator(r: asyncpg.Record) -> Operator:
    return Operator(r["username"], Role(r["role"]), r["created_at"], r["disabled_at"])


def check_username(username: str) -> None:
    """Raise ValueError unless ``username`` may name an operator."""
    if not NAME.fullmatch(username):
        raise ValueError("a username is 1..64 of A-Z a-z 0-9 . _ @ -")


async def add_operator(
    pool: asyncpg.Pool, *, username: str, role: Role, password: str, now: int | None = None
) -> AddStatus:
    """Create an operator (raises ValueError / PasswordRejected for a bad name, role or
    password). The password is hashed before the database is touched."""
    check_username(username)
    if role not in OPERATOR_ROLES:
        raise ValueError(f"an operator's role is one of {', '.join(sorted(OPERATOR_ROLES))}")
    check_new_password(password, min_chars=limits.MIN_OPERATOR_PASSWORD)
    hashed = await hash_password(password)
    async with pool.acquire() as conn:
        done = await conn.fetchval(SQL_INSERT, INSTALLATION, username, str(role), hashed,
                                   now if now is not None else time.time_ns())
    return AddStatus.CREATED if done is not None else AddStatus.EXISTS


async def get_operator(conn: lockout.Conn, username: str) -> Operator | None:
    """The operator with this username, or None."""
    r = await conn.fetchrow(SQL_GET, INSTALLATION, username)
    return None if r is None else _operator(r)


async def list_operators(conn: lockout.Conn) -> list[Operator]:
    """Every operator, by username."""
    return [_operator(r) for r in await conn.fetch(SQL_LIST, INSTALLATION)]


async def disable_operator(
    conn: lockout.Conn, username: str, *, now: int | None = None
) -> DisableStatus:
    """Disable an operator for good; every engine process drops its sessions at once."""
    async with conn.transaction():
        done = await conn.fetchval(SQL_DISABLE, INSTALLATION, username,
                                   now if now is not None else time.time_ns())
        if done is not None:
            await conn.execute(SQL_NOTIFY, CREDENTIALS_CHANNEL, f"operator:{username}")
            return DisableStatus.DISABLED
    if await get_operator(conn, username) is None:
        return DisableStatus.NOT_FOUND
    return DisableStatus.ALREADY_DISABLED


async def check_operator_password(
    pool: asyncpg.Pool,
    username: str,
    password: str,
    *,
    now: int | None = None,
    limiter: RateLimiter | None = None,
) -> OperatorLogin:
    """The console login: OK with the operator, or INVALID (unknown, disabled or wrong, never
    saying which), LOCKED (5 failures within 15 minutes: 15 minutes, even for the right
    password) or RATE_LIMITED (too many tries on this engine)."""
    now = now if now is not None else time.time_ns()
    if not (limiter or lockout.process_limiter()).allow():
        return OperatorLogin(LoginOutcome.RATE_LIMITED)
    known = NAME.fullmatch(username) is not None
    async with pool.acquire() as conn:
        r = await conn.fetchrow(SQL_GET_WITH_HASH, INSTALLATION, username) if known else None
        until = await lockout.locked_until(conn, Realm.OPERATOR, INSTALLATION, username,
                                           now) if r is not None else 0
    if until:
        return OperatorLogin(LoginOutcome.LOCKED, locked_until=until)
    # no connection is held while hashing (~50 ms in a worker thread)
    ok = await verify_password(r["password_hash"] if r is not None else None, password)
    if r is None:
        return OperatorLogin(LoginOutcome.INVALID)
    op = _operator(r)
    async with pool.acquire() as conn:
        if not ok or not op.enabled:
            until = await lockout.register_failure(conn, Realm.OPERATOR, INSTALLATION,
                                                   username, now)
            if until:
                return OperatorLogin(LoginOutcome.LOCKED, locked_until=until)
            return OperatorLogin(LoginOutcome.INVALID)
        await lockout.clear(conn, Realm.OPERATOR, INSTALLATION, username)
    return OperatorLogin(LoginOutcome.OK, operator=op)

"""Holders' own access (contract §6/§7): one-time activation codes and passwords.

The card office issues an 8-digit code (``issue_activation``), valid 72 hours; a new code voids
the old one. The holder turns it into a password of at least 8 characters (``activate``), which
uses the code up. Codes and passwords are stored as Argon2id hashes only (an 8-digit code under
a fast hash would be read back from a dump in seconds). Every try, activation or login, passes
the global attempt bound and the holder's lockout (engine/access/lockout.py), and unknown
holder ids cost the same hashing as known ones.

Holder ids are looked up without a ledger (a student types only their number); an id present
in several ledgers cannot log in or be activated (the card office sees why).
"""

from __future__ import annotations

import secrets
import time
from typing import Final

import asyncpg
import msgspec

from engine import limits
from engine.access import lockout
from engine.access.lockout import Conn, LoginOutcome, RateLimiter, Realm
from engine.access.passwords import (
    PasswordRejected,
    check_new_password,
    hash_password,
    verify_password,
)
from engine.access.refused import Refused

_NS: Final = 1_000_000_000

SQL_HOLDER_LEDGERS: Final = "SELECT ledger FROM holders WHERE id = $1 ORDER BY ledger LIMIT 2"
SQL_SET_CODE: Final = """
INSERT INTO holder_credentials (ledger, holder_id, code_hash, code_expires_at, updated_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (ledger, holder_id) DO UPDATE
SET code_hash = excluded.code_hash, code_expires_at = excluded.code_expires_at,
    updated_at = excluded.updated_at
"""
SQL_CREDENTIALS: Final = """
SELECT password_hash, code_hash, code_expires_at FROM holder_credentials
WHERE ledger = $1 AND holder_id = $2
"""
# Uses the code up only if it is still the code that was checked: of two activations racing
# with the same code, one wins.
SQL_ACTIVATE: Final = """
UPDATE holder_credentials
SET password_hash = $4, code_hash = NULL, code_expires_at = NULL, updated_at = $5
WHERE ledger = $1 AND holder_id = $2 AND code_hash = $3 RETURNING holder_id
"""


class Activation(msgspec.Struct, frozen=True):
    """A new activation code, to be handed to the holder (shown once, stored hashed)."""

    holder_id: str
    ledger: int
    code: str
    expires_at: int  # wall clock, ns


class HolderLogin(msgspec.Struct, frozen=True):
    """The answer to an activation or a login: the holder when OK; when LOCKED, until when."""

    outcome: LoginOutcome
    holder_id: str | None = None
    ledger: int | None = None
    locked_until: int = 0


async def holder_ledgers(conn: Conn, holder_id: str) -> list[int]:
    """The ledgers (at most two) holding a holder with this id."""
    return [r["ledger"] for r in await conn.fetch(SQL_HOLDER_LEDGERS, holder_id)]


async def resolve_holder(conn: Conn, holder_id: str) -> int | Refused:
    """The ledger of the holder ``holder_id``, or why there is not exactly one."""
    ledgers = await holder_ledgers(conn, holder_id)
    if not ledgers:
        return Refused("holder_not_found", f"no holder {holder_id!r}", not_found=True)
    if len(ledgers) > 1:
        return Refused("ambiguous_holder", f"holder {holder_id!r} exists in several ledgers")
    return ledgers[0]


def new_code() -> str:
    """A random activation code of ``ACTIVATION_CODE_DIGITS`` digits."""
    digits = limits.ACTIVATION_CODE_DIGITS
    return f"{secrets.randbelow(10**digits):0{digits}d}"


async def issue_activation(
    pool: asyncpg.Pool, holder_id: str, *, now: int | None = None
) -> Activation | Refused:
    """A new code for the holder, valid ``ACTIVATION_CODE_TTL_S``; the previous one is void."""
    now = now if now is not None else time.time_ns()
    async with pool.acquire() as conn:
        ledger = await resolve_holder(conn, holder_id)
    if isinstance(ledger, Refused):
        return ledger
    code = new_code()
    hashed = await hash_password(code)  # no connection held while hashing
    expires = now + limits.ACTIVATION_CODE_TTL_S * _NS
    async with pool.acquire() as conn:
        await conn.execute(SQL_SET_CODE, ledger, holder_id, hashed, expires, now)
    return Activation(holder_id, ledger, code, expires)


async def _fail(pool: asyncpg.Pool, ledger: int, holder_id: str, now: int) -> HolderLogin:
    async with pool.acquire() as conn:
        until = await lockout.register_failure(conn, Realm.HOLDER, ledger, holder_id, now)
    if until:
        return HolderLogin(LoginOutcome.LOCKED, holder_id, ledger, until)
    return HolderLogin(LoginOutcome.INVALID)


async def _begin(
    pool: asyncpg.Pool, holder_id: str, now: int, limiter: RateLimiter | None
) -> tuple[int, asyncpg.Record | None] | HolderLogin:
    """The checks every try starts with: the global bound, the holder, its lock. Returns the
    holder's ledger and credentials row, or the answer already decided (after hashing a dummy
    when the holder is unknown, so that answer takes as long as a wrong password)."""
    if not (limiter or lockout.process_limiter()).allow():
        return HolderLogin(LoginOutcome.RATE_LIMITED)
    async with pool.acquire() as conn:
        ledger = await resolve_holder(conn, holder_id)
        if isinstance(ledger, Refused):
            row = None
        else:
            until = await lockout.locked_until(conn, Realm.HOLDER, ledger, holder_id, now)
            if until:
                return HolderLogin(LoginOutcome.LOCKED, holder_id, ledger, until)
            row = await conn.fetchrow(SQL_CREDENTIALS, ledger, holder_id)
    if isinstance(ledger, Refused):
        await verify_password(None, holder_id)
        return HolderLogin(LoginOutcome.INVALID)
    return ledger, row


async def activate(
    pool: asyncpg.Pool,
    holder_id: str,
    code: str,
    password: str,
    *,
    now: int | None = None,
    limiter: RateLimiter | None = None,
) -> HolderLogin:
    """Set the holder's password with an activation code (``/self/activate``). REJECTED: the
    password is too short (nothing was tried); INVALID: unknown holder, wrong, expired or used
    code; LOCKED; RATE_LIMITED. OK uses the code up."""
    try:
        check_new_password(password, min_chars=limits.MIN_HOLDER_PASSWORD)
    except PasswordRejected:
        return HolderLogin(LoginOutcome.REJECTED)
    now = now if now is not None else time.time_ns()
    begun = await _begin(pool, holder_id, now, limiter)
    if isinstance(begun, HolderLogin):
        return begun
    ledger, row = begun
    live = row is not None and row["code_hash"] is not None and row["code_expires_at"] > now
    stored = row["code_hash"] if live and row is not None else None
    if not await verify_password(stored, code):
        return await _fail(pool, ledger, holder_id, now)
    hashed = await hash_password(password)
    async with pool.acquire() as conn:
        done = await conn.fetchval(SQL_ACTIVATE, ledger, holder_id, stored, hashed, now)
        if done is None:  # another activation used the code meanwhile
            return HolderLogin(LoginOutcome.INVALID)
        await lockout.clear(conn, Realm.HOLDER, ledger, holder_id)
    return HolderLogin(LoginOutcome.OK, holder_id, ledger)


async def check_holder_password(
    pool: asyncpg.Pool,
    holder_id: str,
    password: str,
    *,
    now: int | None = None,
    limiter: RateLimiter | None = None,
) -> HolderLogin:
    """The self-service login (``/self/login``): OK with the holder, or INVALID (unknown id,
    no password yet, wrong password: never saying which), LOCKED (5 failures within 15
    minutes: 15 minutes, even for the right password) or RATE_LIMITED."""
    now = now if now is not None else time.time_ns()
    begun = await _begin(pool, holder_id, now, limiter)
    if isinstance(begun, HolderLogin):
        return begun
    ledger, row = begun
    if not await verify_password(row["password_hash"] if row is not None else None, password):
        return await _fail(pool, ledger, holder_id, now)
    async with pool.acquire() as conn:
        await lockout.clear(conn, Realm.HOLDER, ledger, holder_id)
    return HolderLogin(LoginOutcome.OK, holder_id, ledger)

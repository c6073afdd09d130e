"""Operators (contract §6): adding, listing and disabling them, their logins with the lockout
of §7/§8 (clock moved, never slept), and sessions that end at once when the operator is
disabled or after 30 idle minutes."""

from __future__ import annotations

import secrets

import asyncpg
import pytest

from engine.access import sessions
from engine.access.lockout import LoginOutcome, RateLimiter
from engine.access.operators import (
    AddStatus,
    DisableStatus,
    add_operator,
    check_operator_password,
    disable_operator,
    get_operator,
    list_operators,
)
from engine.access.passwords import PasswordRejected
from engine.access.roles import Role
from engine.service import Engine

PASSWORD = "correct horse battery"
MIN = 60 * 1_000_000_000
T0 = 1_900_000_000 * 1_000_000_000


def unlimited() -> RateLimiter:
    return RateLimiter(rate=1000.0, burst=1000)


def username() -> str:
    return "op-" + secrets.token_hex(4)


async def test_add_list_disable(engine: Engine) -> None:
    pool = engine.store.pool
    name = username()
    assert await add_operator(pool, username=name, role=Role.FINANCE,
                              password=PASSWORD) is AddStatus.CREATED
    assert await add_operator(pool, username=name, role=Role.ADMIN,
                              password=PASSWORD) is AddStatus.EXISTS
    with pytest.raises(PasswordRejected):
        await add_operator(pool, username=username(), role=Role.ADMIN, password="9chars!!!")
    with pytest.raises(ValueError, match="role"):
        await add_operator(pool, username=username(), role=Role.TOPUP, password=PASSWORD)
    with pytest.raises(ValueError, match="username"):
        await add_operator(pool, username="no spaces", role=Role.ADMIN, password=PASSWORD)
    async with pool.acquire() as conn:
        found = {o.username: o for o in await list_operators(conn)}
        assert found[name].role is Role.FINANCE and found[name].enabled
        stored = await conn.fetchval("SELECT password_hash FROM operators WHERE username = $1",
                                     name)
        assert stored.startswith("$argon2id$") and PASSWORD not in stored
        assert await disable_operator(conn, name) is DisableStatus.DISABLED
        assert await disable_operator(conn, name) is DisableStatus.ALREADY_DISABLED
        assert await disable_operator(conn, "nobody-" + name) is DisableStatus.NOT_FOUND
        op = await get_operator(conn, name)
        assert op is not None and not op.enabled


async def test_login_lockout_and_its_expiry(engine: Engine) -> None:
    pool = engine.store.pool
    name = username()
    await add_operator(pool, username=name, role=Role.CARD_OFFICE, password=PASSWORD)
    limiter = unlimited()

    async def login(password: str, at: int) -> LoginOutcome:
        r = await check_operator_password(pool, name, password, now=at, limiter=limiter)
        return r.outcome

    assert await login(PASSWORD, T0) is LoginOutcome.OK
    for i in range(4):
        assert await login("wrong password", T0 + i * MIN) is LoginOutcome.INVALID
    assert await login("wrong password", T0 + 4 * MIN) is LoginOutcome.LOCKED  # the fifth
    # locked for 15 minutes from the fifth failure: the right password does not get in
    assert await login(PASSWORD, T0 + 5 * MIN) is LoginOutcome.LOCKED
    assert await login(PASSWORD, T0 + 18 * MIN) is LoginOutcome.LOCKED
    assert await login(PASSWORD, T0 + 19 * MIN + 1) is LoginOutcome.OK
    # failures spread over more than the window never lock
    for i in range(8):
        assert await login("wrong again", T0 + (30 + 4 * i) * MIN) is LoginOutcome.INVALID
    assert await login(PASSWORD, T0 + 70 * MIN) is LoginOutcome.OK


async def test_unknown_and_disabled_look_alike(engine: Engine) -> None:
    pool = engine.store.pool
    name = username()
    await add_operator(pool, username=name, role=Role.AUDITOR, password=PASSWORD)
    async with pool.acquire() as conn:
        await disable_operator(conn, name)
    for who in (name, "ghost-" + name, "not a name!"):
        r = await check_operator_password(pool, who, PASSWORD, limiter=unlimited())
        assert r.outcome is LoginOutcome.INVALID and r.operator is None


async def test_the_global_attempt_bound(engine: Engine) -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    outcomes = [(await check_operator_password(engine.store.pool, "ghost", "x" * 10,
                                               limiter=limiter)).outcome for _ in range(5)]
    assert outcomes == [LoginOutcome.INVALID] * 3 + [LoginOutcome.RATE_LIMITED] * 2
    now[0] += 0.5  # one try's worth of refill
    assert limiter.allow() and not limiter.allow()


async def test_a_disabled_operators_session_ends_at_its_next_request(
    engine: Engine, dsn: str
) -> None:
    pool = engine.store.pool
    name = username()
    await add_operator(pool, username=name, role=Role.CARD_OFFICE, password=PASSWORD)
    login = await check_operator_password(pool, name, PASSWORD, limiter=unlimited())
    assert login.outcome is LoginOutcome.OK and login.operator is not None
    async with pool.acquire() as conn:
        token = await sessions.open_session(conn, sessions.SessionKind.OPERATOR, name)
        s = await sessions.resolve(conn, token)
        assert s is not None and s.role is Role.CARD_OFFICE and s.subject == name
        other = await asyncpg.connect(dsn)  # another engine process disables them
        try:
            assert await disable_operator(other, name) is DisableStatus.DISABLED
        finally:
            await other.close()
        assert await sessions.resolve(conn, token) is None
        assert await sessions.resolve(conn, token) is None  # and it stays gone


async def test_sessions_end_after_30_idle_minutes(engine: Engine) -> None:
    async with engine.store.pool.acquire() as conn:
        token = await sessions.open_session(conn, sessions.SessionKind.HOLDER, "S1", ledger=7,
                                            now=T0)
        s = await sessions.resolve(conn, token, now=T0 + 29 * MIN)
        assert s == sessions.Session(sessions.SessionKind.HOLDER, 7, "S1")
        # each use restarts the idle time
        assert await sessions.resolve(conn, token, now=T0 + 58 * MIN) is not None
        assert await sessions.resolve(conn, token, now=T0 + 88 * MIN + 1) is None
        assert await sessions.resolve(conn, "forged-token") is None
        other = await sessions.open_session(conn, sessions.SessionKind.HOLDER, "S2", ledger=7)
        await sessions.close_session(conn, other)
        assert await sessions.resolve(conn, other) is None

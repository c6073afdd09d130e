"""Operators (contract §6): adding, listing and disabling them, and their logins with the
lockout of §7/§8 (clock moved, never slept). Console sessions ending when the operator is
disabled: tests/web/test_console.py."""

from __future__ import annotations

import secrets

import pytest

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



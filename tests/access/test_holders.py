"""Holders' activation codes and passwords (contract §6/§7): 8 digits, 72 hours, single use,
stored hashed, a new code voids the old; passwords of at least 8 characters; 5 failed tries
per holder id per 15 minutes lock it for 15 minutes (the clock is moved, never slept)."""

from __future__ import annotations

import asyncio
import secrets

from engine.access.holders import activate, check_holder_password, issue_activation
from engine.access.lockout import LoginOutcome, RateLimiter
from engine.access.refused import Refused
from engine.campus import Campus, HolderKind, HolderResult
from engine.service import Engine
from tests.conftest import Ids

MIN = 60 * 1_000_000_000
HOUR = 60 * MIN
T0 = 1_900_000_000 * 1_000_000_000
PASSWORD = "my own pw 1"


def unlimited() -> RateLimiter:
    return RateLimiter(rate=1000.0, burst=1000)


async def new_holder(engine: Engine, ids: Ids) -> tuple[str, int]:
    ledger, hid = ids.ledger(), "S" + secrets.token_hex(5)
    r = await Campus(engine).create_holder(holder_id=hid, ledger=ledger, name="Han Meimei",
                                           kind=HolderKind.STUDENT)
    assert isinstance(r, HolderResult)
    return hid, ledger


async def test_activation_code_is_single_use_and_hashed(engine: Engine, ids: Ids) -> None:
    pool = engine.store.pool
    hid, ledger = await new_holder(engine, ids)
    a = await issue_activation(pool, hid, now=T0)
    assert not isinstance(a, Refused)
    assert len(a.code) == 8 and a.code.isdigit() and a.ledger == ledger
    assert a.expires_at == T0 + 72 * HOUR
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM holder_credentials WHERE holder_id = $1", hid)
    assert row is not None and row["code_hash"].startswith("$argon2id$")
    assert a.code not in str(dict(row))
    lim = unlimited()
    assert (await activate(pool, hid, a.code, "short", now=T0, limiter=lim)).outcome \
        is LoginOutcome.REJECTED
    ok = await activate(pool, hid, a.code, PASSWORD, now=T0 + HOUR, limiter=lim)
    assert (ok.outcome, ok.holder_id, ok.ledger) == (LoginOutcome.OK, hid, ledger)
    # used up: the same code again is just a wrong code
    again = await activate(pool, hid, a.code, "another pw 2", now=T0 + HOUR, limiter=lim)
    assert again.outcome is LoginOutcome.INVALID
    assert (await check_holder_password(pool, hid, PASSWORD, now=T0 + HOUR,
                                        limiter=lim)).outcome is LoginOutcome.OK
    assert (await check_holder_password(pool, hid, "another pw 2", now=T0 + HOUR,
                                        limiter=lim)).outcome is LoginOutcome.INVALID


async def test_a_new_code_voids_the_old_and_codes_expire(engine: Engine, ids: Ids) -> None:
    pool = engine.store.pool
    hid, _ = await new_holder(engine, ids)
    lim = unlimited()
    first = await issue_activation(pool, hid, now=T0)
    second = await issue_activation(pool, hid, now=T0 + MIN)
    assert not isinstance(first, Refused) and not isinstance(second, Refused)
    if first.code != second.code:  # (1 in 10^8 they are the same)
        assert (await activate(pool, hid, first.code, PASSWORD, now=T0 + 2 * MIN,
                               limiter=lim)).outcome is LoginOutcome.INVALID
    late = T0 + MIN + 72 * HOUR
    assert (await activate(pool, hid, second.code, PASSWORD, now=late,
                           limiter=lim)).outcome is LoginOutcome.INVALID
    third = await issue_activation(pool, hid, now=late)
    assert not isinstance(third, Refused)
    assert (await activate(pool, hid, third.code, PASSWORD, now=late + 71 * HOUR,
                           limiter=lim)).outcome is LoginOutcome.OK


async def test_holder_lockout_and_its_expiry(engine: Engine, ids: Ids) -> None:
    pool = engine.store.pool
    hid, ledger = await new_holder(engine, ids)
    a = await issue_activation(pool, hid, now=T0)
    assert not isinstance(a, Refused)
    lim = unlimited()
    assert (await activate(pool, hid, a.code, PASSWORD, now=T0, limiter=lim)).outcome \
        is LoginOutcome.OK

    async def login(password: str, at: int) -> LoginOutcome:
        return (await check_holder_password(pool, hid, password, now=at,
                                            limiter=lim)).outcome

    for i in range(4):
        assert await login("wrong pass", T0 + i * MIN) is LoginOutcome.INVALID
    fifth = await check_holder_password(pool, hid, "wrong pass", now=T0 + 10 * MIN,
                                        limiter=lim)
    assert fifth.outcome is LoginOutcome.LOCKED
    assert fifth.locked_until == T0 + 25 * MIN
    assert await login(PASSWORD, T0 + 11 * MIN) is LoginOutcome.LOCKED  # even the right one
    assert await login(PASSWORD, T0 + 25 * MIN - 1) is LoginOutcome.LOCKED
    assert await login(PASSWORD, T0 + 25 * MIN) is LoginOutcome.OK
    # a success clears the count: four more failures do not lock
    for i in range(4):
        assert await login("wrong pass", T0 + (26 + i) * MIN) is LoginOutcome.INVALID
    assert await login(PASSWORD, T0 + 31 * MIN) is LoginOutcome.OK
    # activation tries count against the same holder id
    for i in range(5):
        r = await activate(pool, hid, "00000000", "whatever 12", now=T0 + (40 + i) * MIN,
                           limiter=lim)
    assert r.outcome is LoginOutcome.LOCKED
    assert await login(PASSWORD, T0 + 45 * MIN) is LoginOutcome.LOCKED
    async with pool.acquire() as conn:
        n = await conn.fetchval("SELECT failures FROM login_failures WHERE ledger = $1 AND "
                                "subject = $2", ledger, hid)
    assert n == 5


async def test_unknown_holders_and_the_global_bound(engine: Engine) -> None:
    pool = engine.store.pool
    for hid in ("nobody-" + secrets.token_hex(4), "\u4e2d\u6587"):
        r = await check_holder_password(pool, hid, PASSWORD, limiter=unlimited())
        assert r.outcome is LoginOutcome.INVALID and r.holder_id is None
    assert isinstance(await issue_activation(pool, "nobody-x"), Refused)
    now = [0.0]
    lim = RateLimiter(rate=1.0, burst=2, clock=lambda: now[0])
    got = [(await activate(pool, "nobody", "12345678", PASSWORD, limiter=lim)).outcome
           for _ in range(3)]
    assert got == [LoginOutcome.INVALID, LoginOutcome.INVALID, LoginOutcome.RATE_LIMITED]
    now[0] += 1.0
    assert (await check_holder_password(pool, "nobody", PASSWORD, limiter=lim)).outcome \
        is LoginOutcome.INVALID


async def test_racing_activations_use_the_code_once(engine: Engine, ids: Ids) -> None:
    pool = engine.store.pool
    hid, _ = await new_holder(engine, ids)
    a = await issue_activation(pool, hid)
    assert not isinstance(a, Refused)
    lim = unlimited()
    results = await asyncio.gather(*(activate(pool, hid, a.code, f"password {i}", limiter=lim)
                                     for i in range(3)))
    assert sorted(r.outcome for r in results).count(LoginOutcome.OK) == 1


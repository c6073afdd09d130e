"""The holders' password store behind /self (httpx): activation codes (one use, 72 hours, a
new one voids the old), the login lockout of contract §7 (five failures within 15 minutes
lock the id for 15 minutes, the right password too), and report lost counting a wrong
password like a failed login."""

from __future__ import annotations

import httpx

from engine import limits
from tests.selfservice.conftest import Page, SelfWeb, World, log_in


async def activate(client: httpx.AsyncClient, holder_id: str, code: str, password: str,
                   password2: str | None = None) -> httpx.Response:
    form = Page((await client.get("/self/activate")).text)
    return await client.post("/self/activate", data={
        "holder_id": holder_id, "code": code, "password": password,
        "password2": password if password2 is None else password2, "csrf": form.csrf[0]})


async def login(client: httpx.AsyncClient, holder_id: str, password: str) -> httpx.Response:
    form = Page((await client.get("/self/login")).text)
    return await client.post("/self/login", data={
        "holder_id": holder_id, "password": password, "csrf": form.csrf[0]})


def error(r: httpx.Response) -> str:
    return str(Page(r.text).ids["error"]["data-error"])


async def test_an_activation_code_is_used_once(world: World, client: httpx.AsyncClient) -> None:
    s = await world.student(activated=False)
    code = await world.activation_code(s)
    assert error(await activate(client, s.holder_id, code, "short")) == "short"
    assert error(await activate(client, s.holder_id, code, s.password, "other one")) == (
        "mismatch")
    assert error(await activate(client, s.holder_id, "00000000", s.password)) == "wrong"
    r = await activate(client, s.holder_id, code, s.password)
    assert r.status_code == 303 and r.headers["location"] == "/self/login"
    assert error(await activate(client, s.holder_id, code, "another password")) == "wrong"
    await log_in(client, s)


async def test_a_new_code_voids_the_old(world: World, client: httpx.AsyncClient) -> None:
    s = await world.student(activated=False)
    old = await world.activation_code(s)
    new = await world.activation_code(s)
    assert error(await activate(client, s.holder_id, old, s.password)) == "wrong"
    assert (await activate(client, s.holder_id, new, s.password)).status_code == 303


async def test_an_activation_code_expires_after_72_hours(
    world: World, client: httpx.AsyncClient, selfweb: SelfWeb
) -> None:
    s = await world.student(activated=False)
    code = await world.activation_code(s)
    # The card office issues codes by the wall clock; the pages' clock jumps 72 hours ahead and
    # then back, so that codes issued by later tests are not already old to the pages.
    later = limits.ACTIVATION_CODE_TTL_S + 1
    selfweb.clock.advance(later)
    try:
        assert error(await activate(client, s.holder_id, code, s.password)) == "wrong"
    finally:
        selfweb.clock.offset -= later
    fresh = await world.activation_code(s)  # the card office gives a new one
    assert (await activate(client, s.holder_id, fresh, s.password)).status_code == 303



async def test_five_failures_lock_the_id_for_15_minutes(
    world: World, client: httpx.AsyncClient, selfweb: SelfWeb
) -> None:
    s = await world.student()
    for _ in range(limits.LOCKOUT_FAILURES - 1):
        assert error(await login(client, s.holder_id, "wrong password")) == "wrong"
    r = await login(client, s.holder_id, "wrong password")
    assert error(r) == "locked" and "15" in Page(r.text).text("error")
    assert error(await login(client, s.holder_id, s.password)) == "locked"  # even the right one
    selfweb.clock.advance(limits.LOCKOUT_S - 60)
    assert error(await login(client, s.holder_id, s.password)) == "locked"
    selfweb.clock.advance(61)
    r = await login(client, s.holder_id, s.password)
    assert r.status_code == 303 and r.headers["location"] == "/self"


async def test_failures_spread_over_more_than_15_minutes_do_not_lock(
    world: World, client: httpx.AsyncClient, selfweb: SelfWeb
) -> None:
    s = await world.student()
    for _ in range(limits.LOCKOUT_FAILURES - 1):
        assert error(await login(client, s.holder_id, "wrong password")) == "wrong"
    selfweb.clock.advance(limits.LOCKOUT_WINDOW_S)
    assert error(await login(client, s.holder_id, "wrong password")) == "wrong"
    assert (await login(client, s.holder_id, s.password)).status_code == 303


async def test_a_wrong_password_at_report_lost_counts_towards_the_lockout(
    world: World, client: httpx.AsyncClient
) -> None:
    s = await world.student(cash=1_000)
    await log_in(client, s)
    home = Page((await client.get("/self")).text)
    for _ in range(limits.LOCKOUT_FAILURES):
        r = await client.post("/self/report-lost", data={"password": "guess",
                                                         "csrf": home.csrf[0]})
        assert Page(r.text).ids["result"]["data-status"] in ("wrong_password", "locked")
    r = await client.post("/self/report-lost", data={"password": s.password,
                                                     "csrf": home.csrf[0]})
    assert Page(r.text).ids["result"]["data-status"] == "locked"
    assert await world.purchase(s, 10) == "00"  # nothing was reported
    async with httpx.AsyncClient(base_url=client.base_url) as other:
        assert error(await login(other, s.holder_id, s.password)) == "locked"

"""A session reaches only its own holder, forms need their token, sessions end, and no form
body makes a 500 or moves money it should not (httpx, no browser)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.selfservice.conftest import ADMIN, Page, SelfWeb, Student, World, log_in

READ = {"Authorization": "Bearer read-token"}


def hidden(html: str, name: str) -> str:
    m = re.search(rf'<input type="hidden" name="{name}" value="([^"]*)"', html)
    assert m, name
    return m.group(1)


async def state_of(world: World, s: Student) -> dict[str, Any]:
    """What a refused form must not change: the card, the purses, the room, the limit."""
    card = (await world.http.get(f"/v1/cards/{s.card_no}/balance", headers=READ)).json()
    room = await world.available(s.room_account) if s.room_account else None
    return {"card": card, "room": room}


# -- CSRF -------------------------------------------------------------------------------------

FORMS = [
    ("/self/report-lost", {"password": "correct horse 1"}),
    ("/self/found", {"password": "correct horse 1"}),
    ("/self/pin", {"old_pin": "1234", "new_pin": "9876"}),
    ("/self/limit", {"daily_limit_yuan": "1.00"}),
    ("/self/electricity", {"amount_yuan": "5"}),
]


@pytest.mark.parametrize(("action", "fields"), FORMS, ids=[a for a, _ in FORMS])
@pytest.mark.parametrize("token", ["missing", "wrong", "another session's"])
async def test_a_form_without_its_token_is_403_and_changes_nothing(
    world: World, client: httpx.AsyncClient, selfweb: SelfWeb, action: str,
    fields: dict[str, str], token: str,
) -> None:
    s = await world.student(cash=5_000, room=True, room_fen=100, pin="1234", pin_threshold=0)
    other = await world.student()
    if action == "/self/found":  # a lost card, so that found would change it
        await world.http.post(f"/v1/cards/{s.card_no}/report-lost", headers=ADMIN)
    before = await state_of(world, s)
    async with httpx.AsyncClient(base_url=selfweb.base_url) as other_client:
        await log_in(other_client, other)
        foreign = Page((await other_client.get("/self")).text).csrf[0]
    await log_in(client, s)
    page = (await client.get("/self/electricity")).text
    data = {**fields, "room_id": str(s.room_id), "key": hidden(page, "key")}
    if token == "wrong":
        data["csrf"] = Page(page).csrf[0][:-2] + "xx"
    elif token == "another session's":
        data["csrf"] = foreign
    r = await client.post(action, data=data)
    assert r.status_code == 403, r.text
    assert Page(r.text).ids["error-page"]["data-reason"] == "csrf"
    assert await state_of(world, s) == before
    assert await world.purchase(s, 10, pin="1234") == ("41" if action == "/self/found" else "00")
    settings_page = Page((await client.get("/self/settings")).text)
    assert "data-fen" not in settings_page.ids["own-limit"]  # no limit was set


# -- another holder's ids ----------------------------------------------------------------------


async def test_another_holders_ids_are_404_everywhere(
    world: World, client: httpx.AsyncClient
) -> None:
    me = await world.student(cash=5_000, room=True, room_fen=100, pin="1234")
    them = await world.student(cash=5_000, room=True, room_fen=100, pin="4321")
    theirs = await world.post(them.purse, world.canteen, 10, 1)
    mine = await world.post(me.purse, world.canteen, 10, 1)
    await log_in(client, me)
    before = await state_of(world, them)
    gets = [
        f"/self/transfers/{theirs}",
        "/self/transfers/not-a-uuid",
        f"/self/statement?account_id={them.purse}",
        f"/self/statement?account_id={them.subsidy}",
        f"/self/statement?account_id={world.canteen}",
        f"/self/electricity?room_id={them.room_id}",
        f"/self/room-statement?room_id={them.room_id}",
        "/self/room-statement?room_id=nowhere",
    ]
    for url in gets:
        r = await client.get(url)
        assert r.status_code == 404, url
        assert Page(r.text).ids["error-page"]["data-reason"] == "not_found", url
    # my own are fine
    for url in (f"/self/transfers/{mine}", f"/self/statement?account_id={me.purse}",
                f"/self/electricity?room_id={me.room_id}",
                f"/self/room-statement?room_id={me.room_id}"):
        assert (await client.get(url)).status_code == 200, url
    page = (await client.get("/self/electricity")).text
    token = Page(page).csrf[0]
    posts = [
        ("/self/electricity", {"room_id": str(them.room_id), "amount_yuan": "1",
                               "key": hidden(page, "key")}),
        ("/self/report-lost", {"password": me.password, "card_no": them.card_no}),
        ("/self/found", {"password": me.password, "card_no": them.card_no}),
        ("/self/pin", {"old_pin": "4321", "new_pin": "1111", "card_no": them.card_no}),
        ("/self/report-lost", {"password": me.password, "card_no": "0000000000000000"}),
    ]
    for action, fields in posts:
        r = await client.post(action, data={**fields, "csrf": token})
        assert r.status_code == 404, (action, r.text)
    assert await state_of(world, them) == before
    assert await world.purchase(them, 10, pin="4321") == "00"  # their PIN and card unchanged
    assert await world.available(me.purse) == 4_990  # and nothing of mine moved


# -- sessions -----------------------------------------------------------------------------------


async def test_a_session_idle_for_30_minutes_is_over(
    world: World, client: httpx.AsyncClient, selfweb: SelfWeb
) -> None:
    s = await world.student(cash=1_000)
    await log_in(client, s)
    home = await client.get("/self")
    assert home.status_code == 200
    token = Page(home.text).csrf[0]
    selfweb.clock.advance(29 * 60)
    assert (await client.get("/self")).status_code == 200  # used: the idle time starts again
    selfweb.clock.advance(29 * 60)
    assert (await client.get("/self/statement")).status_code == 200
    selfweb.clock.advance(30 * 60 + 1)
    r = await client.get("/self")
    assert r.status_code == 303 and r.headers["location"] == "/self/login"
    r = await client.post("/self/report-lost", data={"password": s.password, "csrf": token})
    assert r.status_code == 403
    assert await world.purchase(s, 10) == "00"


# -- any form body ------------------------------------------------------------------------------

_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "1" * 300, "\uff11\uff12", "1e3", "-1", "0", "0.001",
                     "1,5", "NaN", "Infinity", "1_000", "٣", "' OR 1=1 --", "\udcff"]),
)


@pytest.fixture(scope="module")
def victim(selfweb: SelfWeb) -> Iterator[tuple[Student, httpx.Client]]:
    """A holder with money, a PIN and a room, logged in once (a login hashes a password)."""

    async def make() -> Student:
        async with httpx.AsyncClient(base_url=selfweb.base_url, timeout=30) as http:
            w = await World(selfweb, http).setup()
            return await w.student(cash=50_000, subsidy=1_000, room=True, room_fen=700,
                                   pin="2468", pin_threshold=0)

    s = asyncio.run(make())
    with httpx.Client(base_url=selfweb.base_url, timeout=30) as c:
        form = c.get("/self/login")
        r = c.post("/self/login", data={"holder_id": s.holder_id, "password": s.password,
                                        "csrf": Page(form.text).csrf[0]})
        assert r.status_code == 303
        yield s, c


def _balances(c: httpx.Client, s: Student) -> tuple[Any, ...]:
    card = c.get(f"/v1/cards/{s.card_no}/balance", headers=READ).json()
    room = c.get(f"/v1/accounts/{s.room_account}/balance", headers=READ).json()
    return card["status"], card["total_available"], room["available"]


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    action=st.sampled_from(["/self/report-lost", "/self/found", "/self/pin", "/self/limit",
                            "/self/electricity"]),
    fields=st.dictionaries(
        st.sampled_from(["password", "old_pin", "new_pin", "daily_limit_yuan", "amount_yuan",
                         "room_id", "key", "card_no", "x"]),
        st.one_of(_TEXT, st.lists(_TEXT, max_size=3)), max_size=6),
    own_room=st.booleans(),
)
def test_any_form_body_is_answered_and_moves_no_money(
    victim: tuple[Student, httpx.Client], action: str, fields: dict[str, Any], own_room: bool,
) -> None:
    s, c = victim
    page = c.get("/self/electricity")
    assert page.status_code == 200, "the session is over"
    before = _balances(c, s)
    data: dict[str, Any] = {k: _encoded(v) for k, v in fields.items()}
    if own_room:
        data.setdefault("room_id", str(s.room_id))
        data.setdefault("key", hidden(page.text, "key"))
    data["csrf"] = Page(page.text).csrf[0]
    if action in ("/self/report-lost", "/self/found"):
        data.pop("password", None)  # no guesses: a wrong password counts towards the lockout
    r = c.post(action, data=data)
    assert r.status_code in (200, 400, 404), (action, data, r.status_code, r.text[-500:])
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    after = _balances(c, s)
    # an amount that is a real amount (digits, at most two decimals) may buy electricity
    amount = fields.get("amount_yuan")
    could_buy = (action == "/self/electricity" and isinstance(amount, str)
                 and re.fullmatch(r"\s*[0-9]*(\.[0-9]{0,2})?\s*", amount) is not None)
    if not could_buy:
        assert after == before, (action, data)
    else:
        assert after[0] == before[0] and after[1] + after[2] == before[1] + before[2]
    c.post("/self/limit", data={"daily_limit_yuan": "", "csrf": data["csrf"]})


def _encoded(value: object) -> object:
    if isinstance(value, list):
        return [_encoded(v) for v in value]
    return str(value).encode("utf-8", "replace")


async def test_activation_without_its_token_is_403_and_uses_no_code(
    world: World, client: httpx.AsyncClient
) -> None:
    s = await world.student(activated=False)
    code = await world.activation_code(s)
    fields = {"holder_id": s.holder_id, "code": code, "password": s.password,
              "password2": s.password}
    r = await client.post("/self/activate", data=fields)
    assert r.status_code == 403
    form = Page((await client.get("/self/activate")).text)
    r = await client.post("/self/activate", data={**fields, "csrf": form.csrf[0][::-1]})
    assert r.status_code == 403
    r = await client.post("/self/activate", data={**fields, "csrf": form.csrf[0]})
    assert r.status_code == 303 and r.headers["location"] == "/self/login"  # the code still works
    await log_in(client, s)

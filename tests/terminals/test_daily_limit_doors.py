"""A card's daily limit holds whatever door the spending came through (issue 18, finding 3).

Terminal purchases over real TCP (TerminalClient -> Gateway -> Campus) and raw ledger
transfers over real HTTP (``POST /v1/transfers``) in one engine, as ``onecard serve`` runs
them: the campus's remembered spending must count both, in either order."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from engine.campus import Campus
from engine.service import Engine
from terminals.gateway import Gateway
from tests.conftest import Api, Ids
from tests.terminals.test_gateway_flows import Person, World

LIMIT = 1_000


@pytest.fixture(scope="module")
async def campus(engine: Engine) -> Campus:
    return Campus(engine)


@pytest.fixture(scope="module")
async def gateway(engine: Engine, campus: Campus) -> AsyncIterator[Gateway]:
    gw = Gateway(engine, campus=campus)
    await gw.start("127.0.0.1", 0)
    yield gw
    await gw.stop()


@pytest.fixture
async def w(engine: Engine, campus: Campus, gateway: Gateway, ids: Ids) -> AsyncIterator[World]:
    world = await World(engine, campus, gateway, ids).setup()
    yield world
    await world.close()


async def buy(w: World, p: Person, amount: int) -> str:
    """A purchase at the canteen POS; its response code."""
    ans = await w.pos.request(w.pos.purchase(p.card, amount))
    assert ans.response_code is not None
    return ans.response_code


async def http_post(http: httpx.AsyncClient, api: Api, w: World, debit: int, amount: int,
                    code: int, **kw: Any) -> str:
    """A raw ledger transfer from ``debit`` to the canteen over HTTP; its id."""
    tid = str(uuid.uuid4())
    body = [{"id": tid, "ledger": w.ledger, "debit_account_id": debit,
             "credit_account_id": kw.pop("credit", w.canteen), "amount": amount, "code": code,
             **kw}]
    r = await http.post("/v1/transfers", headers=api.admin, json=body)
    assert r.status_code == 200, r.text
    assert r.json()[0]["status"] == "created", r.text
    return tid


async def test_http_spending_after_a_terminal_purchase_counts(
    w: World, http: httpx.AsyncClient, api: Api
) -> None:
    p = await w.person(cash=10_000, daily_limit=LIMIT)
    assert await buy(w, p, 700) == "00"  # the campus now remembers 700 for today
    meal = await http_post(http, api, w, p.purse, 300, 1)  # a meal through the other door
    assert await buy(w, p, 300) == "61"  # 700 + 300 + 300 > 1,000
    assert await buy(w, p, 1) == "61"
    # giving the HTTP meal back (a reversal naming it) lowers the spending again, exactly
    await http_post(http, api, w, w.canteen, 300, 7, credit=p.purse, user_data=meal)
    assert await buy(w, p, 300) == "00"  # 700 + 300 = the limit
    assert await w.purses(p) == (9_000, 0)


async def test_http_spending_before_a_terminal_purchase_counts(
    w: World, http: httpx.AsyncClient, api: Api
) -> None:
    p = await w.person(cash=10_000, daily_limit=LIMIT)
    assert await buy(w, p, LIMIT + 1) == "61"  # read today's 0: remembered from here on
    await http_post(http, api, w, p.purse, 300, 1)
    assert await buy(w, p, 700) == "00"  # 300 + 700 = the limit
    assert await buy(w, p, 300) == "61"
    assert await w.purses(p) == (9_000, 0)


@pytest.mark.parametrize("door", ["subsidy_meal", "electricity", "hot_water_hold"])
async def test_every_spending_code_and_purse_counts(
    w: World, http: httpx.AsyncClient, api: Api, door: str
) -> None:
    p = await w.person(cash=10_000, subsidy=500, daily_limit=LIMIT)
    assert await buy(w, p, 600) == "00"  # 500 from the subsidy purse, 100 from cash
    await w.post(w.fund, p.subsidy, 500, 5)  # more subsidy (code 5 is no spending)
    if door == "subsidy_meal":
        await http_post(http, api, w, p.subsidy, 300, 1)
    elif door == "electricity":
        room = await w.room()
        await http_post(http, api, w, p.purse, 300, 3, credit=room.account_id)
    else:
        await http_post(http, api, w, p.purse, 300, 2, credit=w.water_acc, flags=["pending"],
                        timeout_s=600)
    assert await buy(w, p, 101) == "61"  # 600 + 300 + 101
    assert await buy(w, p, 100) == "00"  # exactly the limit

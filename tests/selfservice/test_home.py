"""The home page and the statement of /self over HTTP (httpx, like a browser without script)."""

from __future__ import annotations

import httpx

from tests.selfservice.conftest import Page, World, log_in


async def test_home_shows_the_api_balances(world: World, client: httpx.AsyncClient) -> None:
    s = await world.student(cash=12_345, subsidy=600)
    await log_in(client, s)
    r = await client.get("/self")
    assert r.status_code == 200, r.text
    page = Page(r.text)
    api = (await world.http.get(f"/v1/cards/{s.card_no}/balance",
                                headers={"Authorization": "Bearer read-token"})).json()
    purses = {p["kind"]: p["available"] for p in api["purses"]}
    assert page.fen("total-available") == api["total_available"] == 12_945
    assert page.fen("purse-available") == purses["purse"]
    assert page.fen("subsidy-available") == purses["subsidy"]
    assert page.ids["card-status"]["data-status"] == "active"
    assert page.text("card-no") == s.card_no[-4:]
    assert s.card_no not in r.text

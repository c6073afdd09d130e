"""The home page and the statement of /self over HTTP (httpx, like a browser without script)."""

from __future__ import annotations

import re

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


async def test_low_balance_warnings_at_their_thresholds(
    world: World, client: httpx.AsyncClient
) -> None:
    low = await world.student(cash=1_000, subsidy=999, room=True, room_fen=999)
    await log_in(client, low)
    page = Page((await client.get("/self")).text)
    assert page.ids["low-balance"]["data-threshold-fen"] == "2000"
    assert page.ids["low-room"]["data-threshold-fen"] == "1000"
    assert page.fen("home-room-available") == 999
    ok = await world.student(cash=1_000, subsidy=1_000, room=True, room_fen=1_000)
    await log_in(client, ok)
    page = Page((await client.get("/self")).text)
    assert "low-balance" not in page.ids and "low-room" not in page.ids
    assert page.fen("total-available") == 2_000


async def test_a_statement_of_45_transfers_in_pages_of_20(
    world: World, client: httpx.AsyncClient
) -> None:
    s = await world.student(cash=100_000)  # one top-up
    ids = [await world.post(s.purse, world.canteen, 100 + i, 1) for i in range(42)]
    ids.append(await world.post(world.fund, s.subsidy, 500, 5))
    ids.append(await world.post(s.subsidy, s.purse, 200, 8))  # between the holder's own purses
    other = await world.student(cash=5_000)
    await world.post(other.purse, world.canteen, 77, 1)  # not this holder's
    await log_in(client, s)
    seen: list[dict[str, str | None]] = []
    url: str | None = "/self/statement"
    pages = 0
    while url is not None:
        r = await client.get(url)
        assert r.status_code == 200, r.text
        page = Page(r.text)
        seen += page.rows.get("statement", [])
        pages += 1
        m = re.search(r'<a href="([^"]+)" rel="next"', r.text)
        url = m.group(1).replace("&amp;", "&") if m else None
    assert pages == 3 and len(seen) == 45
    assert [row["data-transfer-id"] for row in seen][:44] == list(reversed(ids))
    meals = [int(str(row["data-fen"])) for row in seen[2:44]]
    assert meals == [-(100 + i) for i in reversed(range(42))]
    assert [row["data-code"] for row in seen[:2]] == ["8", "5"]
    assert int(str(seen[0]["data-fen"])) == 0 and int(str(seen[1]["data-fen"])) == 500
    assert int(str(seen[-1]["data-fen"])) == 100_000 and seen[-1]["data-code"] == "4"
    # the lines add up to what the purses hold
    assert sum(int(str(row["data-fen"])) for row in seen) == (
        await world.available(s.purse) + await world.available(s.subsidy))

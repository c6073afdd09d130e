"""PIN tries (contract §5 v4): after 5 wrong PINs on a card in a campus day, every PIN-checked
request of the card answers 75, the right PIN too, until the next campus day or until the card
office resets the count (``POST /v1/cards/{card_no}/pin-tries/reset``). Before, a balance
inquiry was a free PIN oracle for anyone with a terminal key.

Real TCP, the real campus and ledger (the world of test_gateway_flows.py); the count lives in
PostgreSQL, so two gateways (two processes) share it; the reset goes over real HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta

import httpx
import pytest

from engine import limits
from engine.campus import Campus, Card
from engine.service import Engine
from terminals.client import TerminalClient
from terminals.gateway import Gateway
from tests.conftest import Api, Ids
from tests.terminals.test_gateway_flows import Person, World, campus, gateway, w

__all__ = ["campus", "gateway", "w"]  # fixtures, used by name

PIN = "4321"
WRONG = ["0000", "1111", "2222", "3333", "5555", "6666", "7777"]
# STANs unique in this module: clients sharing a terminal id must not share request keys
_STANS = (f"{n:06d}" for n in itertools.count(500_000))


async def codes(c: TerminalClient, p: Person, pins: list[str], *, amount: int = 2_000
                ) -> list[str]:
    """Field 39 of a purchase of ``amount`` with each PIN in turn."""
    return [(await c.request(c.purchase(p.card, amount, pin=pin, stan=next(_STANS))))
            .response_code or "" for pin in pins]


async def wrong_five_times(w: World, p: Person) -> None:
    assert await codes(w.pos, p, WRONG[:5]) == ["55"] * 5


def test_five_tries_a_day() -> None:
    assert limits.PIN_TRIES_PER_DAY == 5


async def test_after_five_wrong_pins_the_right_pin_is_75(w: World) -> None:
    p = await w.person(cash=10_000, pin=PIN, pin_threshold=1_000)
    assert await codes(w.pos, p, WRONG[:4]) == ["55"] * 4
    assert await codes(w.pos, p, [PIN]) == ["00"]  # within the tries: the right PIN gets in
    assert await codes(w.pos, p, WRONG[4:5]) == ["55"]  # the fifth wrong one is still a 55
    assert await codes(w.pos, p, [PIN, WRONG[5]]) == ["75", "75"]
    # every PIN-checked request of the card: a missing PIN, an inquiry with a PIN, a hold,
    # electricity above the threshold
    ans = await w.pos.request(w.pos.purchase(p.card, 2_000))
    assert ans.response_code == "75"
    assert (await w.pos.request(w.pos.inquiry(p.card, pin=PIN))).response_code == "75"
    assert (await w.water.request(w.water.hold(p.card, 1_500, pin=PIN))).response_code == "75"
    room = await w.room()
    buy = w.kiosk.electricity_purchase(p.card, 1_500, room.room_id, pin=PIN)
    assert (await w.kiosk.request(buy)).response_code == "75"
    # what checks no PIN is not affected: below the threshold, an inquiry without a PIN
    assert (await w.pos.request(w.pos.purchase(p.card, 500))).response_code == "00"
    assert (await w.pos.request(w.pos.inquiry(p.card))).response_code == "00"
    assert await w.purses(p) == (10_000 - 2_000 - 500, 0)
    # the card's state is checked first: a lost card is 41, not 75
    assert isinstance(await w.campus.report_lost(p.card), Card)
    assert await codes(w.pos, p, [PIN]) == ["41"]


async def test_inquiries_count_too(w: World) -> None:
    p = await w.person(cash=10_000, pin=PIN, pin_threshold=0)
    for pin in WRONG[:5]:
        assert (await w.kiosk.request(w.kiosk.inquiry(p.card, pin=pin))).response_code == "55"
    assert (await w.kiosk.request(w.kiosk.inquiry(p.card, pin=PIN))).response_code == "75"
    assert await codes(w.pos, p, [PIN]) == ["75"]
    assert await w.purses(p) == (10_000, 0)


async def test_a_burst_of_guesses_gets_five_answers_at_most(w: World) -> None:
    """Thirty guesses sent at once (inquiries take no per-card lock) are counted as they are
    decided: five 55s, then 75s, and the right PIN after them is 75."""
    p = await w.person(cash=1_000, pin=PIN)
    clients = [await w.client(w.kiosk.terminal_id, w.kiosk.merchant_id, w.key)
               for _ in range(15)]
    guesses = [f"{n:04d}" for n in range(30)]

    async def guess(c: TerminalClient, pins: list[str]) -> list[str]:
        return [(await c.request(c.inquiry(p.card, pin=pin, stan=next(_STANS)))).response_code
                or "" for pin in pins]

    answers = await asyncio.gather(*(guess(c, guesses[i::15]) for i, c in enumerate(clients)))
    assert Counter(code for a in answers for code in a) == {"55": 5, "75": 25}
    assert (await w.kiosk.request(w.kiosk.inquiry(p.card, pin=PIN))).response_code == "75"


async def test_two_gateways_share_the_count(engine: Engine, w: World) -> None:
    """Another process (its own Campus and gateway) sees the same count."""
    other = Gateway(engine, campus=Campus(engine))
    await other.start("127.0.0.1", 0)
    try:
        p = await w.person(cash=1_000, pin=PIN)
        there = TerminalClient("127.0.0.1", other.port, terminal_id=w.pos.terminal_id,
                               merchant_id=w.pos.merchant_id, mac_key=w.key, timeout_s=10)
        async with there:
            assert await codes(w.pos, p, WRONG[:3]) == ["55"] * 3
            assert await codes(there, p, WRONG[3:5]) == ["55"] * 2
            assert await codes(there, p, [PIN]) == ["75"]
            assert await codes(w.pos, p, [PIN]) == ["75"]
    finally:
        await other.stop()


class Clock:
    """A campus clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def clocked(engine: Engine, ids: Ids) -> AsyncIterator[tuple[World, Clock]]:
    clock = Clock()
    campus = Campus(engine, clock=clock)
    gw = Gateway(engine, campus=campus)
    await gw.start("127.0.0.1", 0)
    world = await World(engine, campus, gw, ids).setup()
    try:
        yield world, clock
    finally:
        await world.close()
        await gw.stop()


async def test_the_next_campus_day_allows_again(clocked: tuple[World, Clock]) -> None:
    w, clock = clocked
    p = await w.person(cash=10_000, pin=PIN)
    await wrong_five_times(w, p)
    assert await codes(w.pos, p, [PIN]) == ["75"]
    tomorrow = clock.now.astimezone(w.campus.tz).date() + timedelta(days=1)
    clock.now = datetime.combine(tomorrow, time(0, 0, 1), tzinfo=w.campus.tz)  # local midnight
    assert await codes(w.pos, p, [PIN]) == ["00"]
    assert await codes(w.pos, p, WRONG[:5]) == ["55"] * 5  # a new day has five tries again
    assert await codes(w.pos, p, [PIN]) == ["75"]


async def test_the_card_office_resets_the_count(w: World, api: Api) -> None:
    p = await w.person(cash=10_000, pin=PIN)
    await wrong_five_times(w, p)
    assert await codes(w.pos, p, [PIN]) == ["75"]
    path = f"/v1/cards/{p.card}/pin-tries/reset"
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as http:
        assert (await http.post(path)).status_code == 401
        assert (await http.post(path, headers=api.read)).status_code == 403
        missing = await http.post("/v1/cards/6600000000000009/pin-tries/reset",
                                  headers=api.admin)
        assert missing.status_code == 404
        bad = await http.post("/v1/cards/12ab/pin-tries/reset", headers=api.admin)
        assert bad.status_code == 400
        paths = (await http.get("/openapi.json")).json()["paths"]
        assert "/v1/cards/{card_no}/pin-tries/reset" in paths
        r = await http.post(path, headers=api.admin)
        assert r.status_code == 200 and r.json() == {"card_no": p.card, "status": "active"}
    assert await codes(w.pos, p, [PIN]) == ["00"]
    assert await codes(w.pos, p, WRONG[:5]) == ["55"] * 5
    assert await codes(w.pos, p, [PIN]) == ["75"]
    assert await w.purses(p) == (8_000, 0)

"""The forms of /self over HTTP: report lost and found (the password again), the PIN, the
holder's own daily limit, electricity; each checked against what the terminals then answer."""

from __future__ import annotations

import re
from datetime import date

import asyncpg
import httpx
import pytest

from engine.finance.statements import monthly_statement
from engine.web.portal import SELF
from tests.selfservice.conftest import Page, Student, World, log_in


async def submit(client: httpx.AsyncClient, page_url: str, action: str, **fields: str) -> Page:
    """Post a form of ``page_url`` (its token) to ``action``; the answer page."""
    form = Page((await client.get(page_url)).text)
    r = await client.post(action, data={**fields, "csrf": form.csrf[0]})
    assert r.status_code < 500, r.text
    page = Page(r.text)
    page.status = r.status_code  # type: ignore[attr-defined]
    return page


def result(page: Page) -> str:
    return str(page.ids["result"]["data-status"])


async def test_report_lost_needs_the_password_then_the_terminal_answers_41(
    world: World, client: httpx.AsyncClient
) -> None:
    s = await world.student(cash=5_000)
    await log_in(client, s)
    wrong = await submit(client, "/self", "/self/report-lost", password="not my password")
    assert result(wrong) == "wrong_password"
    assert await world.purchase(s, 100) == "00"  # still active
    done = await submit(client, "/self", "/self/report-lost", password=s.password)
    assert result(done) == "done"
    home = Page((await client.get("/self")).text)
    assert home.ids["card-status"]["data-status"] == "lost"
    assert "found" in home.ids and "report-lost" not in home.ids
    assert await world.purchase(s, 100) == "41"
    again = await submit(client, "/self", "/self/found", password="still not it")
    assert result(again) == "wrong_password"
    assert await world.purchase(s, 100) == "41"
    found = await submit(client, "/self", "/self/found", password=s.password)
    assert result(found) == "done"
    assert await world.purchase(s, 100) == "00"
    assert await world.available(s.purse) == 4_800


async def test_pin_change(world: World, client: httpx.AsyncClient) -> None:
    s = await world.student(cash=10_000, pin="1234", pin_threshold=500)
    await log_in(client, s)
    assert result(await submit(client, "/self/settings", "/self/pin", old_pin="9999",
                               new_pin="5678")) == "wrong_pin"
    assert result(await submit(client, "/self/settings", "/self/pin", old_pin="1234",
                               new_pin="12a4")) == "invalid_pin"
    assert await world.purchase(s, 600, pin="1234") == "00"  # unchanged so far
    assert result(await submit(client, "/self/settings", "/self/pin", old_pin="1234",
                               new_pin="567890")) == "changed"
    assert await world.purchase(s, 600, pin="567890") == "00"
    assert await world.purchase(s, 600, pin="1234") == "55"
    assert await world.available(s.purse) == 8_800


async def test_wrong_old_pins_count_with_the_terminals(
    world: World, client: httpx.AsyncClient
) -> None:
    s = await world.student(cash=10_000, pin="1234", pin_threshold=0)
    await log_in(client, s)
    for _ in range(3):
        assert await world.purchase(s, 100, pin="0000") == "55"
    for _ in range(2):
        assert result(await submit(client, "/self/settings", "/self/pin", old_pin="0000",
                                   new_pin="4321")) == "wrong_pin"
    # five wrong PINs today, three at a till and two here: the card's PIN is locked everywhere
    assert await world.purchase(s, 100, pin="1234") == "75"
    assert result(await submit(client, "/self/settings", "/self/pin", old_pin="1234",
                               new_pin="4321")) == "pin_tries_exceeded"


async def test_own_limit_is_the_lower_of_the_two(world: World, client: httpx.AsyncClient) -> None:
    s = await world.student(cash=100_000, daily_limit=5_000)
    await log_in(client, s)
    page = await submit(client, "/self/settings", "/self/limit", daily_limit_yuan="10.00")
    assert result(page) == "limit_set" and page.fen("own-limit") == 1_000
    settings = Page((await client.get("/self/settings")).text)
    assert settings.fen("office-limit") == 5_000 and settings.fen("own-limit") == 1_000
    assert settings.fen("effective-limit") == 1_000
    assert await world.purchase(s, 1_001) == "61"
    assert await world.purchase(s, 600) == "00"
    assert await world.purchase(s, 401) == "61"
    # above the card office's: the office's 50.00 applies
    assert result(await submit(client, "/self/settings", "/self/limit",
                               daily_limit_yuan="80")) == "limit_set"
    assert await world.purchase(s, 4_401) == "61"
    assert await world.purchase(s, 4_400) == "00"
    # removed: back to the office's alone (spent today: 50.00 = the limit)
    assert result(await submit(client, "/self/settings", "/self/limit",
                               daily_limit_yuan="")) == "limit_removed"
    assert await world.purchase(s, 1) == "61"


async def test_own_limit_without_an_office_limit(world: World, client: httpx.AsyncClient) -> None:
    s = await world.student(cash=100_000)
    await log_in(client, s)
    assert await world.purchase(s, 3_000) == "00"
    await submit(client, "/self/settings", "/self/limit", daily_limit_yuan="30.5")
    assert await world.purchase(s, 50) == "00"
    assert await world.purchase(s, 1) == "61"
    await submit(client, "/self/settings", "/self/limit", daily_limit_yuan=" ")
    assert await world.purchase(s, 10_000) == "00"


@pytest.mark.parametrize(("typed", "error"), [
    ("12.345", "too_precise"), ("abc", "malformed"), ("-5", "malformed"), ("1e3", "malformed"),
    ("\uff11\uff12", "malformed"), ("99999999999999", "too_large")])
async def test_a_wrong_limit_is_refused_and_changes_nothing(
    world: World, client: httpx.AsyncClient, typed: str, error: str
) -> None:
    s = await world.student(cash=10_000)
    await log_in(client, s)
    page = await submit(client, "/self/settings", "/self/limit", daily_limit_yuan=typed)
    assert page.status == 400  # type: ignore[attr-defined]
    assert page.ids["error"]["data-error"] == error
    assert "data-fen" not in page.ids["own-limit"]  # still none

    assert await world.purchase(s, 10_000) == "00"


async def test_buy_electricity_once_per_form(world: World, client: httpx.AsyncClient) -> None:
    s = await world.student(cash=10_000, room=True, room_fen=500)
    await log_in(client, s)
    form = Page((await client.get("/self/electricity")).text)
    assert form.text("room-id") == s.room_id and form.fen("room-available") == 500
    fields = {"csrf": form.csrf[0], "room_id": str(s.room_id), "amount_yuan": "12.5",
              "key": _hidden(form, "key")}
    first = await client.post("/self/electricity", data=fields)
    assert first.status_code == 200, first.text
    page = Page(first.text)
    assert result(page) == "created" and page.fen("room-available") == 1_750
    again = Page((await client.post("/self/electricity", data=fields)).text)  # a refresh
    assert result(again) == "exists" and again.fen("room-available") == 1_750
    changed = Page((await client.post("/self/electricity",
                                      data={**fields, "amount_yuan": "13"})).text)
    assert result(changed) == "exists_with_different_amount"
    assert await world.available(s.purse) == 8_750
    assert await world.available(room_account(s)) == 1_750


def room_account(s: Student) -> int:
    assert s.room_account is not None
    return s.room_account


def _hidden(page: Page, name: str) -> str:
    m = re.search(rf'<input type="hidden" name="{name}" value="([^"]*)"', page.html)
    assert m, name
    return m.group(1)


async def test_electricity_refusals_are_transfer_statuses(
    world: World, client: httpx.AsyncClient
) -> None:
    s = await world.student(cash=1_000, room=True, daily_limit=800)
    await log_in(client, s)

    async def buy(amount: str) -> Page:
        form = Page((await client.get("/self/electricity")).text)
        r = await client.post("/self/electricity", data={
            "csrf": form.csrf[0], "room_id": str(s.room_id), "amount_yuan": amount,
            "key": _hidden(form, "key")})
        page = Page(r.text)
        page.status = r.status_code  # type: ignore[attr-defined]
        return page

    assert result(await buy("8.01")) == "daily_limit_exceeded"
    assert result(await buy("8")) == "created"
    await world.post(world.bank, s.purse, 100_000, 4)
    assert result(await buy("0.01")) == "daily_limit_exceeded"
    bad = await buy("1.001")
    assert bad.status == 400 and bad.ids["error"]["data-error"] == "too_precise"  # type: ignore[attr-defined]
    assert result(await submit(client, "/self", "/self/report-lost", password=s.password)) == "done"
    assert result(await buy("0.01")) == "debit_account_frozen"
    assert await world.available(room_account(s)) == 800


async def test_the_month_room_statement(world: World, client: httpx.AsyncClient) -> None:
    s = await world.student(cash=10_000, room=True, room_fen=300)
    await log_in(client, s)
    form = Page((await client.get("/self/electricity")).text)
    await client.post("/self/electricity", data={"csrf": form.csrf[0], "room_id": str(s.room_id),
                                                 "amount_yuan": "20", "key": _hidden(form, "key")})
    await world.post(room_account(s), world.power, 150, 3)  # the meter's use
    r = await client.get("/self/room-statement")
    assert r.status_code == 200, r.text
    page = Page(r.text)
    rows = page.rows["room-statement"]
    # the room's first 3.00 came from the bank (a top-up: "other"), then the form's purchase
    assert [row["data-item"] for row in rows] == ["opening", "other", "purchase",
                                                   "consumption", "closing"]
    assert [int(str(row["data-fen"])) for row in rows] == [0, 300, 2_000, -150, 2_150]
    assert page.fen("room-bought") == 2_000 and page.fen("room-used") == -150
    # the figures of `onecard statement --room` for the same month
    pool = await asyncpg.create_pool(world.web.dsn, min_size=1, max_size=1)
    try:
        month = date.fromisoformat(str(page.ids["room-statement"]["data-month"]) + "-01")
        done = await monthly_statement(pool, month, room=s.room_id, ledger=s.ledger)
    finally:
        await pool.close()
    [room] = done.rooms
    assert [int(str(row["data-fen"])) for row in rows] == [
        room.opening, *(i.amount for i in room.items), room.closing]
    assert [row.get("data-transfer-id") for row in rows[1:-1]] == [
        i.transfer_id for i in room.items]
    bad = await client.get("/self/room-statement?month=2025-13")
    assert bad.status_code == 400 and Page(bad.text).ids["error"]["data-error"] == "month"
    old = Page((await client.get("/self/room-statement?month=2020-01")).text)
    assert [row["data-item"] for row in old.rows["room-statement"]] == ["opening", "closing"]


async def test_log_out(world: World, client: httpx.AsyncClient) -> None:
    s = await world.student()
    await log_in(client, s)
    home = Page((await client.get("/self")).text)
    r = await client.post("/self/logout", data={"csrf": home.csrf[0]})
    assert r.status_code == 303 and r.headers["location"] == SELF.login
    assert (await client.get("/self")).headers["location"] == SELF.login

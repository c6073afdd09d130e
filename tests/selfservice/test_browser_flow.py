"""A student's evening on /self in a real headless Chromium (Selenium, a phone's viewport):
activate, log in, see the balances the API sees, page through 45 transfers, report the card
lost (a real ISO 8583 purchase with it then answers 41), find it again, buy electricity and
watch the room's balance move, read the month's room statement, change the PIN (the new one
pays above the threshold, the old one is 55), set a limit, switch to English, log out.

Screenshots of home and statement in both languages go to test-artifacts/screenshots/.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.selfservice.conftest import SelfWeb, Student, World
from tests.web.browsing import by_id, follow, lang
from tests.web.conftest import screenshot

pytestmark = pytest.mark.browser
READ = {"Authorization": "Bearer read-token"}


def has(driver: Any, element_id: str) -> bool:
    from selenium.webdriver.common.by import By

    return bool(driver.find_elements(By.ID, element_id))


def fill(driver: Any, **fields: str) -> None:
    for name, value in fields.items():
        element = by_id(driver, name)
        element.clear()
        element.send_keys(value)


def fen(driver: Any, element_id: str) -> int:
    return int(by_id(driver, element_id).get_attribute("data-fen"))


def rows(driver: Any, table: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, f"table#{table} tbody tr"))


async def _student(world: World) -> Student:
    s = await world.student(cash=20_000, room=True, room_fen=800, pin="1234",
                            pin_threshold=500, activated=False)
    for i in range(44):  # with the top-up: 45 transfers
        await world.post(s.purse, world.canteen, 10 + i, 1)
    return s


async def test_a_students_evening(browser: Any, selfweb: SelfWeb, world: World) -> None:
    d, base = browser, selfweb.base_url
    s = await _student(world)
    code = await world.activation_code(s)

    # activate, then log in
    d.get(base + "/self/login")
    assert lang(d) == "zh-CN"
    follow(d, "to-activate")
    screenshot(d, "self-activate-zh")
    fill(d, holder_id=s.holder_id, code=code, password=s.password, password2=s.password)
    follow(d, "activate")
    assert d.current_url == base + "/self/login"
    fill(d, holder_id=s.holder_id, password=s.password)
    follow(d, "login")
    assert d.current_url == base + "/self"

    # the balances are the API's
    api = (await world.http.get(f"/v1/cards/{s.card_no}/balance", headers=READ)).json()
    purses = {p["kind"]: p["available"] for p in api["purses"]}
    assert fen(d, "total-available") == api["total_available"] == 20_000 - sum(range(10, 54))
    assert fen(d, "purse-available") == purses["purse"]
    assert fen(d, "subsidy-available") == purses["subsidy"] == 0
    assert by_id(d, "card-no").text == s.card_no[-4:]
    status = by_id(d, "card-status")
    assert status.get_attribute("data-status") == "active" and status.text == "正常"
    assert has(d, "low-room")  # 8.00 yuan left in the room
    screenshot(d, "self-home-zh")

    # the statement, 20 a page
    follow(d, "nav-statement")
    screenshot(d, "self-statement-zh")
    sizes = [len(rows(d, "statement"))]
    while has(d, "older"):
        assert by_id(d, "older").get_attribute("rel") == "next"
        follow(d, "older")
        sizes.append(len(rows(d, "statement")))
    assert sizes == [20, 20, 5]
    assert rows(d, "statement")[-1].get_attribute("data-code") == "4"  # the top-up, oldest

    # report lost: the password again; then a real terminal purchase is 41
    follow(d, "nav-home")
    fill(d, **{"lost-password": s.password})
    follow(d, "report-lost")
    assert by_id(d, "result").get_attribute("data-status") == "done"
    screenshot(d, "self-reported-lost-zh")
    assert await world.purchase(s, 100, pin="1234") == "41"
    follow(d, "back-home")
    assert by_id(d, "card-status").get_attribute("data-status") == "lost"
    screenshot(d, "self-home-lost-zh")
    fill(d, **{"found-password": s.password})
    follow(d, "found")
    assert by_id(d, "result").get_attribute("data-status") == "done"
    assert await world.purchase(s, 100) == "00"

    # electricity: the room's balance moves
    follow(d, "nav-electricity")
    assert by_id(d, "room-id").text == s.room_id
    room_before = fen(d, "room-available")
    assert room_before == 800
    screenshot(d, "self-electricity-zh")
    fill(d, amount_yuan="20")
    follow(d, "buy")
    assert by_id(d, "result").get_attribute("data-status") == "created"
    assert fen(d, "room-available") == 2_800
    screenshot(d, "self-electricity-bought-zh")
    d.refresh()  # the browser posts the same form (the same key) again: nothing more is bought
    assert by_id(d, "result").get_attribute("data-status") == "exists"
    assert s.room_account is not None and await world.available(s.room_account) == 2_800
    follow(d, "back-electricity")
    assert fen(d, "room-available") == 2_800 and not has(d, "low-room")

    # the month's room statement
    follow(d, "to-room-statement")
    items = [r.get_attribute("data-item") for r in rows(d, "room-statement")]
    assert items == ["opening", "other", "purchase", "closing"]
    assert fen(d, "room-closing") == 2_800
    screenshot(d, "self-room-statement-zh")

    # PIN: the new one pays above the threshold, the old one is 55
    follow(d, "nav-settings")
    screenshot(d, "self-settings-zh")
    fill(d, old_pin="1234", new_pin="8642")
    follow(d, "change-pin")
    assert by_id(d, "result").get_attribute("data-status") == "changed"
    assert await world.purchase(s, 600, pin="8642") == "00"
    assert await world.purchase(s, 600, pin="1234") == "55"

    # a limit of my own
    follow(d, "nav-settings")
    fill(d, daily_limit_yuan="10")
    follow(d, "set-limit")
    assert by_id(d, "result").get_attribute("data-status") == "limit_set"
    assert fen(d, "own-limit") == 1_000
    # spent today: 13.86 of meals, 1.00, 20.00 of electricity, 6.00
    assert await world.purchase(s, 1, pin="8642") == "61"

    # English
    follow(d, "back-home")
    follow(d, "lang-switch")
    assert lang(d) == "en" and by_id(d, "card-status").text == "Active"
    assert fen(d, "daily-limit") == 1_000
    screenshot(d, "self-home-en")
    follow(d, "nav-statement")
    assert lang(d) == "en" and len(rows(d, "statement")) == 20
    screenshot(d, "self-statement-en")

    # log out
    follow(d, "nav-home")
    follow(d, "logout")
    assert d.current_url == base + "/self/login"
    d.get(base + "/self")
    assert d.current_url == base + "/self/login"

"""The subsidy month and the reconciliation in a real headless Chromium (no JavaScript on the
pages): a card_office operator uploads a file, sees the preview, confirms and uploads it again
(nothing twice); a finance operator reconciles a statement with a mismatch. Screenshots go to
test-artifacts/screenshots/."""

from __future__ import annotations

import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from engine.access.holders import check_holder_password
from engine.access.lockout import LoginOutcome
from engine.access.roles import Role
from engine.calendar import campus_tz
from engine.campus.accounts import holder_account_ids
from engine.web.portal import CONSOLE
from tests.web.browsing import by_id, click_through, follow
from tests.web.conftest import WebServer, screenshot
from tests.web.own_database import own_dsn, own_web  # noqa: F401  (this module's database)
from tests.web.test_console import (  # noqa: F401  (fixtures)
    ADMIN,
    PASSWORD,
    new_holder,
    operator,
    operators_login,
    pool,
)
from tests.web.test_console_finance import _top_ups
from tests.web.test_console_holders import same_id_in_two_ledgers

pytestmark = pytest.mark.browser


def _log_in(browser: Any, web: WebServer, username: str) -> None:
    browser.get(web.base_url + CONSOLE.login)
    by_id(browser, CONSOLE.subject_field).send_keys(username)
    by_id(browser, "password").send_keys(PASSWORD)
    follow(browser, "login")


def _rows(browser: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(browser.find_elements(By.CSS_SELECTOR, css))


async def test_the_subsidy_month_in_a_browser(
    browser: Any, web: WebServer, pool: asyncpg.Pool, operators_login: None, tmp_path: Path  # noqa: F811
) -> None:
    (l1, h1), (l2, h2) = await new_holder(web), await new_holder(web)
    csv = tmp_path / "subsidies.csv"
    csv.write_text(f"ledger,holder_id,amount_fen\n{l1},{h1},800\n{l2},{h2},200\n"
                   f"{l1},nobody-{h1},100\n", encoding="utf-8")
    _log_in(browser, web, await operator(pool, Role.CARD_OFFICE))
    for round_ in (1, 2):
        browser.get(web.base_url + "/console/subsidies")
        by_id(browser, "file").send_keys(str(csv))
        follow(browser, "preview-submit")
        assert by_id(browser, "preview-total").get_attribute("data-fen") == "1000"
        assert len(_rows(browser, 'table#refused tr[data-reason="holder_not_found"]')) == 1
        assert by_id(browser, "preview-already").text == ("0" if round_ == 1 else "2")
        screenshot(browser, f"console-subsidy-preview-{round_}")
        follow(browser, "confirm")
        credited = by_id(browser, "granted-total").get_attribute("data-fen")
        assert credited == ("1000" if round_ == 1 else "0")  # nothing twice
    screenshot(browser, "console-subsidy-done")


async def test_a_reconciliation_in_a_browser(
    browser: Any, web: WebServer, pool: asyncpg.Pool, operators_login: None, tmp_path: Path  # noqa: F811
) -> None:
    clearing, tag = await _top_ups(web)
    now = datetime.now(campus_tz())
    statement = tmp_path / "statement.csv"
    statement.write_text(f"provider_ref,amount_fen,time\n{tag}-r1,10000,{now.isoformat()}\n"
                         f"{tag}-r2,1999,{now.isoformat()}\n", encoding="utf-8")
    _log_in(browser, web, await operator(pool, Role.FINANCE))
    browser.get(f"{web.base_url}/console/finance?date={now.date().isoformat()}&lang=en")
    assert len(_rows(browser, "a[data-file]")) == 4
    assert _rows(browser, "table#trial-balance tr[data-kind]")
    by_id(browser, "clearing").send_keys(str(clearing))
    by_id(browser, "statement").send_keys(str(statement))
    follow(browser, "reconcile-submit")
    results = {r.get_attribute("data-provider-ref"): r.get_attribute("data-result")
               for r in _rows(browser, "table#reconcile tr[data-result]")}
    assert results == {f"{tag}-r1": "matched", f"{tag}-r2": "amount_mismatch"}
    screenshot(browser, "console-reconcile-en")


async def _funded_holder(web: WebServer, fen: int) -> tuple[int, str]:
    """A new holder whose cash purse holds ``fen`` (a top-up from a clearing account)."""
    ledger, hid = await new_holder(web)
    purse, _ = holder_account_ids(ledger, hid)
    clearing = 900_000_000 + ledger
    async with httpx.AsyncClient(base_url=web.base_url, timeout=30, headers=ADMIN) as api:
        r = await api.post("/v1/accounts", json=[{"id": clearing, "ledger": ledger,
                                                   "kind": "clearing", "code": 1}])
        assert r.status_code == 200, r.text
        r = await api.post("/v1/transfers", json=[{
            "id": str(uuid.uuid4()), "ledger": ledger, "debit_account_id": clearing,
            "credit_account_id": purse, "amount": fen, "code": 4, "user_data": f"wx-{hid}"}])
        assert r.json()[0]["status"] == "created", r.text
    return ledger, hid


def _result(browser: Any) -> tuple[str, str]:
    """#result's data-status and heading."""
    from selenium.webdriver.common.by import By

    shown = by_id(browser, "result")
    return str(shown.get_attribute("data-status")), shown.find_element(By.TAG_NAME, "h2").text


def _card_status(browser: Any, card_no: str) -> str:
    [row] = _rows(browser, f'tr[data-card-no="{card_no}"]')
    return str(row.get_attribute("data-status"))


async def test_the_card_counter_in_a_browser(
    browser: Any, web: WebServer, pool: asyncpg.Pool, operators_login: None  # noqa: F811
) -> None:
    """Find a holder, issue a card, report it lost, replace it (the balance stays), and give a
    new activation code that then works on /self/activate."""
    _, hid = await _funded_holder(web, 12_345)
    card, new_card = (f"62{os.getpid() % 10_000:04d}{n}{uuid.uuid4().int % 10**9:09d}"
                      for n in (1, 2))
    _log_in(browser, web, await operator(pool, Role.CARD_OFFICE))
    browser.get(f"{web.base_url}/console/holders?q={hid}")
    assert _rows(browser, f'table#holders tr[data-holder-id="{hid}"]')
    browser.get(f"{web.base_url}/console/holders/{hid}")
    by_id(browser, "card_no").send_keys(card)
    follow(browser, "issue")
    assert _card_status(browser, card) == "active"
    follow(browser, f"report-lost-{card}")
    assert _card_status(browser, card) == "lost"
    assert _result(browser) == ("lost", "卡已挂失")
    by_id(browser, f"new-card-no-{card}").send_keys(new_card)
    screenshot(browser, "console-holder-lost-zh")
    follow(browser, f"replace-{card}")
    assert (_card_status(browser, card), _card_status(browser, new_card)) == ("replaced",
                                                                              "active")
    assert _result(browser) == ("active", "补卡成功")
    screenshot(browser, "console-holder-replaced-zh")
    async with httpx.AsyncClient(base_url=web.base_url, timeout=30, headers=ADMIN) as api:
        balance = (await api.get(f"/v1/cards/{new_card}/balance")).json()
    assert balance["total_available"] == 12_345  # the new card took over the same purses
    follow(browser, "new-activation")
    code = by_id(browser, "activation-code").text.strip()
    assert code.isdigit() and len(code) == 8
    browser.get(web.base_url + "/self/activate")
    for field, value in (("holder_id", hid), ("code", code), ("password", "a new pw 123"),
                         ("password2", "a new pw 123")):
        by_id(browser, field).send_keys(value)
    follow(browser, "activate")
    assert browser.current_url.startswith(web.base_url + "/self/login")
    login = await check_holder_password(pool, hid, "a new pw 123")
    assert login.outcome is LoginOutcome.OK


async def test_an_id_in_two_ledgers_in_a_browser(
    browser: Any, web: WebServer, pool: asyncpg.Pool, operators_login: None  # noqa: F811
) -> None:
    """The holder page of an id two ledgers have asks which; its link opens that holder, whose
    page links to the other one."""
    hid, first, second = await same_id_in_two_ledgers(web)
    _log_in(browser, web, await operator(pool, Role.CARD_OFFICE))
    browser.get(f"{web.base_url}/console/holders/{hid}?lang=en")
    assert by_id(browser, "holder-choice").get_attribute("data-holder-id") == hid
    screenshot(browser, "console-holder-choice-en")
    [link] = _rows(browser, f'table#holders tr[data-ledger="{second}"] a')
    click_through(browser, link)
    assert by_id(browser, "holder").get_attribute("data-ledger") == str(second)
    assert _rows(browser, f'#same-id a[data-ledger="{first}"]')
    screenshot(browser, "console-holder-same-id-en")

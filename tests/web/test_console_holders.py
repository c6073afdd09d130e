"""The holder page of the console over HTTP: what a clerk reads after each form (in Chinese by
default, in English with ?lang=en), with ``data-status`` still the outcome's code; and a holder
id that several ledgers have (the page asks which, and then keeps to that ledger)."""

from __future__ import annotations

import html
import itertools
import os
import re

import asyncpg
import httpx

from engine.access.roles import Role
from tests.web.conftest import WebServer, csrf_of, parse
from tests.web.test_console import (  # noqa: F401  (fixtures)
    ADMIN,
    console_as,
    new_holder,
    operators_login,
    pool,
)

_N = itertools.count(1)


def card_numbers(n: int) -> list[str]:
    """``n`` card numbers no other test uses."""
    base = 6_300_000_000_000 + (os.getpid() % 10_000) * 100_000 + next(_N) * 100
    return [str(base + i) for i in range(n)]


def result(page: str) -> tuple[str, str, str]:
    """#result's data-status, heading and first sentence, as shown."""
    m = re.search(r'<section id="result"[^>]*data-status="([^"]+)"[^>]*>\s*<h2>(.*?)</h2>\s*'
                  r"<p>(.*?)</p>", page, re.S)
    assert m, "no #result on the page"
    status, title, sentence = (html.unescape(g).strip() for g in m.groups())
    return status, title, sentence


async def test_each_form_answers_in_words(
    web: WebServer, pool: asyncpg.Pool, operators_login: None  # noqa: F811
) -> None:
    _, hid = await new_holder(web)
    _, other = await new_holder(web)
    first, second, third = card_numbers(3)
    async with console_as(web, pool, Role.CARD_OFFICE) as (client, _):
        token = csrf_of((await client.get(f"/console/holders/{hid}")).text)

        async def post(path: str, **data: str) -> tuple[int, tuple[str, str, str]]:
            r = await client.post(f"/console/holders/{path}", data={**data, "csrf": token})
            return r.status_code, result(r.text)

        issued = await post(f"{hid}/cards", card_no=first)
        assert issued[0] == 200 and issued[1][:2] == ("active", "发卡成功")
        assert issued[1][2].startswith("卡已启用")
        again = await post(f"{hid}/cards", card_no=first)
        assert again[1][:2] == ("active", "此卡已发过")
        taken = await post(f"{other}/cards", card_no=first)
        assert taken[1][0] == "card_number_taken" and "另一位持卡人" in taken[1][2]
        second_card = await post(f"{hid}/cards", card_no=second)
        assert second_card[1][:2] == ("holder_has_active_card", "持卡人已有一张正常卡")
        lost = await post(f"{hid}/cards/{first}/report-lost")
        assert lost[1][:2] == ("lost", "卡已挂失")
        assert (await post(f"{hid}/cards/{first}/report-lost"))[1][:2] == ("lost", "此前已挂失")
        replaced = await post(f"{hid}/cards/{first}/replace", new_card_no=second)
        assert replaced[1][:2] == ("active", "补卡成功")
        found = await post(f"{hid}/cards/{first}/found")
        assert found[1][:2] == ("invalid_transition", "无法解挂")
        bad_number = await post(f"{hid}/cards/{second}/replace", new_card_no="12")
        assert bad_number == (400, ("invalid_card_no", "卡号格式不正确",
                                    "卡号为 8 到 19 位数字。未做任何更改。"))
        closed = await post(f"{hid}/cards/{second}/close")
        assert closed[1][:2] == ("closed", "卡已注销")
        r = await client.post(f"/console/holders/{hid}/cards", params={"lang": "en"},
                              data={"card_no": third, "daily_limit_yuan": "1.234",
                                    "csrf": token})
        assert r.status_code == 400
        assert result(r.text) == ("invalid_amount", "Amount not accepted", "Nothing was changed.")
        assert "An amount has at most two decimals (fen)." in r.text
        r = await client.post(f"/console/holders/{hid}/cards/{second}/close",
                              data={"csrf": token})  # English now: the cookie remembers
        assert result(r.text) == ("closed", "Already closed",
                                  "The card was already closed; nothing was changed.")
        assert "Result:" not in r.text and "结果" not in r.text


# -- an id that several ledgers have -----------------------------------------------------------


async def same_id_in_two_ledgers(web: WebServer) -> tuple[str, int, int]:
    """A holder id that two ledgers have (names "甲" and "乙"), and the two ledgers."""
    first, hid = await new_holder(web, name="甲")
    second = first + 1
    async with httpx.AsyncClient(base_url=web.base_url, timeout=30) as api:
        r = await api.post("/v1/holders", headers=ADMIN,
                           json={"id": hid, "ledger": second, "name": "乙", "kind": "staff"})
        assert r.status_code == 200 and r.json()["status"] == "created", r.text
    return hid, first, second


def rows(page: str) -> dict[str, str]:
    """table#holders: data-ledger -> the link of the row."""
    return dict(re.findall(r'<tr data-holder-id="[^"]+" data-ledger="(\d+)">\s*<td><a href="'
                           r'([^"]+)"', page))


async def test_an_id_in_two_ledgers_asks_which(
    web: WebServer, pool: asyncpg.Pool, operators_login: None  # noqa: F811
) -> None:
    hid, first, second = await same_id_in_two_ledgers(web)
    async with console_as(web, pool, Role.AUDITOR) as (client, _):
        choice = await client.get(f"/console/holders/{hid}")
        assert choice.status_code == 200
        ids = parse(choice.text).ids
        assert ids["holder-choice"]["data-holder-id"] == hid and "holder" not in ids
        links = {str(first): f"/console/holders/{hid}?ledger={first}",
                 str(second): f"/console/holders/{hid}?ledger={second}"}
        assert rows(choice.text) == links
        found = await client.get("/console/holders", params={"q": hid})
        assert rows(found.text) == links  # the search links to each holder in its ledger
        for ledger, name, other in ((first, "甲", second), (second, "乙", first)):
            page = await client.get(links[str(ledger)])
            assert page.status_code == 200
            shown = parse(page.text).ids
            assert (shown["holder"]["data-ledger"], shown["ledger"]["tag"]) == (str(ledger), "span")
            assert f"{name} ({hid})" in page.text
            assert f'?ledger={other}" data-ledger="{other}"' in page.text  # #same-id links there
            assert "same-id" in shown
        for ledger in ("999999", str(2**40), "-1", "0"):
            assert (await client.get(f"/console/holders/{hid}", params={"ledger": ledger})
                    ).status_code == 404
        assert (await client.get(f"/console/holders/{hid}?ledger=x")).status_code == 400
        _, alone = await new_holder(web)
        page = await client.get(f"/console/holders/{alone}")
        assert page.status_code == 200 and "same-id" not in parse(page.text).ids
        assert (await client.get(f"/console/holders/{alone}?ledger={first}")).status_code == 404


async def test_the_forms_act_in_the_pages_ledger(
    web: WebServer, pool: asyncpg.Pool, operators_login: None  # noqa: F811
) -> None:
    hid, first, second = await same_id_in_two_ledgers(web)
    card, other_card = card_numbers(2)
    async with console_as(web, pool, Role.CARD_OFFICE) as (client, _):
        page = await client.get(f"/console/holders/{hid}", params={"ledger": second})
        token = csrf_of(page.text)
        assert f'action="/console/holders/{hid}/cards?ledger={second}"' in page.text
        unsure = await client.post(f"/console/holders/{hid}/cards",
                                   data={"card_no": card, "csrf": token})
        assert unsure.status_code == 409 and "holder-choice" in parse(unsure.text).ids
        issued = await client.post(f"/console/holders/{hid}/cards", params={"ledger": second},
                                   data={"card_no": card, "csrf": token})
        assert issued.status_code == 200 and result(issued.text)[:2] == ("active", "发卡成功")
        assert _cards(issued.text) == {card: "active"}
        assert _cards((await client.get(f"/console/holders/{hid}?ledger={first}")).text) == {}
        assert await pool.fetchval("SELECT ledger FROM cards WHERE card_no = $1", card) == second
        wrong_page = await client.post(f"/console/holders/{hid}/cards/{card}/report-lost",
                                       params={"ledger": first}, data={"csrf": token})
        assert wrong_page.status_code == 404  # the card is the other ledger's holder's
        lost = await client.post(f"/console/holders/{hid}/cards/{card}/report-lost",
                                 params={"ledger": second}, data={"csrf": token})
        assert result(lost.text)[:2] == ("lost", "卡已挂失")
        code = await client.post(f"/console/holders/{hid}/activation",
                                 params={"ledger": first}, data={"csrf": token})
        assert code.status_code == 200 and "activation-code" not in parse(code.text).ids
        assert result(code.text)[:2] == ("ambiguous_holder", "未生成激活码")
        issued_first = await client.post(f"/console/holders/{hid}/cards", data={
            "card_no": other_card, "csrf": token}, params={"ledger": first, "lang": "en"})
        assert result(issued_first.text)[:2] == ("active", "Card issued")
        assert _cards(issued_first.text) == {other_card: "active"}


def _cards(page: str) -> dict[str, str]:
    return dict(re.findall(r'<tr data-card-no="([^"]+)" data-status="([^"]+)"', page))

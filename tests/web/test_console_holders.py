"""The holder page of the console over HTTP: what a clerk reads after each form (in Chinese by
default, in English with ?lang=en), with ``data-status`` still the outcome's code."""

from __future__ import annotations

import html
import itertools
import os
import re

import asyncpg

from engine.access.roles import Role
from tests.web.conftest import WebServer, csrf_of
from tests.web.test_console import (  # noqa: F401  (fixtures)
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

"""The console's operators page (contract §8, admin only): list, add (password of at least 10
characters), disable; each change in the operator log, and a disabled operator is out."""

from __future__ import annotations

import os
import re

import asyncpg
import httpx
import pytest

from engine.access import oplog
from engine.access.roles import Role
from engine.web.portal import CONSOLE
from tests.web.conftest import WebServer, csrf_of, html_lang, log_in
from tests.web.own_database import own_dsn, own_web  # noqa: F401  (this module's database)
from tests.web.test_console import (  # noqa: F401  (fixtures)
    _N,
    console_as,
    operators_login,
    pool,
)

NEW_PASSWORD = "a new operator 1"


def _row(html: str, username: str) -> tuple[str, str] | None:
    m = re.search(rf'<tr data-username="{re.escape(username)}" data-role="([^"]+)" '
                  r'data-status="([^"]+)"', html)
    return (m.group(1), m.group(2)) if m else None


async def test_add_list_and_disable(
    web: WebServer, pool: asyncpg.Pool, operators_login: None  # noqa: F811
) -> None:
    new = f"clerk{os.getpid()}x{next(_N)}"
    async with console_as(web, pool, Role.ADMIN) as (client, admin):
        page = await client.get("/console/operators")
        assert page.status_code == 200 and _row(page.text, admin) == ("admin", "active")
        token = csrf_of(page.text)
        short = await client.post("/console/operators", data={
            "username": new, "role": "card_office", "password": "too short",
            "password2": "too short", "csrf": token})
        assert short.status_code == 400 and 'data-status="weak_password"' in short.text
        assert _row(short.text, new) is None
        bad_role = await client.post("/console/operators", data={
            "username": new, "role": "topup", "password": NEW_PASSWORD,
            "password2": NEW_PASSWORD, "csrf": token})
        assert 'data-status="invalid_role"' in bad_role.text
        added = await client.post("/console/operators", data={
            "username": new, "role": "card_office", "password": NEW_PASSWORD,
            "password2": NEW_PASSWORD, "csrf": token})
        assert added.status_code == 200 and 'data-status="created"' in added.text
        assert _row(added.text, new) == ("card_office", "active")
        async with httpx.AsyncClient(base_url=web.base_url, timeout=30) as clerk:
            assert (await log_in(clerk, CONSOLE, new, NEW_PASSWORD)).status_code == 303
            assert (await clerk.get("/console/holders")).status_code == 200
            assert (await clerk.get("/console/operators")).status_code == 403
            off = await client.post("/console/operators/disable",
                                    data={"username": new, "csrf": token})
            assert 'data-status="disabled"' in off.text
            assert _row(off.text, new) == ("card_office", "disabled")
            assert (await clerk.get("/console/holders")).status_code == 403  # out at once
            again = await log_in(clerk, CONSOLE, new, NEW_PASSWORD)
            assert again.status_code == 200  # the login form again: refused
    async with pool.acquire() as conn:
        entries, _ = await oplog.page(conn, limit=200, before=None)
    mine = [(e.action, e.target, e.outcome) for e in entries if e.actor == admin]
    assert list(reversed(mine)) == [
        ("console operator add", f"username={new} role=card_office", "created"),
        ("console operator disable", f"username={new}", "disabled"),
    ]
    assert not any(NEW_PASSWORD in (e.target + e.outcome) for e in entries)


@pytest.mark.parametrize("role", [Role.CARD_OFFICE, Role.FINANCE, Role.AUDITOR])
async def test_only_admins_manage_operators(
    web: WebServer, pool: asyncpg.Pool, operators_login: None, role: Role  # noqa: F811
) -> None:
    victim = f"v{os.getpid()}x{next(_N)}"
    async with console_as(web, pool, role) as (client, _):
        assert (await client.get("/console/operators")).status_code == 403
        token = csrf_of((await client.get("/console/holders")).text)
        r = await client.post("/console/operators", data={
            "username": victim, "role": "admin", "password": NEW_PASSWORD, "csrf": token})
        assert r.status_code == 403
    async with pool.acquire() as conn:
        from engine.access.operators import get_operator
        assert await get_operator(conn, victim) is None


async def test_an_admin_cannot_disable_themselves(
    web: WebServer, pool: asyncpg.Pool, operators_login: None  # noqa: F811
) -> None:
    async with console_as(web, pool, Role.ADMIN) as (client, admin):
        page = await client.get("/console/operators")
        assert f'id="disable-{admin}"' not in page.text
        r = await client.post("/console/operators/disable",
                              data={"username": admin, "csrf": csrf_of(page.text)})
        assert r.status_code == 400 and 'data-status="disable_self"' in r.text
        assert _row(r.text, admin) == ("admin", "active")
        assert (await client.get("/console/operators")).status_code == 200


@pytest.mark.parametrize("lang", ["zh-CN", "en"])
@pytest.mark.parametrize("path", [
    "/console/finance", "/console/finance?date=2024-01-01", "/console/subsidies",
    "/console/operators",
])
async def test_every_new_page_in_both_languages(
    web: WebServer, pool: asyncpg.Pool, operators_login: None, path: str, lang: str  # noqa: F811
) -> None:
    async with console_as(web, pool, Role.ADMIN) as (client, _):
        sep = "&" if "?" in path else "?"
        r = await client.get(f"{path}{sep}lang={lang}")
        assert r.status_code == 200 and html_lang(r.text) == lang
        if lang == "zh-CN":  # the page's own words are Chinese
            assert re.search(r"<h1>[^<]*[\u4e00-\u9fff]", r.text), r.text[:800]

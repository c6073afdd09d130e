"""The operator console (contract §8): the operators' login, the role check of every page, the
holder search (an index range scan on 100,000 holders) and the card counter's forms, each
recorded in the operator log with the operator's name."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest

from engine.access import oplog
from engine.access.operators import add_operator
from engine.access.roles import Role
from engine.web.console_login import operator_verifier
from engine.web.console_search import SQL_SEARCH_CARD, SQL_SEARCH_ID, SQL_SEARCH_NAME, prefix_range
from engine.web.portal import CONSOLE
from engine.web.sessions import SessionKind
from engine.web.state import web_state
from tests.web.conftest import WebServer, csrf_of, log_in, parse

ADMIN = {"Authorization": "Bearer admin-token"}
PASSWORD = "counter password 1"
_N = itertools.count(1)


@pytest.fixture
def operators_login(web: WebServer) -> Iterator[None]:
    """The console logs in with the real operators' store for these tests."""
    state = web_state(web.app)
    before = state.verifiers[SessionKind.CONSOLE]
    state.verifiers[SessionKind.CONSOLE] = operator_verifier
    yield
    state.verifiers[SessionKind.CONSOLE] = before


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    yield p
    await p.close()


async def operator(pool: asyncpg.Pool, role: Role) -> str:
    name = f"op{os.getpid()}x{next(_N)}{role.value}"
    await add_operator(pool, username=name, role=role, password=PASSWORD)
    return name


@contextlib.asynccontextmanager
async def console_as(
    web: WebServer, pool: asyncpg.Pool, role: Role
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A browser-like client logged in as a new operator of ``role``, and their username."""
    name = await operator(pool, role)
    async with httpx.AsyncClient(base_url=web.base_url, timeout=30) as client:
        r = await log_in(client, CONSOLE, name, PASSWORD)
        assert r.status_code == 303 and r.headers["location"] == CONSOLE.home, r.text
        yield client, name


async def new_holder(web: WebServer, name: str = "张三") -> tuple[int, str]:
    ledger = 7000 + next(_N) * 7 + os.getpid() % 5
    hid = f"h{os.getpid()}x{next(_N)}"
    async with httpx.AsyncClient(base_url=web.base_url, timeout=30) as api:
        r = await api.post("/v1/holders", headers=ADMIN,
                           json={"id": hid, "ledger": ledger, "name": name, "kind": "student"})
        assert r.status_code == 200, r.text
    return ledger, hid


def _rows(html: str, attr: str) -> dict[str, str]:
    """data-<attr> -> data-status of the rows that carry both."""
    return dict(re.findall(rf'<tr {attr}="([^"]+)" data-status="([^"]+)"', html))


async def test_operator_login_and_wrong_password(
    web: WebServer, pool: asyncpg.Pool, operators_login: None
) -> None:
    name = await operator(pool, Role.AUDITOR)
    async with httpx.AsyncClient(base_url=web.base_url, timeout=30) as c:
        wrong = await log_in(c, CONSOLE, name, "not the password")
        assert wrong.status_code == 200 and 'data-error="wrong"' in wrong.text
        ok = await log_in(c, CONSOLE, name, PASSWORD)
        assert ok.status_code == 303
        home = await c.get("/console")
        assert home.status_code == 200 and name in home.text and 'data-role="auditor"' in home.text


async def test_a_disabled_operator_is_out_at_the_next_page(
    web: WebServer, pool: asyncpg.Pool, operators_login: None
) -> None:
    from engine.access.operators import disable_operator

    async with console_as(web, pool, Role.CARD_OFFICE) as (client, name):
        assert (await client.get("/console/holders")).status_code == 200
        async with pool.acquire() as conn:
            await disable_operator(conn, name)
        assert (await client.get("/console/holders")).status_code == 403
        assert (await client.get("/console")).status_code == 303  # the session is over


@pytest.mark.parametrize("role", [Role.FINANCE, Role.AUDITOR])
async def test_card_forms_are_refused_to_roles_without_campus_writes(
    web: WebServer, pool: asyncpg.Pool, operators_login: None, role: Role
) -> None:
    _, hid = await new_holder(web)
    async with console_as(web, pool, role) as (client, _):
        page = await client.get(f"/console/holders/{hid}")
        assert page.status_code == 200
        assert 'id="issue"' not in page.text and 'id="new-activation"' not in page.text
        token = csrf_of(page.text)  # the logout form's: a valid token of this session
        for path, data in (
            (f"/console/holders/{hid}/cards", {"card_no": "62000000001", "csrf": token}),
            (f"/console/holders/{hid}/activation", {"csrf": token}),
        ):
            r = await client.post(path, data=data)
            assert r.status_code == 403 and 'data-reason="forbidden"' in r.text
        again = await client.get(f"/console/holders/{hid}")
        assert _rows(again.text, "data-card-no") == {}  # nothing was issued


async def test_a_form_without_its_token_changes_nothing(
    web: WebServer, pool: asyncpg.Pool, operators_login: None
) -> None:
    _, hid = await new_holder(web)
    async with console_as(web, pool, Role.CARD_OFFICE) as (client, _):
        r = await client.post(f"/console/holders/{hid}/cards", data={"card_no": "62000000002"})
        assert r.status_code == 403 and 'data-reason="csrf"' in r.text
        page = await client.get(f"/console/holders/{hid}")
        assert _rows(page.text, "data-card-no") == {}


async def test_the_card_counter(web: WebServer, pool: asyncpg.Pool, operators_login: None) -> None:
    _, hid = await new_holder(web, name="Li Counter")
    base = 6_200_000_000 + (os.getpid() % 1000) * 1000 + next(_N) * 10
    first, second = str(base), str(base + 1)
    async with console_as(web, pool, Role.CARD_OFFICE) as (client, clerk):
        found = await client.get("/console/holders", params={"q": hid})
        assert f'data-holder-id="{hid}"' in found.text and 'id="holders"' in found.text
        by_name = await client.get("/console/holders", params={"q": "li coun"})
        assert f'data-holder-id="{hid}"' in by_name.text
        page = await client.get(f"/console/holders/{hid}")
        token = csrf_of(page.text)
        issued = await client.post(f"/console/holders/{hid}/cards", data={
            "card_no": first, "daily_limit_yuan": "50.00", "pin": "1234",
            "pin_threshold_yuan": "20", "csrf": token})
        assert issued.status_code == 200
        assert parse(issued.text).ids["result"]["data-status"] == "active"
        assert _rows(issued.text, "data-card-no") == {first: "active"}
        by_card = await client.get("/console/holders", params={"q": first[:9]})
        assert f'data-holder-id="{hid}"' in by_card.text
        lost = await client.post(f"/console/holders/{hid}/cards/{first}/report-lost",
                                 data={"csrf": token})
        assert _rows(lost.text, "data-card-no") == {first: "lost"}
        new = await client.post(f"/console/holders/{hid}/cards/{first}/replace",
                                data={"new_card_no": second, "csrf": token})
        assert _rows(new.text, "data-card-no") == {first: "replaced", second: "active"}
        bad = await client.post(f"/console/holders/{hid}/cards", data={
            "card_no": "12", "csrf": token})
        assert bad.status_code == 400 and 'data-status="invalid_card_no"' in bad.text
        code = await client.post(f"/console/holders/{hid}/activation", data={"csrf": token})
        shown = parse(code.text).ids["activation-code"]
        assert shown["tag"] == "strong"
        assert re.search(r'id="activation-code">(\d{8})<', code.text)
        closed = await client.post(f"/console/holders/{hid}/cards/{second}/close",
                                   data={"csrf": token})
        assert _rows(closed.text, "data-card-no")[second] == "closed"
        other = await client.post(f"/console/holders/{hid}/cards/99999999999/close",
                                  data={"csrf": token})
        assert other.status_code == 404
    async with pool.acquire() as conn:
        entries, _ = await oplog.page(conn, limit=200, before=None)
    mine = [(e.action, e.target, e.outcome) for e in entries if e.actor == clerk]
    assert all(e.role == "card_office" for e in entries if e.actor == clerk)
    assert list(reversed(mine)) == [
        ("console issue card", f"{hid} {first}", "active"),
        ("console card report-lost", f"{hid} {first}", "lost"),
        ("console card replace", f"{hid} {first} -> {second}", "active"),
        ("console activation", hid, "created"),
        ("console card close", f"{hid} {second}", "closed"),
    ]


async def test_the_activation_code_works_for_the_holder(
    web: WebServer, pool: asyncpg.Pool, operators_login: None
) -> None:
    from engine.access.holders import activate

    _, hid = await new_holder(web)
    async with console_as(web, pool, Role.ADMIN) as (client, _):
        page = await client.get(f"/console/holders/{hid}")
        token = csrf_of(page.text)
        r = await client.post(f"/console/holders/{hid}/activation", data={"csrf": token})
    m = re.search(r'id="activation-code">(\d{8})<', r.text)
    assert m
    done = await activate(pool, hid, m.group(1), "a new password")
    assert done.outcome.value == "ok"


# -- the search's indexes --------------------------------------------------------------------


def test_prefix_range() -> None:
    assert prefix_range("62") == ("62", "63")
    assert prefix_range("张") == ("张", chr(ord("张") + 1))
    assert prefix_range("a\U0010ffff") == ("a\U0010ffff", "b")


async def test_search_is_an_index_range_scan_on_100000_holders(dsn: str) -> None:
    """Each of the three searches, as the generic plan of a prepared statement (what asyncpg
    ends up running), on 100,000 holders with a card each: an index scan, never a Seq Scan."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await _fill(conn, ledger=990_001, count=100_000)
            await conn.execute("ANALYZE holders; ANALYZE cards")
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            for sql, key in ((SQL_SEARCH_ID, "s1234"), (SQL_SEARCH_NAME, "name 1234"),
                             (SQL_SEARCH_CARD, "880001234")):
                low, high = prefix_range(key)
                plan = "\n".join(r[0] for r in await conn.fetch(
                    "EXPLAIN " + sql, low, high, 50))
                assert "Index" in plan and "Seq Scan" not in plan, plan
                rows = await conn.fetch(sql, low, high, 50)
                assert 1 <= len(rows) <= 50
            raise _Rollback
    except _Rollback:
        pass
    finally:
        await conn.close()


class _Rollback(Exception):
    pass


async def _fill(conn: asyncpg.Connection, *, ledger: int, count: int) -> None:
    await conn.execute("""
        INSERT INTO accounts (ledger, id, kind, code, flags, holder_id, created_at)
        SELECT $1, g, CASE WHEN g % 2 = 0 THEN 'purse' ELSE 'subsidy' END, 1, 0,
               's' || (g / 2), 0 FROM generate_series(2, $2 * 2 + 1) g""", ledger, count)
    await conn.execute("""
        INSERT INTO holders (ledger, id, name, kind, purse_account_id, subsidy_account_id,
                             created_at)
        SELECT $1, 's' || g, 'Name ' || g, 'student', g * 2, g * 2 + 1, 0
        FROM generate_series(1, $2) g""", ledger, count)
    await conn.execute("""
        INSERT INTO cards (ledger, card_no, holder_id, status, created_at, updated_at)
        SELECT $1, (880000000 + g)::text, 's' || g, 'active', 0, 0
        FROM generate_series(1, $2) g""", ledger, count)




@pytest.mark.parametrize(("role", "status"), [
    (Role.ADMIN, 200), (Role.AUDITOR, 200), (Role.CARD_OFFICE, 403), (Role.FINANCE, 403),
])
async def test_the_operator_log_page(
    web: WebServer, pool: asyncpg.Pool, operators_login: None, role: Role, status: int
) -> None:
    async with console_as(web, pool, role) as (client, _):
        r = await client.get("/console/log")
        assert r.status_code == status
        if status == 200:
            assert 'id="operator-log"' in r.text
            if 'rel="next"' in r.text:
                href = re.search(r'rel="next" href="([^"]+)"', r.text)
                assert href and (await client.get(href.group(1))).status_code == 200
        en = await client.get("/console/log", params={"lang": "en"})
        assert 'lang="en"' in en.text

"""Form tokens: a POST without the right ``csrf`` is 403 and its handler never runs."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from engine.web.portal import CONSOLE, SELF, Portal
from tests.web.conftest import BUMPS, PORTALS, WebServer, csrf_of, log_in, new_user, parse


def _refused(r: httpx.Response) -> None:
    assert r.status_code == 403, r.text
    page = parse(r.text).ids["error-page"]
    assert page["data-status"] == "403" and page["data-reason"] == "csrf"
    assert r.headers["content-type"].startswith("text/html")


async def _sessions_of(dsn: str, subject: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count = "SELECT count(*) FROM web_sessions WHERE subject = $1"
        n: int = await conn.fetchval(count, subject)
    finally:
        await conn.close()
    return n


def _wrong_tokens(good: str) -> list[dict[str, object]]:
    flipped = ("A" if good[0] != "A" else "B") + good[1:]
    return [
        {},  # none
        {"csrf": ""},
        {"csrf": flipped},
        {"csrf": good[:-1]},
        {"csrf": good + "A"},
        {"csrf": "令牌" + good},  # not ASCII: still a plain refusal
        {"csrf": [good, good]},  # two values
    ]


@PORTALS
async def test_a_login_without_the_right_token_is_refused(
    client: httpx.AsyncClient, web: WebServer, dsn: str, portal: Portal
) -> None:
    user = new_user(web)
    form = await client.get(portal.login)
    good = csrf_of(form.text)
    for extra in _wrong_tokens(good):
        data = {portal.subject_field: user, "password": "correct horse 1", **extra}
        r = await client.post(portal.login, data=data)  # type: ignore[arg-type]
        _refused(r)
        assert portal.cookie not in r.cookies
    assert await _sessions_of(dsn, user) == 0
    # the same form with its own token gets in
    r = await client.post(
        portal.login, data={portal.subject_field: user, "password": "correct horse 1", "csrf": good}
    )
    assert r.status_code == 303 and await _sessions_of(dsn, user) == 1


async def test_a_login_token_is_bound_to_its_browser_and_its_portal(
    client: httpx.AsyncClient, web: WebServer, dsn: str
) -> None:
    user = new_user(web)
    # an attacker fetches a login form in their own browser and makes the victim post it
    async with httpx.AsyncClient(base_url=web.base_url) as attacker:
        theirs = csrf_of((await attacker.get(SELF.login)).text)
    await client.get(SELF.login)  # the victim has a pre-session cookie of their own
    data = {"holder_id": user, "password": "correct horse 1", "csrf": theirs}
    _refused(await client.post(SELF.login, data=data))
    # the console's form token does not open /self
    console = csrf_of((await client.get(CONSOLE.login)).text)
    _refused(await client.post(SELF.login, data={**data, "csrf": console}))
    # a browser without the pre-session cookie has no valid token at all
    fresh = csrf_of((await client.get(SELF.login)).text)
    client.cookies.delete(SELF.pre_cookie)
    _refused(await client.post(SELF.login, data={**data, "csrf": fresh}))
    assert await _sessions_of(dsn, user) == 0


async def test_a_logged_in_form_without_the_right_token_changes_nothing(
    client: httpx.AsyncClient, web: WebServer
) -> None:
    user = new_user(web)
    await log_in(client, SELF, user, "correct horse 1")
    good = csrf_of((await client.get(SELF.home)).text)
    login_token = csrf_of((await client.get(SELF.login)).text)  # the pre-login kind
    for extra in [*_wrong_tokens(good), {"csrf": login_token}]:
        _refused(await client.post("/self/_test/bump", data=extra))  # type: ignore[arg-type]
    assert user not in BUMPS
    # the token of another holder's session does not do either
    other = new_user(web)
    async with httpx.AsyncClient(base_url=web.base_url) as theirs:
        await log_in(theirs, SELF, other, "correct horse 1")
        their_token = csrf_of((await theirs.get(SELF.home)).text)
    _refused(await client.post("/self/_test/bump", data={"csrf": their_token}))
    assert user not in BUMPS
    r = await client.post("/self/_test/bump", data={"csrf": good})
    assert r.status_code == 200 and BUMPS.count(user) == 1


async def test_a_token_travels_only_in_the_form_body(
    client: httpx.AsyncClient, web: WebServer
) -> None:
    user = new_user(web)
    await log_in(client, SELF, user, "correct horse 1")
    good = csrf_of((await client.get(SELF.home)).text)
    _refused(await client.post("/self/_test/bump", params={"csrf": good}))
    _refused(await client.post("/self/_test/bump", headers={"X-CSRF-Token": good}))
    assert user not in BUMPS


@PORTALS
async def test_logout_without_the_token_keeps_the_session(
    client: httpx.AsyncClient, web: WebServer, dsn: str, portal: Portal
) -> None:
    user = new_user(web)
    await log_in(client, portal, user, "correct horse 1")
    good = csrf_of((await client.get(portal.home)).text)
    for extra in _wrong_tokens(good):
        _refused(await client.post(f"{portal.prefix}/logout", data=extra))  # type: ignore[arg-type]
    assert (await client.get(portal.home)).status_code == 200
    assert await _sessions_of(dsn, user) == 1


async def test_a_form_of_an_ended_session_is_refused(
    client: httpx.AsyncClient, web: WebServer
) -> None:
    user = new_user(web)
    await log_in(client, SELF, user, "correct horse 1")
    good = csrf_of((await client.get(SELF.home)).text)
    web.clock.advance(31 * 60)
    r = await client.post("/self/_test/bump", data={"csrf": good})
    _refused(r)
    assert "登录" in r.text and parse(r.text).ids  # the page offers the login again
    assert user not in BUMPS


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data; boundary=x", b"--x\r\nbroken"),
        ("application/x-www-form-urlencoded", b"%zz=%%&&=&csrf"),
        ("application/json", b'{"csrf": "x"}'),
        ("text/plain", b"\xff\xfe\x00"),
    ],
)
async def test_malformed_bodies_are_refused_not_errors(
    client: httpx.AsyncClient, web: WebServer, content_type: str, body: bytes
) -> None:
    await client.get(SELF.login)
    r = await client.post(SELF.login, content=body, headers={"Content-Type": content_type})
    assert r.status_code in (400, 403), r.text
    assert r.headers["content-type"].startswith("text/html")

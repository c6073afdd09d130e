"""Sessions of the web pages: cookies, rotation at login, idle expiry, logout, one kind each."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from litestar import Litestar

from engine import limits
from engine.service import Engine
from engine.web import sessions
from engine.web.auth import LoginOutcome, refuse_all
from engine.web.portal import CONSOLE, SELF, Portal
from engine.web.sessions import SessionKind
from engine.web.state import web_state
from tests.conftest import Api
from tests.web.conftest import PORTALS, WebServer, csrf_of, log_in, new_user, parse


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()


def _set_cookie(response: httpx.Response, name: str) -> str:
    found = [h for h in response.headers.get_list("set-cookie") if h.startswith(name + "=")]
    assert len(found) == 1, response.headers.get_list("set-cookie")
    return found[0]


def _attributes(header: str) -> dict[str, str]:
    parts = [p.strip() for p in header.split(";")[1:]]
    return {p.partition("=")[0].lower(): p.partition("=")[2] for p in parts}


async def _rows(db: asyncpg.Connection, kind: SessionKind, subject: str) -> int:
    n: int = await db.fetchval(
        "SELECT count(*) FROM web_sessions WHERE kind = $1 AND subject = $2", kind.value, subject
    )
    return n


@PORTALS
async def test_login_starts_a_session_with_a_safe_cookie(
    client: httpx.AsyncClient, web: WebServer, db: asyncpg.Connection, portal: Portal
) -> None:
    user = new_user(web)
    r = await log_in(client, portal, user, "correct horse 1")
    assert r.status_code == 303 and r.headers["location"] == portal.home
    header = _set_cookie(r, portal.cookie)
    value = header.split(";")[0].split("=", 1)[1]
    assert len(value) >= 43  # 32 random bytes
    attrs = _attributes(header)
    assert "httponly" in attrs and attrs["samesite"].lower() == "lax"
    assert attrs["path"] == portal.prefix  # the other portal never sees it
    assert "secure" not in attrs  # ONECARD_COOKIE_SECURE is not set here
    assert "max-age" not in attrs and "expires" not in attrs  # the server decides when it ends
    home = await client.get(portal.home)
    assert home.status_code == 200 and parse(home.text).ids["subject"]
    assert user in home.text
    # the table keeps the id's hash, never the id
    stored = await db.fetch(
        "SELECT id_hash FROM web_sessions WHERE kind = $1 AND subject = $2", portal.kind, user
    )
    assert [r["id_hash"] for r in stored] == [hashlib.sha256(value.encode()).digest()]
    count = "SELECT count(*) FROM web_sessions WHERE id_hash = $1"
    assert await db.fetchval(count, value.encode()) == 0


async def test_cookies_are_secure_when_set_so(
    client: httpx.AsyncClient, web: WebServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = web_state(web.app)
    monkeypatch.setattr(state, "cookie_secure", True)
    form = await client.get(SELF.login, params={"lang": "en"})
    for name in (SELF.pre_cookie, "onecard_lang"):
        assert "secure" in _attributes(_set_cookie(form, name)), name
    user = new_user(web)
    # httpx keeps Secure cookies off plain http: this one is sent by hand
    pre = _set_cookie(form, SELF.pre_cookie).split(";")[0]
    r = await client.post(
        SELF.login,
        data={"holder_id": user, "password": "correct horse 1", "csrf": csrf_of(form.text)},
        headers={"Cookie": pre},
    )
    assert r.status_code == 303
    assert "secure" in _attributes(_set_cookie(r, SELF.cookie))


def test_the_secure_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONECARD_COOKIE_SECURE", "1")
    assert web_state(Litestar([])).cookie_secure is True
    monkeypatch.setenv("ONECARD_COOKIE_SECURE", "0")
    assert web_state(Litestar([])).cookie_secure is False


@PORTALS
async def test_every_login_is_a_new_session_and_ends_the_old(
    client: httpx.AsyncClient, web: WebServer, portal: Portal
) -> None:
    # Fixation: a session id the browser had before (here: planted by someone else who logged
    # in) is ended by the login, and the login gets a new id.
    intruder = new_user(web)
    await log_in(client, portal, intruder, "correct horse 1")
    planted = client.cookies.get(portal.cookie)
    assert planted
    victim = new_user(web)
    r = await log_in(client, portal, victim, "correct horse 1")
    fresh = client.cookies.get(portal.cookie)
    assert r.status_code == 303 and fresh and fresh != planted
    async with httpx.AsyncClient(base_url=web.base_url) as other:
        other.cookies.set(portal.cookie, planted)
        stale = await other.get(portal.home)
        assert stale.status_code == 303 and stale.headers["location"] == portal.login
        assert 'max-age=0' in _set_cookie(stale, portal.cookie).lower()  # forgotten
    assert victim in (await client.get(portal.home)).text


async def test_a_session_expires_after_30_idle_minutes(
    client: httpx.AsyncClient, web: WebServer
) -> None:
    user = new_user(web)
    await log_in(client, SELF, user, "correct horse 1")
    idle = limits.WEB_SESSION_IDLE_S
    # used every 29 minutes, it lives on
    for _ in range(3):
        web.clock.advance(idle - 60)
        assert (await client.get(SELF.home)).status_code == 200
    web.clock.advance(idle + 1)
    r = await client.get(SELF.home)
    assert r.status_code == 303 and r.headers["location"] == SELF.login


@PORTALS
async def test_logout_ends_the_session(
    client: httpx.AsyncClient, web: WebServer, db: asyncpg.Connection, portal: Portal
) -> None:
    user = new_user(web)
    await log_in(client, portal, user, "correct horse 1")
    cookie = client.cookies.get(portal.cookie)
    home = await client.get(portal.home)
    r = await client.post(f"{portal.prefix}/logout", data={"csrf": csrf_of(home.text)})
    assert r.status_code == 303 and r.headers["location"] == portal.login
    assert "max-age=0" in _set_cookie(r, portal.cookie).lower()
    assert await _rows(db, portal.kind, user) == 0
    async with httpx.AsyncClient(base_url=web.base_url) as other:
        other.cookies.set(portal.cookie, cookie or "")
        assert (await other.get(portal.home)).status_code == 303


async def test_logout_without_a_session_goes_to_the_login(client: httpx.AsyncClient) -> None:
    r = await client.post("/self/logout")  # nothing to end, nothing to protect
    assert r.status_code == 303 and r.headers["location"] == SELF.login


async def test_a_session_opens_only_its_own_portal(
    client: httpx.AsyncClient, web: WebServer
) -> None:
    user = new_user(web)
    await log_in(client, SELF, user, "correct horse 1")
    holder_cookie = client.cookies.get(SELF.cookie)
    async with httpx.AsyncClient(base_url=web.base_url) as other:
        other.cookies.set(CONSOLE.cookie, holder_cookie or "")
        r = await other.get(CONSOLE.home)
    assert r.status_code == 303 and r.headers["location"] == CONSOLE.login


@PORTALS
async def test_a_wrong_login_shows_the_form_again(
    client: httpx.AsyncClient, web: WebServer, db: asyncpg.Connection, portal: Portal
) -> None:
    user = new_user(web)
    for password in ("wrong password", "", "x" * (limits.WEB_MAX_FIELD_CHARS + 1), "a\x00b"):
        r = await log_in(client, portal, user, password)
        assert r.status_code == 200
        error = parse(r.text).ids["error"]
        assert error["data-error"] == "wrong"
        assert portal.cookie not in r.cookies
        assert f'value="{user}"' in r.text  # the id is kept in the form
    assert await _rows(db, portal.kind, user) == 0


async def test_a_locked_id_says_so(client: httpx.AsyncClient, web: WebServer) -> None:
    user = new_user(web)
    web.book.locked.add(user)
    r = await log_in(client, SELF, user, "correct horse 1")  # the right password, locked
    assert r.status_code == 200 and SELF.cookie not in r.cookies
    assert parse(r.text).ids["error"]["data-error"] == "locked"
    assert "15 分钟" in r.text
    r = await client.get(SELF.login, params={"lang": "en"})
    r = await client.post(
        SELF.login, data={"holder_id": user, "password": "x", "csrf": csrf_of(r.text)}
    )
    assert "try again in 15 minutes" in r.text


async def test_without_a_password_store_nobody_gets_in(api: Api, http: httpx.AsyncClient) -> None:
    # the shared API fixture's app: nothing installed a verifier for its portals
    form = await http.get(SELF.login)
    r = await http.post(
        SELF.login,
        data={"holder_id": "1", "password": "anything at all", "csrf": csrf_of(form.text)},
    )
    assert r.status_code == 200 and parse(r.text).ids["error"]["data-error"] == "wrong"
    verdict = await refuse_all(Engine("postgresql://nowhere"), "1", "x", now=0.0)
    assert verdict.outcome is LoginOutcome.WRONG


# -- the sessions module on the database ---------------------------------------------------


async def test_idle_expiry_to_the_second(engine: Engine) -> None:
    pool = engine.store.pool
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    sid, started = await sessions.start(pool, SessionKind.SELF, "s1", now=t0, replacing=None)
    idle = timedelta(seconds=limits.WEB_SESSION_IDLE_S)
    found = await sessions.find(pool, SessionKind.SELF, sid, now=t0 + idle - timedelta(seconds=1))
    assert found is not None and found.subject == "s1" and found.csrf == started.csrf
    # that use was written: the session now lives until a full idle period after it
    later = t0 + 2 * idle - timedelta(seconds=2)
    assert await sessions.find(pool, SessionKind.SELF, sid, now=later) is not None
    assert await sessions.find(pool, SessionKind.SELF, sid, now=later + idle) is None
    assert await sessions.find(pool, SessionKind.CONSOLE, sid, now=t0) is None  # other kind


async def test_uses_are_written_at_most_once_a_minute(
    engine: Engine, db: asyncpg.Connection
) -> None:
    pool = engine.store.pool
    t0 = datetime(2031, 1, 1, tzinfo=UTC)
    sid, s = await sessions.start(pool, SessionKind.SELF, "s2", now=t0, replacing=None)
    last_seen = "SELECT last_seen FROM web_sessions WHERE id_hash = $1"
    touch = timedelta(seconds=limits.WEB_SESSION_TOUCH_S)
    await sessions.find(pool, SessionKind.SELF, sid, now=t0 + touch - timedelta(seconds=1))
    assert await db.fetchval(last_seen, s.id_hash) == t0
    await sessions.find(pool, SessionKind.SELF, sid, now=t0 + touch)
    assert await db.fetchval(last_seen, s.id_hash) == t0 + touch


async def test_a_login_deletes_expired_sessions(engine: Engine, db: asyncpg.Connection) -> None:
    pool = engine.store.pool
    t0 = datetime(2032, 1, 1, tzinfo=UTC)
    _, old = await sessions.start(pool, SessionKind.SELF, "s3", now=t0, replacing=None)
    later = t0 + timedelta(seconds=limits.WEB_SESSION_IDLE_S)
    await sessions.start(pool, SessionKind.SELF, "s4", now=later, replacing=None)
    count = "SELECT count(*) FROM web_sessions WHERE id_hash = $1"
    assert await db.fetchval(count, old.id_hash) == 0


async def test_end_all_of_a_subject(engine: Engine) -> None:
    pool = engine.store.pool
    t0 = datetime(2033, 1, 1, tzinfo=UTC)
    ids = [
        (await sessions.start(pool, kind, "s5", now=t0, replacing=None))[0]
        for kind in (SessionKind.SELF, SessionKind.SELF, SessionKind.CONSOLE)
    ]
    assert await sessions.end_all(pool, SessionKind.SELF, "s5") == 2
    assert await sessions.find(pool, SessionKind.SELF, ids[0], now=t0) is None
    assert await sessions.find(pool, SessionKind.CONSOLE, ids[2], now=t0) is not None


@pytest.mark.parametrize("bad", ["", "x" * 65, "not a session", "\udcff\x00"])
async def test_unknown_ids_find_nothing(engine: Engine, bad: str) -> None:
    now = datetime(2034, 1, 1, tzinfo=UTC)
    assert await sessions.find(engine.store.pool, SessionKind.SELF, bad, now=now) is None

"""The web pages on a real server for httpx and for a headless Chromium.

The server (the whole app of ``create_app``, its own engine on the session database) runs in a
thread with its own event loop: Selenium blocks its caller, and a server in the test's own loop
would then never answer. Its clock is the wall clock plus an offset the tests move forward
(``web.clock.advance``), and its portals log in through ``PasswordBook``, a small real
verifier kept by the tests (the console's pages also need the subject to be an operator:
``OperatorBook``; tests/web/test_console.py logs in with the real operators' store).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from litestar import Request, Response, get, post

from engine.access.operators import add_operator
from engine.access.roles import Role
from engine.http.app import create_app
from engine.service import Engine
from engine.web.auth import LoginOutcome, Verdict
from engine.web.gate import ACCESS, PORTAL, Access, after, current_session, gate
from engine.web.portal import CONSOLE, SELF, Portal
from engine.web.sessions import SessionKind
from engine.web.state import web_state
from tests.conftest import live_server

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PHONE = (390, 844)  # CSS pixels of the browser's viewport


class MovableClock:
    """The wall clock plus an offset that only grows (thread-safe enough: a float store)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        """Move time forward for the server."""
        self.offset += seconds


@dataclass
class PasswordBook:
    """The tests' password store: a dict, and a set of locked ids."""

    passwords: dict[str, str] = field(default_factory=dict)
    locked: set[str] = field(default_factory=set)

    async def __call__(self, engine: Engine, subject: str, password: str, *, now: float) -> Verdict:
        if subject in self.locked:
            return Verdict(LoginOutcome.LOCKED, retry_after_s=14 * 60 + 1)
        stored = self.passwords.get(subject)
        if stored is None or not hmac.compare_digest(stored.encode(), password.encode()):
            return Verdict(LoginOutcome.WRONG)
        return Verdict(LoginOutcome.OK, subject=subject)


@dataclass
class OperatorBook:
    """The console's verifier in these tests: the password book, and every subject it lets in
    is (made) a real admin operator, since each console page re-reads its operator."""

    book: PasswordBook

    async def __call__(self, engine: Engine, subject: str, password: str, *, now: float) -> Verdict:
        verdict = await self.book(engine, subject, password, now=now)
        if verdict.outcome is LoginOutcome.OK:
            await add_operator(engine.store.pool, username=subject, role=Role.ADMIN,
                               password=password)
        return verdict


@dataclass
class WebServer:
    """The live web pages."""

    base_url: str
    clock: MovableClock
    book: PasswordBook
    app: Any


# -- test-only pages, behind the same gate as every portal page ---------------------------------

_TEST_PAGE: dict[str, Any] = {
    "opt": {PORTAL: SELF},
    "before_request": gate,
    "after_request": after,
    "include_in_schema": False,
}
BUMPS: list[str] = []  # who POSTed /self/_test/bump: what a refused form must not change


@post("/self/_test/bump", status_code=200, **_TEST_PAGE)
async def _bump(request: Request[Any, Any, Any]) -> Response[bytes]:
    session = current_session(request)
    assert session is not None
    BUMPS.append(session.subject)
    return Response(b"bumped", media_type="text/plain")


@get("/self/_test/boom", **{**_TEST_PAGE, "opt": {PORTAL: SELF, ACCESS: Access.PUBLIC}})
async def _boom(request: Request[Any, Any, Any]) -> Response[bytes]:
    raise RuntimeError("a bug with a secret detail")


@get("/self/_test/db-away", **{**_TEST_PAGE, "opt": {PORTAL: SELF, ACCESS: Access.PUBLIC}})
async def _db_away(request: Request[Any, Any, Any]) -> Response[bytes]:
    raise asyncpg.PostgresConnectionError("host=secret port=5432")


TEST_PAGES = [_bump, _boom, _db_away]


@pytest.fixture(scope="session")
def web(dsn: str) -> Iterator[WebServer]:
    """The app (API and pages) on a free port, served from its own thread."""
    with serving(dsn) as server:
        yield server


@contextlib.contextmanager
def serving(dsn: str) -> Iterator[WebServer]:
    """The app over the database ``dsn`` on a free port, served from its own thread."""
    clock, book = MovableClock(), PasswordBook()
    ready: dict[str, Any] = {}
    started, stop = threading.Event(), threading.Event()

    async def serve() -> None:
        engine = Engine(dsn)
        await engine.start(run_migrations=False)
        app = create_app(
            engine, admin_token="admin-token", read_token="read-token", extra_routes=TEST_PAGES
        )
        state = web_state(app)
        state.clock = clock
        state.verifiers = {SessionKind.SELF: book, SessionKind.CONSOLE: OperatorBook(book)}
        try:
            async with live_server(app) as base_url:
                ready.update(base_url=base_url, app=app)
                started.set()
                await asyncio.to_thread(stop.wait)
        finally:
            await engine.stop()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as e:
            ready["error"] = e
            started.set()

    thread = threading.Thread(target=run, name="web-server", daemon=True)
    thread.start()
    started.wait(30)
    if "error" in ready:
        raise ready["error"]
    yield WebServer(ready["base_url"], clock, book, ready["app"])
    stop.set()
    thread.join(30)


@pytest.fixture
async def client(web: WebServer) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like httpx client (keeps cookies, does not follow redirects)."""
    async with httpx.AsyncClient(base_url=web.base_url, timeout=30) as c:
        yield c


_COUNTER = iter(range(1, 10**9))


def new_user(web: WebServer, password: str = "correct horse 1") -> str:
    """A subject the password book knows, unique in the session."""
    subject = f"u{os.getpid()}x{next(_COUNTER)}"
    web.book.passwords[subject] = password
    return subject


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.csrf: list[str] = []
        self.ids: dict[str, dict[str, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "input" and a.get("name") == "csrf":
            self.csrf.append(a.get("value") or "")
        if a.get("id"):
            self.ids[str(a["id"])] = {"tag": tag, **a}


def parse(html: str) -> _Forms:
    """The page's csrf fields and its elements by id."""
    p = _Forms()
    p.feed(html)
    return p


def csrf_of(html: str) -> str:
    """The page's (first) form token."""
    tokens = parse(html).csrf
    assert tokens, "no csrf field on the page"
    return tokens[0]


async def log_in(
    client: httpx.AsyncClient, portal: Portal, subject: str, password: str
) -> httpx.Response:
    """Log in through the form like a browser (GET the form, POST it with its token)."""
    form = await client.get(portal.login)
    assert form.status_code == 200, form.text
    return await client.post(
        portal.login,
        data={portal.subject_field: subject, "password": password, "csrf": csrf_of(form.text)},
    )


PORTALS = pytest.mark.parametrize("portal", [SELF, CONSOLE], ids=["self", "console"])


def html_lang(html: str) -> str:
    """The page's <html lang>."""
    m = re.search(r'<html lang="([^"]+)"', html)
    assert m, "no <html lang>"
    return m.group(1)


# -- the browser ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def driver() -> Iterator[Any]:
    """Debian's headless Chromium through its chromedriver (Selenium Manager never downloads:
    both paths are given). Missing locally: skipped; missing in CI: an error."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("apt-get install chromium chromium-driver to run the browser tests")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    # a phone's viewport (a window cannot be made narrower than ~500 px; emulation can)
    phone = {"width": PHONE[0], "height": PHONE[1], "pixelRatio": 1.0}
    options.add_experimental_option("mobileEmulation", {"deviceMetrics": phone})
    # headless Chromium ignores --lang for Accept-Language: a Chinese browser is set so
    options.add_experimental_option("prefs", {"intl.accept_languages": "zh-CN,zh"})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    d.set_page_load_timeout(30)
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture
def browser(driver: Any, web: WebServer) -> Iterator[Any]:
    """The shared browser with no cookies of earlier tests."""
    driver.get(web.base_url + "/static/onecard.css")  # a page of the site, to reach its cookies
    driver.delete_all_cookies()
    yield driver


def screenshot(driver: Any, name: str) -> Path:
    """Save the window as test-artifacts/screenshots/<name>.png (not committed)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path

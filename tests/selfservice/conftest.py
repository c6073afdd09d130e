"""/self as ``onecard serve`` runs it: the whole app (API and pages) and the terminal gateway
over one engine and one Campus, in a thread of their own (Selenium blocks its caller), on real
sockets, with the real password store (engine/access: activation codes, Argon2id, lockout).
Holders, cards, rooms, residents, activation codes and money are made through the API
(``World``), and passwords chosen on /self/activate; terminal payments go over real TCP to the
gateway; pages are read like a browser reads them (httpx with cookies, or headless Chromium).
The server's clock (sessions, lockout, activation expiry) is the wall clock plus an offset the
tests move forward.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest

from engine.campus import Campus
from engine.http.app import create_app
from engine.service import Engine
from engine.web.portal import SELF
from engine.web.state import web_state
from terminals.client import TerminalClient
from terminals.gateway import Gateway
from tests.conftest import _IDS as SESSION_IDS
from tests.conftest import live_server
from tests.web.conftest import MovableClock, csrf_of, driver  # noqa: F401

ADMIN = {"Authorization": "Bearer admin-token"}
PASSWORD = "correct horse 1"


@dataclass
class SelfWeb:
    """The live app and gateway."""

    base_url: str
    iso_port: int
    clock: MovableClock
    app: Any
    dsn: str


@pytest.fixture(scope="session")
def selfweb(dsn: str) -> Iterator[SelfWeb]:
    """The app and the gateway on free ports, served from their own thread and loop."""
    clock = MovableClock()
    ready: dict[str, Any] = {}
    started, stop = threading.Event(), threading.Event()

    async def serve() -> None:
        engine = Engine(dsn)
        await engine.start(run_migrations=False)
        campus = Campus(engine)
        app = create_app(engine, admin_token="admin-token", read_token="read-token")
        app.state.campus = campus  # one Campus for both doors, as onecard serve wires it
        web_state(app).clock = clock  # the verifier and activator are the real ones
        gateway = Gateway(engine, campus=campus)
        await gateway.start("127.0.0.1", 0)
        try:
            async with live_server(app) as base_url:
                ready.update(base_url=base_url, app=app, iso_port=gateway.port)
                started.set()
                await asyncio.to_thread(stop.wait)
        finally:
            await gateway.stop()
            await engine.stop()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as e:
            ready["error"] = e
            started.set()

    thread = threading.Thread(target=run, name="self-web-server", daemon=True)
    thread.start()
    started.wait(60)
    if "error" in ready:
        raise ready["error"]
    yield SelfWeb(ready["base_url"], ready["iso_port"], clock, ready["app"], dsn)
    stop.set()
    thread.join(30)


@dataclass
class Student:
    """A holder with a card (and maybe a room), made through the API."""

    holder_id: str
    ledger: int
    card_no: str
    purse: int
    subsidy: int
    pin: str | None
    password: str = PASSWORD
    room_id: str | None = None
    room_account: int | None = None


# Ledger and account ids no other test of the session uses (the session's own id source).
_IDS = SESSION_IDS


@dataclass
class World:
    """A fresh ledger with a bank, a subsidy fund, a canteen POS terminal and a power utility."""

    web: SelfWeb
    http: httpx.AsyncClient
    ledger: int = field(default_factory=_IDS.ledger)
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    clients: list[TerminalClient] = field(default_factory=list)

    async def setup(self) -> World:
        self.bank, self.fund, self.canteen, self.power = _IDS.accounts(4)
        accounts = [
            {"id": self.bank, "ledger": self.ledger, "kind": "clearing", "code": 1},
            {"id": self.fund, "ledger": self.ledger, "kind": "fund", "code": 1},
            {"id": self.canteen, "ledger": self.ledger, "kind": "merchant", "code": 1},
            {"id": self.power, "ledger": self.ledger, "kind": "utility", "code": 3},
        ]
        r = await self.http.post("/v1/accounts", json=accounts, headers=ADMIN)
        assert [a["status"] for a in r.json()] == ["created"] * 4, r.text
        self.tid = "W" + secrets.token_hex(4)[:7].upper()
        self.mid = "M" + self.tid + "000000"
        r = await self.http.post("/v1/terminals", headers=ADMIN, json={
            "terminal_id": self.tid, "merchant_id": self.mid, "ledger": self.ledger,
            "kind": "pos", "account_id": self.canteen, "mac_key": self.key.hex()})
        assert r.json()["status"] == "created", r.text
        return self

    async def student(
        self, *, cash: int = 0, subsidy: int = 0, room: bool = False, room_fen: int = 0,
        activated: bool = True, **card: Any,
    ) -> Student:
        """A holder with an active card (``card``: daily_limit, pin, pin_threshold) and, when
        ``activated``, a password."""
        holder = "S" + secrets.token_hex(5)
        r = await self.http.post("/v1/holders", headers=ADMIN, json={
            "id": holder, "ledger": self.ledger, "name": f"Student {holder}", "kind": "student"})
        h = r.json()
        card_no = "62" + "".join(secrets.choice("0123456789") for _ in range(14))
        r = await self.http.post("/v1/cards", headers=ADMIN,
                                 json={"card_no": card_no, "holder_id": holder, **card})
        assert r.status_code == 200, r.text
        s = Student(holder, self.ledger, card_no, h["purse_account_id"],
                    h["subsidy_account_id"], card.get("pin"))
        if activated:
            await self.activate(s)
        if cash:
            await self.post(self.bank, s.purse, cash, 4)
        if subsidy:
            await self.post(self.fund, s.subsidy, subsidy, 5)
        if room:
            s.room_id, s.room_account = await self.room(room_fen)
            await self.live_in(s, s.room_id)
        return s

    async def activation_code(self, s: Student) -> str:
        """A new activation code for the holder (the card office's, over the API)."""
        r = await self.http.post(f"/v1/holders/{s.holder_id}/activation", headers=ADMIN)
        assert r.status_code == 200, r.text
        code: str = r.json()["code"]
        return code

    async def activate(self, s: Student) -> None:
        """The holder chooses their password on /self/activate with a fresh code."""
        code = await self.activation_code(s)
        async with httpx.AsyncClient(base_url=self.web.base_url, timeout=30) as browser:
            form = Page((await browser.get("/self/activate")).text)
            r = await browser.post("/self/activate", data={
                "holder_id": s.holder_id, "code": code, "password": s.password,
                "password2": s.password, "csrf": form.csrf[0]})
        assert r.status_code == 303 and r.headers["location"] == "/self/login", r.text

    async def room(self, fen: int = 0) -> tuple[str, int]:
        room_id = "R" + secrets.token_hex(4)
        r = await self.http.post("/v1/rooms", headers=ADMIN,
                                 json={"room_id": room_id, "ledger": self.ledger})
        assert r.status_code == 200, r.text
        account: int = r.json()["account_id"]
        if fen:
            await self.post(self.bank, account, fen, 4)
        return room_id, account

    async def live_in(self, s: Student, room_id: str) -> None:
        """The card office registers the holder as a resident of the room."""
        r = await self.http.post(f"/v1/rooms/{room_id}/residents", headers=ADMIN,
                                 json={"holder_id": s.holder_id})
        assert r.status_code == 200 and r.json()["status"] == "created", r.text

    async def post(self, debit: int, credit: int, amount: int, code: int, **kw: Any) -> str:
        tid = str(uuid.uuid4())
        r = await self.http.post("/v1/transfers", headers=ADMIN, json=[{
            "id": tid, "ledger": self.ledger, "debit_account_id": debit,
            "credit_account_id": credit, "amount": amount, "code": code, **kw}])
        assert r.json()[0]["status"] == "created", r.text
        return tid

    async def available(self, account: int) -> int:
        r = await self.http.get(f"/v1/accounts/{account}/balance", headers=ADMIN)
        value: int = r.json()["available"]
        return value

    async def terminal(self) -> TerminalClient:
        c = TerminalClient("127.0.0.1", self.web.iso_port, terminal_id=self.tid,
                           merchant_id=self.mid, mac_key=self.key, timeout_s=10)
        await c.connect()
        self.clients.append(c)
        return c

    async def purchase(self, s: Student, amount: int, *, pin: str | None = None) -> str:
        """A canteen purchase over ISO 8583; its response code (field 39)."""
        pos = self.clients[0] if self.clients else await self.terminal()
        ans = await pos.request(pos.purchase(s.card_no, amount, pin=pin))
        assert ans.response_code is not None
        return str(ans.response_code)

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


@pytest.fixture
async def client(selfweb: SelfWeb) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client: keeps cookies, does not follow redirects."""
    async with httpx.AsyncClient(base_url=selfweb.base_url, timeout=30) as c:
        yield c


@pytest.fixture
def browser(driver: Any, selfweb: SelfWeb) -> Iterator[Any]:  # noqa: F811 (the fixture)
    """The shared headless Chromium with no cookies of earlier tests."""
    driver.get(selfweb.base_url + "/static/onecard.css")  # a page of the site, for its cookies
    driver.delete_all_cookies()
    yield driver


@pytest.fixture
async def world(selfweb: SelfWeb) -> AsyncIterator[World]:
    """A fresh ledger (its own API client)."""
    async with httpx.AsyncClient(base_url=selfweb.base_url, timeout=30) as http:
        w = await World(selfweb, http).setup()
        yield w
        await w.close()


async def log_in(client: httpx.AsyncClient, s: Student, password: str | None = None) -> None:
    """Log in through the form, like a browser; asserts the redirect home."""
    form = await client.get(SELF.login)
    r = await client.post(SELF.login, data={
        "holder_id": s.holder_id, "password": password or s.password,
        "csrf": csrf_of(form.text)})
    assert r.status_code == 303 and r.headers["location"] == "/self", r.text


_VOID = frozenset({"input", "br", "img", "meta", "link", "hr"})


class Page(HTMLParser):
    """Elements by id (attributes and text) and the forms' csrf tokens of a page."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.html = html
        self.ids: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, list[dict[str, str | None]]] = {}
        self.csrf: list[str] = []
        self._open: list[tuple[str, str]] = []  # (tag, id) of elements whose text is wanted
        self._table: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "input" and a.get("name") == "csrf":
            self.csrf.append(a.get("value") or "")
        if tag == "table" and a.get("id"):
            self._table = str(a["id"])
            self.rows[self._table] = []
        if tag == "tr" and self._table and "data-fen" in a:
            self.rows[self._table].append(a)
        if a.get("id"):
            self.ids[str(a["id"])] = {"tag": tag, "text": "", **a}
            if tag not in _VOID:
                self._open.append((tag, str(a["id"])))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for _, element in self._open:
            self.ids[element]["text"] += data

    def fen(self, element: str) -> int:
        """An amount element's data-fen."""
        return int(self.ids[element]["data-fen"])

    def text(self, element: str) -> str:
        """An element's text, whitespace collapsed."""
        return re.sub(r"\s+", " ", str(self.ids[element]["text"])).strip()

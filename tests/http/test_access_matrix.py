"""Every credential against every route (contract §6): the route -> rights table of
engine/http/auth.py is complete, and no credential gets more (or less) than it says. Then
hypothesis over credential, route and body: never a 500, never a write without the right."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.routes import HTTPRoute

from engine.access.roles import Right, Role
from engine.http.auth import PAGE_PREFIXES, PUBLIC, RULES
from engine.service import Engine
from tests.conftest import _IDS
from tests.http.served import NOBODY, Door, principal_rights, served

PARAMS = ("transfer_id", "account_id", "card_no", "holder_id", "room_id", "path")


@pytest.fixture(scope="module")
async def door(engine: Engine) -> AsyncIterator[Door]:
    async with served(engine, _IDS) as d:
        yield d


def allowed(principal: str, needed: frozenset[Right]) -> bool:
    return needed == PUBLIC or bool(principal_rights(principal) & needed)


def fill(path: str, door: Door) -> str:
    values = {"transfer_id": str(uuid.uuid4()), "account_id": str(door.purse),
              "card_no": door.card, "holder_id": door.holder, "room_id": door.room,
              "path": "swagger"}
    for name in PARAMS:
        path = path.replace("{" + name + "}", values[name])
    assert "{" not in path, path
    return path


def body_for(method: str, path: str, door: Door) -> Any:
    """A request each route would carry out (so an allowed credential is never refused for
    its body: only a missing right may answer 401/403)."""
    if method in ("GET", "DELETE") or path.endswith(("/activation", "/report-lost", "/found",
                                                     "/close", "/pin-tries/reset")):
        return None
    ledger = door.ledger
    return {
        "/v1/accounts": [{"id": door.canteen, "ledger": ledger, "kind": "merchant", "code": 1}],
        "/v1/transfers": [door.topup(1, tid="0b6c1e1e-0000-4000-8000-00000000000a")],
        "/v1/holders": {"id": door.holder, "ledger": ledger, "name": "Li Lei",
                        "kind": "student"},
        "/v1/cards": {"card_no": door.card, "holder_id": door.holder, "ledger": ledger},
        "/v1/cards/{card_no}/replace": {"new_card_no": "78" + secrets.token_hex(7)[:14]
                                        .translate(str.maketrans("abcdef", "123456"))},
        "/v1/terminals": {"terminal_id": "X" + secrets.token_hex(4)[:7].upper(),
                          "merchant_id": "M" * 15, "ledger": ledger, "kind": "pos",
                          "account_id": door.canteen, "mac_key": secrets.token_hex(32)},
        "/v1/rooms": {"room_id": door.room, "ledger": ledger},
        "/v1/subsidies": [{"ledger": ledger, "holder_id": door.holder, "amount": 1,
                           "batch_id": "matrix"}],
        "/v1/rooms/{room_id}/residents": {"holder_id": door.holder},
    }[path]


async def test_every_route_has_a_rule(door: Door) -> None:
    async with door.client() as c:
        doc = (await c.get("/openapi.json")).json()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented, "the walk found no operations"
    assert documented <= RULES.keys(), sorted(documented - RULES.keys())
    served = {(m, r.path_format) for r in door.app.routes if isinstance(r, HTTPRoute)
              for h in r.route_handlers for m in h.http_methods if m != "OPTIONS"}
    # the HTML doors' own session decides there (tests/web); a /v1 route is never among them
    pages = {(m, p) for m, p in served if p.startswith(PAGE_PREFIXES)}
    assert pages and not any(p.startswith("/v1") for _, p in pages)
    served_routes = served - pages
    assert served_routes <= RULES.keys(), sorted(served_routes - RULES.keys())
    # and the app refuses to start with a route the table does not know
    assert set(door.app.state.access.rules) >= served


async def test_every_credential_on_every_route(door: Door) -> None:
    async with door.client() as c:
        doc = (await c.get("/openapi.json")).json()
        operations = sorted((m.upper(), p) for p, ops in doc["paths"].items() for m in ops)
        operations += [("GET", "/openapi.json")]
        checked = 0
        for method, path in operations:
            needed = RULES[(method, path)]
            for who in door.principals:
                body = body_for(method, path, door)
                r = await c.request(method, fill(path, door), json=body,
                                    headers=door.headers[who])
                assert r.status_code < 500, (who, method, path, r.text)
                if allowed(who, needed):
                    assert r.status_code not in (401, 403), (who, method, path, r.text)
                elif who == NOBODY:
                    assert r.status_code == 401, (who, method, path, r.text)
                    assert r.json()["error"] == "unauthorized"
                else:
                    assert r.status_code == 403, (who, method, path, r.text)
                    assert r.json()["error"] == "forbidden"
                checked += 1
    # 7 credentials (none, two tokens, five key roles) x every documented route
    assert checked == len(operations) * (3 + len(Role))


# -- hypothesis: random credentials, routes and bodies ----------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=5),
    max_leaves=12,
)


def _bodies(door: Door) -> st.SearchStrategy[Any]:
    """Bodies that fit some route, mangled ones, and anything at all."""
    templates = [body_for("POST", p, door) for m, p in RULES if m == "POST"
                 and body_for("POST", p, door) is not None]
    good = st.sampled_from(templates)
    topups = st.lists(st.builds(lambda a, code, d: door.topup(a, code=code, debit=d),
                                st.integers(1, 1000), st.integers(1, 9),
                                st.sampled_from([door.clearing, door.other_clearing,
                                                 door.fund])), min_size=1, max_size=3)
    return st.one_of(good, topups, _json)


async def test_hypothesis_no_500_and_no_write_without_the_right(door: Door) -> None:
    loop = asyncio.get_running_loop()
    routes = sorted(RULES)

    def fingerprint() -> tuple[Any, ...]:
        return asyncio.run_coroutine_threadsafe(door.fingerprint(), loop).result(30)

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(who=st.sampled_from(door.principals), route=st.sampled_from(routes),
           body=_bodies(door))
    def one(who: str, route: tuple[str, str], body: Any) -> None:
        method, path = route
        refused = not allowed(who, RULES[route])
        before = fingerprint() if refused or method != "GET" else None
        with httpx.Client(base_url=door.url, timeout=30) as c:
            r = c.request(method, fill(path, door), json=body, headers=door.headers[who])
        assert r.status_code < 500, (who, route, body, r.text)
        if refused:
            assert r.status_code in (401, 403), (who, route, r.text)
            assert fingerprint() == before, (who, route, "a refused request changed data")
        topup_only = Right.TOPUP in principal_rights(who) - principal_rights("admin-token")
        if topup_only and path == "/v1/transfers" and r.status_code == 200:
            # what a topup key got posted is a top-up from its own clearing account, all of it
            assert all(t["code"] == 4 and t["debit_account_id"] == door.clearing
                       and t["ledger"] == door.ledger for t in body), body

    await asyncio.to_thread(one)


async def test_hypothesis_topup_batches(door: Door) -> None:
    """Random batches on POST /v1/transfers with the topup key: posted only when every
    transfer is a top-up from its own clearing account, else 403 with nothing posted."""
    loop = asyncio.get_running_loop()

    def fingerprint() -> tuple[Any, ...]:
        return asyncio.run_coroutine_threadsafe(door.fingerprint(), loop).result(30)

    transfer = st.builds(
        lambda amount, code, debit, ledger: {**door.topup(amount, code=code, debit=debit),
                                             "ledger": ledger},
        st.integers(1, 1000), st.sampled_from([4, 4, 4, 1, 2, 3, 5, 6, 7, 8, 9]),
        st.sampled_from([door.clearing, door.clearing, door.other_clearing, door.fund,
                         door.purse]),
        st.sampled_from([door.ledger, door.ledger, door.ledger + 1]))

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(transfer, min_size=1, max_size=4))
    def one(batch: list[dict[str, Any]]) -> None:
        own = all(t["code"] == 4 and t["debit_account_id"] == door.clearing
                  and t["ledger"] == door.ledger for t in batch)
        before = None if own else fingerprint()
        with httpx.Client(base_url=door.url, timeout=30) as c:
            r = c.post("/v1/transfers", json=batch, headers=door.headers["topup"])
        if own:
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 403, (batch, r.text)
            assert fingerprint() == before

    await asyncio.to_thread(one)

"""The ``topup`` key (contract §6): a payment provider's callback may only post top-ups
(code 4) debiting its own clearing account; any other batch is refused whole (403) and posts
nothing, and every attempt is in the operator log."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from engine.service import Engine
from ledger.types import TransferCode
from tests.conftest import _IDS
from tests.http.served import Door, served


@pytest.fixture(scope="module")
async def door(engine: Engine) -> AsyncIterator[Door]:
    async with served(engine, _IDS) as d:
        yield d


async def _refused(c: httpx.AsyncClient, door: Door, batch: list[dict[str, Any]]) -> None:
    before = await door.fingerprint()
    r = await c.post("/v1/transfers", json=batch, headers=door.headers["topup"])
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "forbidden"
    assert await door.fingerprint() == before
    for t in batch:  # not one of them was posted
        got = await c.get(f"/v1/transfers/{t['id']}", headers=door.headers["admin-token"])
        assert got.status_code == 404, got.text


async def test_every_other_code_is_refused(door: Door) -> None:
    async with door.client() as c:
        for code in TransferCode:
            if code is not TransferCode.TOP_UP:
                await _refused(c, door, [door.topup(100, code=int(code))])


async def test_another_clearing_account_is_refused(door: Door) -> None:
    async with door.client() as c:
        await _refused(c, door, [door.topup(100, debit=door.other_clearing)])
        await _refused(c, door, [door.topup(100, debit=door.fund)])
        # the right account id in another ledger is another account
        other_ledger = {**door.topup(100), "ledger": door.ledger + 100_000}
        await _refused(c, door, [other_ledger])


async def test_a_mixed_batch_is_refused_whole(door: Door) -> None:
    async with door.client() as c:
        good = door.topup(100)
        await _refused(c, door, [good, door.topup(5, code=1)])
        await _refused(c, door, [good, door.topup(5, debit=door.other_clearing), good])
        linked = {**door.topup(100), "flags": ["linked"]}
        await _refused(c, door, [linked, door.topup(7, code=8)])


async def test_own_top_ups_are_posted_and_logged(door: Door) -> None:
    async with door.client() as c:
        batch = [door.topup(300), door.topup(200)]
        r = await c.post("/v1/transfers", json=batch, headers=door.headers["topup"])
        assert r.status_code == 200, r.text
        assert [x["status"] for x in r.json()] == ["created", "created"]
        again = await c.post("/v1/transfers", json=batch, headers=door.headers["topup"])
        assert [x["status"] for x in again.json()] == ["exists", "exists"]
        # a key that may post top-ups reads nothing and writes nothing else
        for method, path, body in [
            ("GET", f"/v1/accounts/{door.purse}/balance", None),
            ("GET", f"/v1/transfers/{batch[0]['id']}", None),
            ("POST", "/v1/accounts", [{"id": 9, "ledger": door.ledger, "kind": "purse"}]),
            ("POST", "/v1/holders", {"id": "x", "ledger": door.ledger, "name": "x",
                                     "kind": "staff"}),
        ]:
            r = await c.request(method, path, json=body, headers=door.headers["topup"])
            assert r.status_code == 403, (path, r.text)
        log = (await c.get("/v1/operator-log?limit=50",
                           headers=door.headers["auditor"])).json()["entries"]
    mine = [e for e in log if e["actor"] == door.key_names["topup"]]
    assert mine[0]["outcome"] == "403 forbidden" and mine[0]["action"] == "POST /v1/holders"
    posted = [e for e in mine if e["action"] == "POST /v1/transfers"]
    assert posted[0]["outcome"] == "200 exists=2" and posted[1]["outcome"] == "200 created=2"
    assert posted[1]["target"].startswith(f"2 items: {batch[0]['id']}, {batch[1]['id']}")
    assert all(e["role"] == "topup" for e in mine)
    # reads are not logged
    assert not [e for e in mine if e["action"].startswith("GET")]


async def test_a_malformed_batch_is_a_400_and_posts_nothing(door: Door) -> None:
    async with door.client() as c:
        before = await door.fingerprint()
        for body in (b"[", b"[]", b'[{"id": "x"}]', b'{"code": 4}'):
            r = await c.post("/v1/transfers", content=body, headers=door.headers["topup"])
            assert r.status_code == 400, r.text
        assert await door.fingerprint() == before
        assert uuid.UUID(door.topup()["id"])

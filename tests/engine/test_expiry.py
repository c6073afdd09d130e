"""Hold timeouts: the background expirer (every 0.2 s in the ``engine`` fixture) releases a
hold whose ``timeout_s`` has passed with no other traffic at all; the hold is then ``expired``
and neither a post nor a void can touch it."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Final

import httpx

from engine import metrics
from engine.service import Engine
from tests.conftest import Api, Ids

Json = dict[str, Any]
DMNEC: Final = "debits_must_not_exceed_credits"
FUNDED: Final = 5_000
POLL_S: Final = 6.0  # the hold times out after 1 s; the expirer runs every 0.2 s

SQL_HOLD: Final = "SELECT state, created_at, expires_at, resolved_at FROM holds WHERE id = $1"


def _expired_total() -> float:
    v = metrics.REGISTRY.get_sample_value("onecard_holds_expired_total")
    assert v is not None
    return v


async def _setup(http: httpx.AsyncClient, api: Api, ids: Ids) -> tuple[int, int, int]:
    ledger = ids.ledger()
    bank, purse, water = ids.accounts(3)
    r = await http.post("/v1/accounts", headers=api.admin, json=[
        {"id": bank, "ledger": ledger, "kind": "clearing", "code": 1},
        {"id": purse, "ledger": ledger, "kind": "purse", "code": 1, "flags": [DMNEC]},
        {"id": water, "ledger": ledger, "kind": "utility", "code": 2},
    ])
    assert [x["status"] for x in r.json()] == ["created"] * 3
    r = await http.post("/v1/transfers", headers=api.admin, json=[
        {"id": str(uuid.uuid4()), "ledger": ledger, "debit_account_id": bank,
         "credit_account_id": purse, "amount": FUNDED, "code": 4}])
    assert r.json()[0]["status"] == "created"
    return ledger, purse, water


async def _hold(http: httpx.AsyncClient, api: Api, ledger: int, purse: int, water: int,
                amount: int, timeout_s: int) -> str:
    hid = str(uuid.uuid4())
    r = await http.post("/v1/transfers", headers=api.admin, json=[
        {"id": hid, "ledger": ledger, "debit_account_id": purse, "credit_account_id": water,
         "amount": amount, "code": 2, "flags": ["pending"], "timeout_s": timeout_s}])
    assert r.json()[0]["status"] == "created"
    return hid


async def _balance(http: httpx.AsyncClient, api: Api, account_id: int) -> Json:
    r = await http.get(f"/v1/accounts/{account_id}/balance", headers=api.read)
    assert r.status_code == 200
    b: Json = r.json()
    return b


async def _state(http: httpx.AsyncClient, api: Api, transfer_id: str) -> str:
    r = await http.get(f"/v1/transfers/{transfer_id}", headers=api.read)
    assert r.status_code == 200
    s: str = r.json()["state"]
    return s


async def _wait_available(http: httpx.AsyncClient, api: Api, account_id: int,
                          want: int) -> float:
    """Poll (reads only: no batch runs) until ``available`` is ``want``; seconds waited."""
    t0 = time.monotonic()
    while True:
        b = await _balance(http, api, account_id)
        if b["available"] == want:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < POLL_S, f"hold not released after {POLL_S}s: {b}"
        await asyncio.sleep(0.05)


async def test_expirer_releases_hold_without_traffic(
    http: httpx.AsyncClient, api: Api, ids: Ids, engine: Engine
) -> None:
    ledger, purse, water = await _setup(http, api, ids)
    expired_before = _expired_total()
    t_created = time.monotonic()
    hid = await _hold(http, api, ledger, purse, water, 1_800, timeout_s=1)
    other = await _hold(http, api, ledger, purse, water, 200, timeout_s=600)
    b = await _balance(http, api, purse)
    assert (b["balance"], b["available"], b["debits_pending"]) == (FUNDED, FUNDED - 2_000, 2_000)
    assert await _state(http, api, hid) == "pending"

    await asyncio.sleep(0.5)  # half-way: nothing may expire early
    assert await _state(http, api, hid) == "pending"
    assert (await _balance(http, api, purse))["available"] == FUNDED - 2_000

    await _wait_available(http, api, purse, FUNDED - 200)
    assert time.monotonic() - t_created >= 1.0
    b = await _balance(http, api, purse)
    assert (b["balance"], b["debits_pending"]) == (FUNDED, 200)
    w = await _balance(http, api, water)
    assert (w["balance"], w["credits_pending"]) == (0, 200)
    assert await _state(http, api, hid) == "expired"
    assert await _state(http, api, other) == "pending"  # its timeout is far away

    async with engine.store.pool.acquire() as conn:
        h = await conn.fetchrow(SQL_HOLD, uuid.UUID(hid))
        n_transfers = await conn.fetchval(
            "SELECT count(*) FROM transfers WHERE ledger = $1", ledger)
    assert h is not None
    assert h["state"] == "expired"
    assert h["expires_at"] == h["created_at"] + 1_000_000_000
    assert h["resolved_at"] >= h["expires_at"]
    assert n_transfers == 3  # top-up and two holds: expiry writes no transfer
    assert _expired_total() >= expired_before + 1

    for flag in ("post_pending", "void_pending"):
        r = await http.post("/v1/transfers", headers=api.admin, json=[
            {"id": str(uuid.uuid4()), "ledger": ledger, "pending_id": hid, "flags": [flag]}])
        assert r.json()[0]["status"] == "pending_transfer_expired", flag
    assert (await _balance(http, api, purse))["available"] == FUNDED - 200
    assert await _state(http, api, hid) == "expired"

    # the released money is spendable again
    r = await http.post("/v1/transfers", headers=api.admin, json=[
        {"id": str(uuid.uuid4()), "ledger": ledger, "debit_account_id": purse,
         "credit_account_id": water, "amount": FUNDED - 200, "code": 2}])
    assert r.json()[0]["status"] == "created"


async def test_expirer_covers_every_ledger(
    http: httpx.AsyncClient, api: Api, ids: Ids
) -> None:
    worlds = [await _setup(http, api, ids) for _ in range(3)]
    holds = [await _hold(http, api, *w, 1_000, timeout_s=1) for w in worlds]
    for _, purse, _ in worlds:
        await _wait_available(http, api, purse, FUNDED)
    for h in holds:
        assert await _state(http, api, h) == "expired"

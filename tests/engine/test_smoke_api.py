"""A first end-to-end pass over the HTTP API: the README's walk-through."""

from __future__ import annotations

import uuid

import httpx

from tests.conftest import Api, Ids


async def test_readme_walkthrough(http: httpx.AsyncClient, api: Api, ids: Ids) -> None:
    ledger = ids.ledger()
    bank, purse, canteen, water = ids.accounts(4)
    r = await http.post(
        "/v1/accounts",
        headers=api.admin,
        json=[
            {"id": bank, "ledger": ledger, "kind": "clearing", "code": 1},
            {"id": purse, "ledger": ledger, "kind": "purse", "code": 1,
             "flags": ["debits_must_not_exceed_credits"]},
            {"id": canteen, "ledger": ledger, "kind": "merchant", "code": 1},
            {"id": water, "ledger": ledger, "kind": "utility", "code": 2},
        ],
    )
    assert r.status_code == 200
    assert [x["status"] for x in r.json()] == ["created"] * 4

    top_up = {"id": str(uuid.uuid4()), "ledger": ledger, "debit_account_id": bank,
              "credit_account_id": purse, "amount": 10_000, "code": 4, "user_data": "wx-1"}
    meal = {"id": str(uuid.uuid4()), "ledger": ledger, "debit_account_id": purse,
            "credit_account_id": canteen, "amount": 1_250, "code": 1}
    r = await http.post("/v1/transfers", headers=api.admin, json=[top_up, meal])
    assert [x["status"] for x in r.json()] == ["created", "created"]
    r = await http.post("/v1/transfers", headers=api.admin, json=[meal])
    assert r.json()[0]["status"] == "exists"  # the same meal twice is charged once

    hold_id = str(uuid.uuid4())
    r = await http.post("/v1/transfers", headers=api.admin, json=[
        {"id": hold_id, "ledger": ledger, "debit_account_id": purse, "credit_account_id": water,
         "amount": 500, "code": 2, "flags": ["pending"], "timeout_s": 600}])
    assert r.json()[0]["status"] == "created"
    b = (await http.get(f"/v1/accounts/{purse}/balance", headers=api.read)).json()
    assert (b["balance"], b["available"]) == (8_750, 8_250)

    r = await http.post("/v1/transfers", headers=api.admin, json=[
        {"id": str(uuid.uuid4()), "ledger": ledger, "pending_id": hold_id, "amount": 320,
         "flags": ["post_pending"]}])
    assert r.json()[0]["status"] == "created"
    b = (await http.get(f"/v1/accounts/{purse}/balance", headers=api.read)).json()
    assert (b["balance"], b["available"], b["debits_pending"]) == (8_430, 8_430, 0)
    t = (await http.get(f"/v1/transfers/{hold_id}", headers=api.read)).json()
    assert t["state"] == "settled"

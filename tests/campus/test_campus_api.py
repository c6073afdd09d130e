"""The campus HTTP routes over a real socket (Litestar on uvicorn, httpx, real PostgreSQL)."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import httpx

from engine.campus.accounts import holder_account_ids, room_account_id
from tests.campus.test_campus import card_number, terminal_id
from tests.conftest import Api, Ids


async def _holder(http: httpx.AsyncClient, api: Api, ledger: int, hid: str,
                  name: str = "Wang Fang", kind: str = "student") -> httpx.Response:
    return await http.post("/v1/holders", headers=api.admin,
                           json={"id": hid, "ledger": ledger, "name": name, "kind": kind})


async def _transfer(http: httpx.AsyncClient, api: Api, **t: Any) -> str:
    r = await http.post("/v1/transfers", headers=api.admin, json=[{"id": str(uuid.uuid4()), **t}])
    assert r.status_code == 200, r.text
    status: str = r.json()[0]["status"]
    return status


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}
    code: str = body["error"]
    return code


async def test_holders(http: httpx.AsyncClient, api: Api, ids: Ids) -> None:
    ledger = ids.ledger()
    r = await _holder(http, api, ledger, "2024001")
    assert r.status_code == 200
    purse, subsidy = holder_account_ids(ledger, "2024001")
    assert r.json() == {"id": "2024001", "status": "created", "purse_account_id": purse,
                        "subsidy_account_id": subsidy}
    r = await _holder(http, api, ledger, "2024001")
    assert r.json()["status"] == "exists"
    r = await _holder(http, api, ledger, "2024001", kind="staff")
    assert r.json()["status"] == "exists_with_different_fields"
    assert r.json()["purse_account_id"] == purse
    b = await http.get(f"/v1/accounts/{subsidy}/balance", headers=api.read)
    assert b.status_code == 200 and b.json()["balance"] == 0
    assert _error(await _holder(http, api, ledger, "x", kind="alien"), 400) == "invalid_body"
    assert _error(await http.post("/v1/holders", headers=api.admin,
                                  json={"id": "y", "ledger": ledger, "name": "n",
                                        "kind": "staff", "extra": 1}), 400) == "invalid_body"
    assert _error(await http.post("/v1/holders", content=b"{", headers=api.admin), 400)
    r = await http.post("/v1/holders", json={"id": "z", "ledger": ledger, "name": "n",
                                             "kind": "staff"})
    assert _error(r, 401) == "unauthorized"
    r = await http.post("/v1/holders", headers=api.read,
                        json={"id": "z", "ledger": ledger, "name": "n", "kind": "staff"})
    assert _error(r, 403) == "forbidden"


async def test_card_lifecycle(http: httpx.AsyncClient, api: Api, ids: Ids) -> None:
    ledger = ids.ledger()
    hid = "H" + secrets.token_hex(5)
    assert (await _holder(http, api, ledger, hid)).status_code == 200
    purse, subsidy = holder_account_ids(ledger, hid)
    bank, canteen = ids.accounts(2)
    r = await http.post("/v1/accounts", headers=api.admin, json=[
        {"id": bank, "ledger": ledger, "kind": "clearing", "code": 1},
        {"id": canteen, "ledger": ledger, "kind": "merchant", "code": 1}])
    assert [x["status"] for x in r.json()] == ["created", "created"]
    assert await _transfer(http, api, ledger=ledger, debit_account_id=bank,
                           credit_account_id=purse, amount=2_000, code=4) == "created"

    card = card_number()
    r = await http.post("/v1/cards", headers=api.admin, json={
        "card_no": card, "holder_id": hid, "daily_limit": 5_000, "pin": "1234",
        "pin_threshold": 2_000})
    assert r.status_code == 200 and r.json() == {"card_no": card, "status": "active"}
    r = await http.post("/v1/cards", headers=api.admin, json={"card_no": card, "holder_id": hid})
    assert r.json() == {"card_no": card, "status": "active"}  # issued again: unchanged
    r = await http.post("/v1/cards", headers=api.admin,
                        json={"card_no": card_number(), "holder_id": hid, "ledger": ledger})
    assert "holder_has_active_card" in r.json()["detail"] and r.status_code == 400
    for bad in ({"card_no": "1234567", "holder_id": hid},
                {"card_no": card_number(), "holder_id": hid, "pin": "12"},
                {"card_no": card_number(), "holder_id": hid, "daily_limit": -1},
                {"card_no": card_number(), "holder_id": hid, "status": "lost"}):
        assert _error(await http.post("/v1/cards", headers=api.admin, json=bad), 400)
    r = await http.post("/v1/cards", headers=api.admin,
                        json={"card_no": card_number(), "holder_id": "nobody-" + hid})
    assert _error(r, 404) == "not_found"

    b = await http.get(f"/v1/cards/{card}/balance", headers=api.read)
    assert b.status_code == 200
    assert b.json() == {
        "card_no": card, "holder_id": hid, "status": "active",
        "purses": [{"account_id": purse, "kind": "purse", "balance": 2_000, "available": 2_000},
                   {"account_id": subsidy, "kind": "subsidy", "balance": 0, "available": 0}],
        "total_available": 2_000,
    }

    r = await http.post(f"/v1/cards/{card}/report-lost", headers=api.admin)
    assert r.status_code == 200 and r.json() == {"card_no": card, "status": "lost"}
    # frozen at the ledger: even an admin's transfer out of the purse is refused
    assert await _transfer(http, api, ledger=ledger, debit_account_id=purse,
                           credit_account_id=canteen, amount=1, code=1) == "debit_account_frozen"
    r = await http.post(f"/v1/cards/{card}/found", headers=api.admin)
    assert r.json() == {"card_no": card, "status": "active"}
    assert await _transfer(http, api, ledger=ledger, debit_account_id=purse,
                           credit_account_id=canteen, amount=1, code=1) == "created"
    await http.post(f"/v1/cards/{card}/report-lost", headers=api.admin)

    new = card_number()
    r = await http.post(f"/v1/cards/{card}/replace", headers=api.admin,
                        json={"new_card_no": new})
    assert r.status_code == 200
    assert r.json() == {"old": {"card_no": card, "status": "replaced"},
                        "new": {"card_no": new, "status": "active"}}
    b = (await http.get(f"/v1/cards/{new}/balance", headers=api.read)).json()
    assert b["holder_id"] == hid and b["total_available"] == 1_999  # same purses, same money
    assert [p["account_id"] for p in b["purses"]] == [purse, subsidy]
    assert await _transfer(http, api, ledger=ledger, debit_account_id=purse,
                           credit_account_id=canteen, amount=1, code=1) == "created"
    old = (await http.get(f"/v1/cards/{card}/balance", headers=api.read)).json()
    assert old["status"] == "replaced"
    r = await http.post(f"/v1/cards/{card}/report-lost", headers=api.admin)
    assert "invalid_transition" in r.json()["detail"] and r.status_code == 400
    r = await http.post(f"/v1/cards/{card}/replace", headers=api.admin,
                        json={"new_card_no": "12"})
    assert _error(r, 400) == "invalid_body"

    r = await http.post(f"/v1/cards/{new}/close", headers=api.admin)
    assert r.json() == {"card_no": new, "status": "closed"}
    r = await http.post(f"/v1/cards/{new}/close", headers=api.admin)
    assert r.json() == {"card_no": new, "status": "closed"}
    assert _error(await http.post(f"/v1/cards/{card_number()}/close", headers=api.admin),
                  404) == "not_found"
    assert _error(await http.post("/v1/cards/12ab/report-lost", headers=api.admin),
                  400) == "invalid_parameter"
    assert _error(await http.get(f"/v1/cards/{card_number()}/balance", headers=api.read), 404)
    assert _error(await http.get(f"/v1/cards/{new}/balance"), 401)
    assert _error(await http.post(f"/v1/cards/{new}/close", headers=api.read), 403)


async def test_terminals_and_rooms(http: httpx.AsyncClient, api: Api, ids: Ids) -> None:
    ledger = ids.ledger()
    canteen, purse = ids.accounts(2)
    r = await http.post("/v1/accounts", headers=api.admin, json=[
        {"id": canteen, "ledger": ledger, "kind": "merchant", "code": 1},
        {"id": purse, "ledger": ledger, "kind": "purse", "code": 1}])
    assert r.status_code == 200
    tid = terminal_id()
    body = {"terminal_id": tid, "merchant_id": "CANTEEN00000001", "ledger": ledger,
            "kind": "pos", "account_id": canteen, "mac_key": secrets.token_hex(32)}
    r = await http.post("/v1/terminals", headers=api.admin, json=body)
    assert r.status_code == 200 and r.json() == {"terminal_id": tid, "status": "created"}
    r = await http.post("/v1/terminals", headers=api.admin, json=body)
    assert r.json() == {"terminal_id": tid, "status": "exists"}
    r = await http.post("/v1/terminals", headers=api.admin, json={**body, "kind": "water"})
    assert r.json() == {"terminal_id": tid, "status": "exists_with_different_fields"}
    r = await http.post("/v1/terminals", headers=api.admin,
                        json={**body, "mac_key": secrets.token_hex(32)})
    assert r.json()["status"] == "exists_with_different_fields"
    for bad in ({"terminal_id": "SHORT"}, {"merchant_id": "M1"}, {"mac_key": "zz" * 32},
                {"mac_key": "ab" * 31}, {"kind": "atm"}, {"account_id": 0}):
        r = await http.post("/v1/terminals", headers=api.admin,
                            json={**body, "terminal_id": terminal_id(), **bad})
        assert _error(r, 400) == "invalid_body", bad
    r = await http.post("/v1/terminals", headers=api.admin,
                        json={**body, "terminal_id": terminal_id(), "account_id": purse})
    assert "account_not_creditable" in r.json()["detail"] and r.status_code == 400
    r = await http.post("/v1/terminals", headers=api.admin,
                        json={**body, "terminal_id": terminal_id(), "account_id": ids.account()})
    assert _error(r, 404) == "not_found"

    r = await http.post("/v1/rooms", headers=api.admin, json={"room_id": "East-3 402",
                                                              "ledger": ledger})
    assert r.status_code == 200
    assert r.json() == {"room_id": "East-3 402",
                        "account_id": room_account_id(ledger, "East-3 402")}
    again = await http.post("/v1/rooms", headers=api.admin, json={"room_id": "East-3 402",
                                                                  "ledger": ledger})
    assert again.json() == r.json()
    b = await http.get(f"/v1/accounts/{r.json()['account_id']}/balance", headers=api.read)
    assert b.status_code == 200 and b.json()["balance"] == 0
    r = await http.post("/v1/rooms", headers=api.admin, json={"room_id": "x" * 29,
                                                              "ledger": ledger})
    assert _error(r, 400) == "invalid_body"


async def test_subsidies_endpoint(http: httpx.AsyncClient, api: Api, ids: Ids) -> None:
    ledger = ids.ledger()
    for hid in ("A1", "A2"):
        assert (await _holder(http, api, ledger, hid)).status_code == 200
    items = [{"ledger": ledger, "holder_id": "A1", "amount": 15_000, "batch_id": "2026-05"},
             {"ledger": ledger, "holder_id": "A2", "amount": 12_000, "batch_id": "2026-05"},
             {"ledger": ledger, "holder_id": "ghost", "amount": 1, "batch_id": "2026-05"}]
    r = await http.post("/v1/subsidies", headers=api.admin, json=items)
    assert r.status_code == 200
    assert [x["status"] for x in r.json()] == ["created", "created", "holder_not_found"]
    r2 = await http.post("/v1/subsidies", headers=api.admin, json=items)
    assert [x["status"] for x in r2.json()] == ["exists", "exists", "holder_not_found"]
    assert [x["id"] for x in r2.json()] == [x["id"] for x in r.json()]
    subsidy = holder_account_ids(ledger, "A1")[1]
    b = (await http.get(f"/v1/accounts/{subsidy}/balance", headers=api.read)).json()
    assert b["balance"] == 15_000  # credited once
    t = (await http.get(f"/v1/transfers/{r.json()[0]['id']}", headers=api.read)).json()
    assert t["code"] == 5 and t["credit_account_id"] == subsidy
    assert _error(await http.post("/v1/subsidies", headers=api.admin, json=[]), 400)
    bad = [{**items[0], "amount": 0}]
    assert _error(await http.post("/v1/subsidies", headers=api.admin, json=bad), 400)
    assert _error(await http.post("/v1/subsidies", headers=api.read, json=items), 403)


async def test_openapi_lists_campus_routes(http: httpx.AsyncClient) -> None:
    paths = (await http.get("/openapi.json")).json()["paths"]
    for p in ("/v1/holders", "/v1/cards", "/v1/cards/{card_no}/report-lost",
              "/v1/cards/{card_no}/replace", "/v1/cards/{card_no}/close",
              "/v1/cards/{card_no}/balance", "/v1/terminals", "/v1/rooms", "/v1/subsidies"):
        assert p in paths, p

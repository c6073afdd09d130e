"""The routes of contract §6 (activation codes, residents, the operator log) over a real
socket, and the operator log entry of every write path of the API: who, what, on what, with
which outcome, and never a secret."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest

from engine.service import Engine
from tests.conftest import _IDS
from tests.http.served import Door, served


@pytest.fixture(scope="module")
async def door(engine: Engine) -> AsyncIterator[Door]:
    async with served(engine, _IDS) as d:
        yield d


async def _log(door: Door, limit: int = 100) -> list[dict[str, str]]:
    async with door.client() as c:
        r = await c.get(f"/v1/operator-log?limit={limit}", headers=door.headers["auditor"])
    assert r.status_code == 200, r.text
    entries: list[dict[str, str]] = r.json()["entries"]
    return entries


async def test_activation(door: Door) -> None:
    async with door.client() as c:
        r = await c.post(f"/v1/holders/{door.holder}/activation",
                         headers=door.headers["card_office"])
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"holder_id", "code", "expires_at"}
        assert body["holder_id"] == door.holder
        assert len(body["code"]) == 8 and body["code"].isdigit()
        expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
        assert abs(expires - datetime.now(expires.tzinfo) - timedelta(hours=72)) < timedelta(
            minutes=1)
        r = await c.post("/v1/holders/nobody-here/activation",
                         headers=door.headers["card_office"])
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        r = await c.post(f"/v1/holders/{door.holder}/activation",
                         headers=door.headers["finance"])
        assert r.status_code == 403
    refused, entry = (await _log(door, 2))  # newest first: the finance key's refusal
    assert entry["action"] == "POST /v1/holders/{holder_id}/activation"
    assert entry["actor"] == door.key_names["card_office"]
    assert entry["outcome"] == "404 not_found"
    assert (refused["actor"], refused["outcome"]) == (door.key_names["finance"], "403 forbidden")


async def test_residents(door: Door) -> None:
    room2 = "R" + secrets.token_hex(5)
    admin, office = door.headers["admin-token"], door.headers["card_office"]
    async with door.client() as c:
        assert (await c.post("/v1/rooms", json={"room_id": room2, "ledger": door.ledger},
                             headers=admin)).status_code == 200
        path = f"/v1/rooms/{door.room}/residents"
        r = await c.post(path, json={"holder_id": door.holder}, headers=office)
        assert r.status_code == 200, r.text
        assert r.json() == {"room_id": door.room, "holder_id": door.holder, "status": "created"}
        r = await c.post(path, json={"holder_id": door.holder}, headers=office)
        assert r.json()["status"] == "exists"
        # one room at a time
        r = await c.post(f"/v1/rooms/{room2}/residents", json={"holder_id": door.holder},
                         headers=office)
        assert r.status_code == 400 and "holder_lives_elsewhere" in r.json()["detail"]
        for bad in ({"holder_id": "nobody"}, {"holder_id": ""}, {"holder": door.holder},
                    {"holder_id": "a\u0000b"}):
            r = await c.post(path, json=bad, headers=office)
            assert r.status_code in (400, 404), (bad, r.text)
        r = await c.post("/v1/rooms/NO-SUCH-ROOM/residents", json={"holder_id": door.holder},
                         headers=office)
        assert r.status_code == 404
        r = await c.delete(f"{path}/{door.holder}", headers=office)
        assert r.status_code == 200, r.text
        assert r.json() == {"room_id": door.room, "holder_id": door.holder, "status": "removed"}
        assert (await c.delete(f"{path}/{door.holder}", headers=office)).status_code == 404
        r = await c.post(f"/v1/rooms/{room2}/residents", json={"holder_id": door.holder},
                         headers=office)
        assert r.json()["status"] == "created"


async def test_operator_log_paging(door: Door) -> None:
    async with door.client() as c:
        for who in ("read-token", "admin-token", "auditor", "admin"):
            r = await c.get("/v1/operator-log?limit=2", headers=door.headers[who])
            assert r.status_code == 200, (who, r.text)
        page = r.json()
        assert len(page["entries"]) == 2 and page["next_before"] == page["entries"][1]["id"]
        older = (await c.get(f"/v1/operator-log?limit=2&before={page['next_before']}",
                             headers=door.headers["auditor"])).json()
        assert older["entries"][0]["id"] == page["entries"][1]["id"] - 1
        for q in ("limit=0", "limit=1001", "limit=x", "before=0", "before=-1"):
            r = await c.get(f"/v1/operator-log?{q}", headers=door.headers["auditor"])
            assert r.status_code == 400, (q, r.text)
        for who in ("finance", "card_office", "topup"):
            assert (await c.get("/v1/operator-log",
                                headers=door.headers[who])).status_code == 403


async def test_every_api_write_path_is_logged_without_secrets(door: Door) -> None:
    admin_key, office = door.headers["admin"], door.headers["card_office"]
    mac_key, pin = secrets.token_hex(32), "975310"
    card2, card3 = ("79" + "".join(secrets.choice("0123456789") for _ in range(14))
                    for _ in range(2))
    hid = "L" + secrets.token_hex(4)
    term = "L" + secrets.token_hex(4)[:7].upper()
    acc = door.canteen + 1_000_000_000
    calls = [
        (admin_key, "POST", "/v1/accounts",
         [{"id": acc, "ledger": door.ledger, "kind": "merchant", "code": 1}]),
        (admin_key, "POST", "/v1/transfers", [door.topup(50)]),
        (office, "POST", "/v1/holders", {"id": hid, "ledger": door.ledger, "name": "Secret Name",
                                          "kind": "staff"}),
        (office, "POST", "/v1/cards", {"card_no": card2, "holder_id": hid, "ledger": door.ledger,
                                        "pin": pin}),
        (office, "POST", f"/v1/cards/{card2}/report-lost", None),
        (office, "POST", f"/v1/cards/{card2}/found", None),
        (office, "POST", f"/v1/cards/{card2}/replace", {"new_card_no": card3}),
        (office, "POST", f"/v1/cards/{card3}/close", None),
        (admin_key, "POST", "/v1/terminals",
         {"terminal_id": term, "merchant_id": "M" + term + "000000", "ledger": door.ledger,
          "kind": "pos", "account_id": acc, "mac_key": mac_key}),
        (office, "POST", "/v1/rooms", {"room_id": "Q" + hid, "ledger": door.ledger}),
        (office, "POST", "/v1/subsidies", [{"ledger": door.ledger, "holder_id": hid,
                                            "amount": 1, "batch_id": "b-" + hid}]),
        (office, "POST", f"/v1/holders/{hid}/activation", None),
        (office, "POST", f"/v1/rooms/Q{hid}/residents", {"holder_id": hid}),
        (office, "DELETE", f"/v1/rooms/Q{hid}/residents/{hid}", None),
    ]
    answers = []
    async with door.client() as c:
        for headers, method, path, body in calls:
            r = await c.request(method, path, json=body, headers=headers)
            assert r.status_code == 200, (path, r.text)
            answers.append(r.text)
    code = next(a for a in answers if '"code"' in a).split('"code":"')[1][:8]
    log = list(reversed(await _log(door, len(calls))))
    assert [(e["action"], e["outcome"].split()[0]) for e in log] == [
        (f"{m} {_template(p)}", "200") for _, m, p, _ in calls]
    by_action = {e["action"]: e for e in log}
    assert by_action["POST /v1/holders"]["target"] == f"id={hid}"
    assert by_action["POST /v1/holders"]["outcome"] == "200 created"
    assert by_action["POST /v1/cards"]["target"] == f"card_no={card2}; holder_id={hid}"
    assert by_action["POST /v1/cards/{card_no}/replace"]["outcome"] == "200 active"
    assert by_action["POST /v1/terminals"]["target"] == f"terminal_id={term}"
    assert by_action["POST /v1/accounts"]["outcome"] == "200 created=1"
    assert by_action["DELETE /v1/rooms/{room_id}/residents/{holder_id}"]["outcome"] == \
        "200 removed"
    assert {e["actor"] for e in log} == {door.key_names["admin"], door.key_names["card_office"]}
    text = str(log)
    for secret in (mac_key, mac_key.upper(), pin, code, "Secret Name",
                   door.keys["admin"], door.keys["card_office"]):
        assert secret not in text


def _template(path: str) -> str:
    parts = path.split("/")
    names = {3: {"cards": "{card_no}", "holders": "{holder_id}", "rooms": "{room_id}"}}
    out = []
    for i, p in enumerate(parts):
        if i == 3 and len(parts) > 4:
            out.append(names[3][parts[2]])
        elif i == 5:
            out.append("{holder_id}")
        else:
            out.append(p)
    return "/".join(out)

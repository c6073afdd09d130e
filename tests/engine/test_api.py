"""The HTTP API of contract §4 over a real socket: auth, input validation (400/413/404, never
500), reading transfers, statement pagination, balances as of an instant, OpenAPI and metrics,
and a Hypothesis fuzz of the two write endpoints."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine import limits
from engine.service import Engine
from ledger.types import INT64_MAX
from tests.conftest import Api, Ids

Json = dict[str, Any]
DMNEC: Final = "debits_must_not_exceed_credits"
FUNDED: Final = 10_000
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
CST: Final = timezone(timedelta(hours=8))


# -- helpers -------------------------------------------------------------------------------------


def tr(ledger: int, debit: int, credit: int, amount: int, code: int = 1, **kw: Any) -> Json:
    """A transfer body with a fresh id."""
    return {"id": str(uuid.uuid4()), "ledger": ledger, "debit_account_id": debit,
            "credit_account_id": credit, "amount": amount, "code": code, **kw}


async def post(http: httpx.AsyncClient, api: Api, transfers: list[Json]) -> list[Json]:
    """POST /v1/transfers, expecting 200."""
    r = await http.post("/v1/transfers", headers=api.admin, json=transfers)
    assert r.status_code == 200, r.text
    out: list[Json] = r.json()
    return out


async def bal(http: httpx.AsyncClient, api: Api, account_id: int, at: str | None = None) -> Json:
    """GET /v1/accounts/{id}/balance[?at=]."""
    params = {"at": at} if at is not None else None
    r = await http.get(f"/v1/accounts/{account_id}/balance", headers=api.read, params=params)
    assert r.status_code == 200, r.text
    b: Json = r.json()
    return b


def iso(ns: int, tz: timezone = UTC) -> str:
    """An engine timestamp as RFC 3339 with microseconds in ``tz`` (floor to the µs)."""
    dt = (EPOCH + timedelta(microseconds=ns // 1000)).astimezone(tz)
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


def assert_error(r: httpx.Response, status: int) -> Json:
    """The response is ``status`` with the contract's error body."""
    assert r.status_code == status, (r.status_code, r.text)
    body: Json = r.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["detail"], str)
    return body


class World(msgspec.Struct, frozen=True):
    """A ledger with a bank, a funded purse and a merchant."""

    ledger: int
    bank: int
    purse: int
    canteen: int


async def make_world(http: httpx.AsyncClient, api: Api, ids: Ids) -> World:
    """A fresh ledger whose purse holds ``FUNDED`` fen."""
    ledger = ids.ledger()
    bank, purse, canteen = ids.accounts(3)
    r = await http.post("/v1/accounts", headers=api.admin, json=[
        {"id": bank, "ledger": ledger, "kind": "clearing", "code": 1},
        {"id": purse, "ledger": ledger, "kind": "purse", "code": 1, "flags": [DMNEC]},
        {"id": canteen, "ledger": ledger, "kind": "merchant", "code": 1},
    ])
    assert [x["status"] for x in r.json()] == ["created"] * 3
    [x] = await post(http, api, [tr(ledger, bank, purse, FUNDED, 4)])
    assert x["status"] == "created"
    return World(ledger, bank, purse, canteen)


@pytest.fixture
async def world(http: httpx.AsyncClient, api: Api, ids: Ids) -> World:
    """A fresh funded ledger."""
    return await make_world(http, api, ids)


async def ledger_state(engine: Engine, ledger: int) -> list[tuple[int, ...]]:
    """Every account's live fields and the transfer count of a ledger (SQL)."""
    async with engine.store.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, debits_posted, credits_posted, debits_pending, credits_pending "
            "FROM accounts WHERE ledger = $1 ORDER BY id", ledger)
        n = await conn.fetchval("SELECT count(*) FROM transfers WHERE ledger = $1", ledger)
    return [tuple(r) for r in rows] + [(n,)]


# -- auth ----------------------------------------------------------------------------------------


async def test_auth(http: httpx.AsyncClient, api: Api, world: World) -> None:
    w = world
    body = [tr(w.ledger, w.purse, w.canteen, 100)]
    bad = {"Authorization": "Bearer not-the-token"}
    assert_error(await http.post("/v1/transfers", json=body), 401)
    assert_error(await http.post("/v1/transfers", json=body, headers=bad), 401)
    assert_error(await http.post("/v1/transfers", json=body,
                                 headers={"Authorization": api.admin_token}), 401)  # no scheme
    assert_error(await http.post("/v1/transfers", json=body,
                                 headers={"Authorization": "Bearer"}), 401)
    assert_error(await http.post("/v1/transfers", json=body,
                                 headers={"Authorization": f"Basic {api.admin_token}"}), 401)
    assert_error(await http.post("/v1/transfers", json=body, headers=api.read), 403)
    acc = [{"id": 1, "ledger": w.ledger, "kind": "purse"}]
    assert_error(await http.post("/v1/accounts", json=acc, headers=api.read), 403)
    assert_error(await http.post("/v1/accounts", json=acc), 401)
    # nothing moved
    b = await bal(http, api, w.purse)
    assert b["balance"] == FUNDED

    path = f"/v1/accounts/{w.purse}/balance"
    assert_error(await http.get(path), 401)
    assert_error(await http.get(path, headers=bad), 401)
    for headers in (api.read, api.admin):
        r = await http.get(path, headers=headers)
        assert r.status_code == 200 and r.json()["balance"] == FUNDED
        r = await http.get(f"/v1/accounts/{w.purse}/transfers", headers=headers)
        assert r.status_code == 200 and len(r.json()["transfers"]) == 1
    tid = (await post(http, api, body))[0]["id"]
    assert_error(await http.get(f"/v1/transfers/{tid}"), 401)
    assert (await http.get(f"/v1/transfers/{tid}", headers=api.read)).status_code == 200
    # a bad token on a malformed body is still 401: auth comes first
    assert_error(await http.post("/v1/transfers", content=b"[{", headers=bad), 401)

    for open_path in ("/healthz", "/metrics", "/openapi.json"):
        r = await http.get(open_path)
        assert r.status_code == 200, (open_path, r.text)


# -- 400 -----------------------------------------------------------------------------------------


def _base(w: World) -> Json:
    return tr(w.ledger, w.purse, w.canteen, 100)


BAD_TRANSFERS: Final[dict[str, Any]] = {
    "malformed_json": b'[{"id": ',
    "not_json": b"hello",
    "trailing_garbage": b"[] []",
    "object_not_list": lambda t: t,
    "null": b"null",
    "list_of_numbers": b"[1, 2]",
    "amount_string": lambda t: [{**t, "amount": "100"}],
    "amount_float": lambda t: [{**t, "amount": 100.5}],
    "amount_integral_float": lambda t: [{**t, "amount": 100.0}],
    "amount_exponent": lambda t: json.dumps([t]).replace('"amount": 100', '"amount": 1e2'),
    "amount_bool": lambda t: [{**t, "amount": True}],
    "flags_string": lambda t: [{**t, "flags": "linked"}],
    "unknown_flag": lambda t: [{**t, "flags": ["urgent"]}],
    "unknown_field": lambda t: [{**t, "memo": "x"}],
    "missing_id": lambda t: [{k: v for k, v in t.items() if k != "id"}],
    "missing_ledger": lambda t: [{k: v for k, v in t.items() if k != "ledger"}],
    "negative_debit_id": lambda t: [{**t, "debit_account_id": -1}],
    "negative_credit_id": lambda t: [{**t, "credit_account_id": -5}],
    "negative_ledger": lambda t: [{**t, "ledger": -1}],
    "negative_code": lambda t: [{**t, "code": -1}],
    "negative_timeout": lambda t: [{**t, "timeout_s": -1, "flags": ["pending"]}],
    "debit_id_beyond_int64": lambda t: [{**t, "debit_account_id": 2**63}],
    "credit_id_beyond_int64": lambda t: [{**t, "credit_account_id": 2**64 + 1}],
    "amount_beyond_int64": lambda t: [{**t, "amount": 2**63}],
    "ledger_beyond_int32": lambda t: [{**t, "ledger": 2**31}],
    "non_uuid_id": lambda t: [{**t, "id": "not-a-uuid"}],
    "int_id": lambda t: [{**t, "id": 12345}],
    "non_uuid_pending_id": lambda t: [{**t, "pending_id": "123", "flags": ["post_pending"]}],
    "user_data_257_ascii": lambda t: [{**t, "user_data": "x" * 257}],
    "user_data_258_bytes_129_chars": lambda t: [{**t, "user_data": "é" * 129}],
    "user_data_cjk": lambda t: [{**t, "user_data": "食" * 86}],  # 258 bytes, 86 chars
    "user_data_emoji": lambda t: [{**t, "user_data": "🍜" * 65}],  # 260 bytes, 65 chars
    "user_data_number": lambda t: [{**t, "user_data": 5}],
    "empty_list": b"[]",
    "one_good_one_bad": lambda t: [t, {**t, "id": str(uuid.uuid4()), "amount": "1"}],
}


@pytest.mark.parametrize("case", list(BAD_TRANSFERS))
async def test_bad_transfer_body_400(
    http: httpx.AsyncClient, api: Api, world: World, engine: Engine, case: str
) -> None:
    w = world
    before = await ledger_state(engine, w.ledger)
    spec = BAD_TRANSFERS[case]
    body = spec if isinstance(spec, bytes) else spec(_base(w))
    if isinstance(body, str | bytes):  # raw text: exactly these bytes on the wire
        r = await http.post("/v1/transfers", headers={**api.admin,
                            "Content-Type": "application/json"}, content=body)
    else:
        r = await http.post("/v1/transfers", headers=api.admin, json=body)
    assert_error(r, 400)
    assert await ledger_state(engine, w.ledger) == before


# A string where an integer belongs is refused, never coerced: "100" is not 100 fen.
@pytest.mark.parametrize("field", ["amount", "ledger", "debit_account_id", "code"])
async def test_numeric_string_in_transfer_400(
    http: httpx.AsyncClient, api: Api, world: World, engine: Engine, field: str
) -> None:
    w = world
    before = await ledger_state(engine, w.ledger)
    t = _base(w)
    r = await http.post("/v1/transfers", headers=api.admin, json=[{**t, field: str(t[field])}])
    assert_error(r, 400)
    assert await ledger_state(engine, w.ledger) == before


async def test_numeric_string_in_account_400(http: httpx.AsyncClient, api: Api, ids: Ids) -> None:
    a = {"id": str(ids.account()), "ledger": ids.ledger(), "kind": "purse", "code": "1"}
    assert_error(await http.post("/v1/accounts", headers=api.admin, json=[a]), 400)
    assert_error(await http.get(f"/v1/accounts/{a['id']}/balance", headers=api.read), 404)


async def test_user_data_limit_is_256_bytes(
    http: httpx.AsyncClient, api: Api, world: World
) -> None:
    w = world
    ok = ["x" * 256, "é" * 128, "食" * 85 + "x", "🍜" * 64, ""]
    out = await post(http, api, [tr(w.ledger, w.purse, w.canteen, 1, user_data=u) for u in ok])
    assert [x["status"] for x in out] == ["created"] * len(ok)
    for x, u in zip(out, ok, strict=True):
        r = await http.get(f"/v1/transfers/{x['id']}", headers=api.read)
        assert r.json()["user_data"] == u  # stored and answered byte for byte
    assert (await bal(http, api, w.purse))["balance"] == FUNDED - len(ok)


async def test_lone_surrogate_user_data_is_not_a_500(
    http: httpx.AsyncClient, api: Api, world: World, engine: Engine
) -> None:
    w = world
    before = await ledger_state(engine, w.ledger)
    body = json.dumps([tr(w.ledger, w.purse, w.canteen, 1, user_data="\ud800")]).encode()
    assert b"\\ud800" in body
    r = await http.post("/v1/transfers", headers={**api.admin,
                        "Content-Type": "application/json"}, content=body)
    assert_error(r, 400)
    assert await ledger_state(engine, w.ledger) == before


# PostgreSQL text cannot hold U+0000: refused at the door, or it would fail a whole batch.
async def test_nul_in_user_data_400(
    http: httpx.AsyncClient, api: Api, world: World, engine: Engine
) -> None:
    w = world
    before = await ledger_state(engine, w.ledger)
    r = await http.post("/v1/transfers", headers=api.admin,
                        json=[tr(w.ledger, w.purse, w.canteen, 1, user_data="a\x00b")])
    assert_error(r, 400)
    assert await ledger_state(engine, w.ledger) == before


@pytest.mark.parametrize("field", ["name", "holder_id"])
async def test_nul_in_account_metadata_400(
    http: httpx.AsyncClient, api: Api, ids: Ids, field: str
) -> None:
    a = {"id": ids.account(), "ledger": ids.ledger(), "kind": "purse", field: "a\x00b"}
    assert_error(await http.post("/v1/accounts", headers=api.admin, json=[a]), 400)


BAD_ACCOUNTS: Final[dict[str, Any]] = {
    "malformed_json": b"[{",
    "empty_list": b"[]",
    "object_not_list": lambda a: a,
    "negative_id": lambda a: [{**a, "id": -1}],
    "id_beyond_int64": lambda a: [{**a, "id": 2**63}],
    "ledger_beyond_int32": lambda a: [{**a, "ledger": 2**31}],
    "unknown_kind": lambda a: [{**a, "kind": "wallet"}],
    "unknown_flag": lambda a: [{**a, "flags": ["vip"]}],
    "unknown_field": lambda a: [{**a, "balance": 100}],
    "missing_kind": lambda a: [{k: v for k, v in a.items() if k != "kind"}],
    "missing_id": lambda a: [{k: v for k, v in a.items() if k != "id"}],
    "code_float": lambda a: [{**a, "code": 1.5}],
    "name_too_long": lambda a: [{**a, "name": "n" * 257}],
}


@pytest.mark.parametrize("case", list(BAD_ACCOUNTS))
async def test_bad_account_body_400(
    http: httpx.AsyncClient, api: Api, ids: Ids, case: str
) -> None:
    a = {"id": ids.account(), "ledger": ids.ledger(), "kind": "purse", "code": 1}
    spec = BAD_ACCOUNTS[case]
    if isinstance(spec, bytes):
        r = await http.post("/v1/accounts", headers={**api.admin,
                            "Content-Type": "application/json"}, content=spec)
    else:
        r = await http.post("/v1/accounts", headers=api.admin, json=spec(a))
    assert_error(r, 400)
    assert_error(await http.get(f"/v1/accounts/{a['id']}/balance", headers=api.read), 404)


@pytest.mark.parametrize(
    "path",
    ["/v1/accounts/-1/balance", "/v1/accounts/0/balance", "/v1/accounts/abc/balance",
     f"/v1/accounts/{2**63}/balance", "/v1/accounts/1.5/transfers",
     "/v1/transfers/not-a-uuid", "/v1/transfers/123"],
)
async def test_bad_path_parameters_400(http: httpx.AsyncClient, api: Api, path: str) -> None:
    assert_error(await http.get(path, headers=api.read), 400)


# -- 413 -----------------------------------------------------------------------------------------


async def test_8191_transfers_413(
    http: httpx.AsyncClient, api: Api, world: World, engine: Engine
) -> None:
    w = world
    before = await ledger_state(engine, w.ledger)
    body = [tr(w.ledger, w.purse, w.canteen, 1) for _ in range(limits.MAX_TRANSFERS_PER_REQUEST
                                                              + 1)]
    assert len(body) == 8191
    assert_error(await http.post("/v1/transfers", headers=api.admin, json=body), 413)
    assert await ledger_state(engine, w.ledger) == before


async def test_8190_transfers_fit(http: httpx.AsyncClient, api: Api, world: World) -> None:
    w = world
    body = [tr(w.ledger, w.purse, w.canteen, 1) for _ in range(8190)]
    out = await post(http, api, body)
    assert [x["status"] for x in out] == ["created"] * 8190
    assert (await bal(http, api, w.purse))["balance"] == FUNDED - 8190


async def test_body_over_size_limit_413(
    http: httpx.AsyncClient, api: Api, world: World, engine: Engine
) -> None:
    w = world
    before = await ledger_state(engine, w.ledger)
    # valid JSON, one transfer, padded with whitespace past the limit
    one = json.dumps([tr(w.ledger, w.purse, w.canteen, 1)]).encode()
    big = one[:1] + b" " * limits.MAX_BODY_BYTES + one[1:]
    headers = {**api.admin, "Content-Type": "application/json"}
    assert_error(await http.post("/v1/transfers", headers=headers, content=big), 413)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit still holds
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    assert_error(await http.post("/v1/transfers", headers=headers, content=chunks()), 413)
    assert await ledger_state(engine, w.ledger) == before
    # just under the limit is fine
    small = one[:1] + b" " * (limits.MAX_BODY_BYTES - len(one) - 1) + one[1:]
    r = await http.post("/v1/transfers", headers=headers, content=small)
    assert r.status_code == 200 and r.json()[0]["status"] == "created"


# -- 404 -----------------------------------------------------------------------------------------


async def test_not_found_404(http: httpx.AsyncClient, api: Api, ids: Ids) -> None:
    ghost = ids.account()
    assert_error(await http.get(f"/v1/transfers/{uuid.uuid4()}", headers=api.read), 404)
    assert_error(await http.get(f"/v1/accounts/{ghost}/balance", headers=api.read), 404)
    assert_error(await http.get(f"/v1/accounts/{ghost}/transfers", headers=api.read), 404)
    assert_error(await http.get(f"/v1/accounts/{ghost}/balance?at=2024-01-01T00:00:00Z",
                                headers=api.read), 404)
    assert_error(await http.get("/v1/nope", headers=api.read), 404)
    assert_error(await http.get("/nope"), 404)
    assert_error(await http.post("/v1/nope", headers=api.admin, json=[]), 404)


async def test_wrong_method_is_not_a_500(http: httpx.AsyncClient, api: Api) -> None:
    r = await http.delete("/v1/transfers", headers=api.admin)
    assert r.status_code == 405
    assert set(r.json()) == {"error", "detail"}


# -- GET /v1/transfers/{id} ----------------------------------------------------------------------


async def test_get_transfer_fields_and_state(
    http: httpx.AsyncClient, api: Api, world: World
) -> None:
    w = world
    plain = tr(w.ledger, w.purse, w.canteen, 1_250, user_data="pos-7")
    hold = tr(w.ledger, w.purse, w.canteen, 500, 2, flags=["pending"], timeout_s=600)
    out = await post(http, api, [plain, hold])
    assert [x["status"] for x in out] == ["created", "created"]
    ts_plain, ts_hold = out[0]["timestamp"], out[1]["timestamp"]
    assert ts_plain < ts_hold

    r = (await http.get(f"/v1/transfers/{plain['id']}", headers=api.admin)).json()
    assert r == {
        "id": plain["id"], "ledger": w.ledger, "debit_account_id": w.purse,
        "credit_account_id": w.canteen, "amount": 1_250, "code": 1, "flags": [],
        "timestamp": ts_plain, "state": "posted", "user_data": "pos-7",
    }
    r = (await http.get(f"/v1/transfers/{hold['id']}", headers=api.read)).json()
    assert (r["state"], r["flags"], r["timeout_s"], r["amount"], r["timestamp"]) == (
        "pending", ["pending"], 600, 500, ts_hold)
    # upper-case and brace-free forms of the same UUID find it too
    r2 = await http.get(f"/v1/transfers/{hold['id'].upper()}", headers=api.read)
    assert r2.status_code == 200 and r2.json()["id"] == hold["id"]

    post_ = {"id": str(uuid.uuid4()), "ledger": w.ledger, "pending_id": hold["id"],
             "amount": 200, "flags": ["post_pending"]}
    [x] = await post(http, api, [post_])
    r = (await http.get(f"/v1/transfers/{post_['id']}", headers=api.read)).json()
    assert r == {
        "id": post_["id"], "ledger": w.ledger, "debit_account_id": w.purse,
        "credit_account_id": w.canteen, "amount": 200, "code": 2, "flags": ["post_pending"],
        "timestamp": x["timestamp"], "state": "posted", "pending_id": hold["id"],
    }
    r = (await http.get(f"/v1/transfers/{hold['id']}", headers=api.read)).json()
    assert r["state"] == "settled"
    assert r["timestamp"] == ts_hold  # the hold itself never changes


# -- statements ----------------------------------------------------------------------------------


async def test_statement_pagination(
    http: httpx.AsyncClient, api: Api, world: World, ids: Ids
) -> None:
    w = world
    other = ids.account()
    r = await http.post("/v1/accounts", headers=api.admin, json=[
        {"id": other, "ledger": w.ledger, "kind": "purse", "code": 1}])
    assert r.json()[0]["status"] == "created"
    # 1 top-up (credit side) already; add debits, credits and a hold, in several requests
    sent: list[Json] = []
    for i in range(3):
        batch = [tr(w.ledger, w.purse, w.canteen, 10 + i),
                 tr(w.ledger, other, w.purse, 1 + i, flags=["force"]),
                 tr(w.ledger, w.canteen, other, 5)]  # does not touch the purse
        sent += batch
        out = await post(http, api, batch)
        assert {x["status"] for x in out} == {"created"}
    hold = tr(w.ledger, w.purse, w.canteen, 7, 2, flags=["pending"])
    await post(http, api, [hold])
    expected_n = 1 + 6 + 1

    async def page(**params: Any) -> Json:
        r = await http.get(f"/v1/accounts/{w.purse}/transfers", headers=api.read, params=params)
        assert r.status_code == 200, r.text
        body: Json = r.json()
        assert set(body) == {"transfers", "next_before"}
        return body

    full = await page(limit=1000)
    items = full["transfers"]
    assert full["next_before"] is None
    assert len(items) == expected_n
    stamps = [t["timestamp"] for t in items]
    assert stamps == sorted(stamps, reverse=True) and len(set(stamps)) == len(stamps)
    assert {t["id"] for t in items} >= {t["id"] for t in sent if w.purse in (
        t["debit_account_id"], t["credit_account_id"])}
    assert any(t["debit_account_id"] == w.purse for t in items)
    assert any(t["credit_account_id"] == w.purse for t in items)
    assert all(w.purse in (t["debit_account_id"], t["credit_account_id"]) for t in items)
    assert items[0]["id"] == hold["id"] and items[0]["state"] == "pending"
    assert (await page())["transfers"] == items  # the default limit covers them

    for limit in (1, 2, 3, 4, expected_n - 1, expected_n):
        walked: list[Json] = []
        before: int | None = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": limit}
            if before is not None:
                params["before"] = before
            p = await page(**params)
            pages += 1
            assert 1 <= len(p["transfers"]) <= limit
            walked += p["transfers"]
            if p["next_before"] is None:
                break
            assert p["next_before"] == p["transfers"][-1]["timestamp"]
            before = p["next_before"]
            assert pages <= expected_n
        assert walked == items, limit
        assert pages == -(-expected_n // limit)  # no trailing empty page
    # `before` is exclusive; before the oldest there is nothing
    p = await page(before=items[-1]["timestamp"])
    assert p == {"transfers": [], "next_before": None}
    p = await page(before=items[3]["timestamp"], limit=2)
    assert p["transfers"] == items[4:6] and p["next_before"] == items[5]["timestamp"]


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=abc", "limit=-1",
                                   "before=0", "before=x", f"before={2**63}", "limit=1.5"])
async def test_statement_bad_parameters(
    http: httpx.AsyncClient, api: Api, world: World, query: str
) -> None:
    r = await http.get(f"/v1/accounts/{world.purse}/transfers?{query}", headers=api.read)
    assert_error(r, 400)


# -- balance as of -------------------------------------------------------------------------------


async def test_balance_at(http: httpx.AsyncClient, api: Api, ids: Ids, engine: Engine) -> None:
    w = await make_world(http, api, ids)  # the top-up is the purse's first transfer
    statement = (await http.get(f"/v1/accounts/{w.purse}/transfers",
                                headers=api.read)).json()["transfers"]
    [topup] = statement
    t0 = topup["timestamp"]
    await asyncio.sleep(0.002)
    [meal] = await post(http, api, [tr(w.ledger, w.purse, w.canteen, 1_250)])
    await asyncio.sleep(0.002)
    hold = tr(w.ledger, w.purse, w.canteen, 3_000, 2, flags=["pending"])
    [h] = await post(http, api, [hold])
    await asyncio.sleep(0.002)
    [p] = await post(http, api, [{"id": str(uuid.uuid4()), "ledger": w.ledger,
                                  "pending_id": hold["id"], "amount": 1_000,
                                  "flags": ["post_pending"]}])
    t1, t2, t3 = meal["timestamp"], h["timestamp"], p["timestamp"]
    assert t0 < t1 < t2 < t3
    assert (t1 - t0, t2 - t1, t3 - t2) > (1000, 1000, 1000)  # distinct microseconds

    def fields(b: Json) -> tuple[int, ...]:
        return (b["balance"], b["available"], b["debits_posted"], b["credits_posted"],
                b["debits_pending"], b["credits_pending"])

    before_all = await bal(http, api, w.purse, iso(t0 - 1000))
    assert fields(before_all) == (0, 0, 0, 0, 0, 0)
    assert before_all["account_id"] == w.purse and before_all["ledger"] == w.ledger
    assert fields(await bal(http, api, w.purse, "2000-01-01T00:00:00Z")) == (0,) * 6
    assert fields(await bal(http, api, w.purse, iso(t0))) == (FUNDED, FUNDED, 0, FUNDED, 0, 0)
    after_meal = (FUNDED - 1_250, FUNDED - 1_250, 1_250, FUNDED, 0, 0)
    assert fields(await bal(http, api, w.purse, iso(t1))) == after_meal
    held = (FUNDED - 1_250, FUNDED - 4_250, 1_250, FUNDED, 3_000, 0)
    assert fields(await bal(http, api, w.purse, iso(t2))) == held
    settled = (FUNDED - 2_250, FUNDED - 2_250, 2_250, FUNDED, 0, 0)
    assert fields(await bal(http, api, w.purse, iso(t3))) == settled
    live = await bal(http, api, w.purse)
    assert fields(live) == settled
    # the credit side of the hold, seen from the merchant
    c = await bal(http, api, w.canteen, iso(t2))
    assert (c["balance"], c["available"], c["credits_pending"]) == (1_250, 1_250, 3_000)

    # +08:00 (campus time) names the same instants
    for ns, want in ((t1, after_meal), (t2, held)):
        local = iso(ns, CST)
        assert local.endswith("+08:00")
        assert fields(await bal(http, api, w.purse, local)) == want
        # an unescaped '+' in a query string reads as a space; still understood
        r = await http.get(f"/v1/accounts/{w.purse}/balance?at={local}", headers=api.read)
        assert r.status_code == 200 and fields(r.json()) == want
    # as_of echoes the instant, in UTC with microseconds
    b = await bal(http, api, w.purse, iso(t2, CST))
    assert b["as_of"] == iso(t2)

    # snapshots: the answer is the same whether or not one lies in the window
    await engine.store.snapshot(w.ledger)
    [late] = await post(http, api, [tr(w.ledger, w.purse, w.canteen, 50)])
    for ns, want in ((t0 - 1000, (0,) * 6), (t1, after_meal), (t2, held), (t3, settled)):
        assert fields(await bal(http, api, w.purse, iso(ns))) == want, ns
    assert fields(await bal(http, api, w.purse, iso(late["timestamp"]))) == (
        FUNDED - 2_300, FUNDED - 2_300, 2_300, FUNDED, 0, 0)


async def test_balance_at_with_hold_released_after_snapshot(
    http: httpx.AsyncClient, api: Api, ids: Ids, engine: Engine
) -> None:
    w = await make_world(http, api, ids)
    hold = tr(w.ledger, w.purse, w.canteen, 3_000, 2, flags=["pending"])
    [h] = await post(http, api, [hold])
    snap_ts, _ = await engine.store.snapshot(w.ledger)
    await asyncio.sleep(0.002)
    [v] = await post(http, api, [{"id": str(uuid.uuid4()), "ledger": w.ledger,
                                  "pending_id": hold["id"], "flags": ["void_pending"]}])
    assert h["timestamp"] < snap_ts < v["timestamp"]
    at_snap = await bal(http, api, w.purse, iso(snap_ts))
    assert (at_snap["available"], at_snap["debits_pending"]) == (FUNDED - 3_000, 3_000)
    at_void = await bal(http, api, w.purse, iso(v["timestamp"]))
    assert (at_void["available"], at_void["debits_pending"]) == (FUNDED, 0)


@pytest.mark.parametrize(
    "at",
    ["yesterday", "2024-13-01T00:00:00Z", "2024-01-01T00:00:00", "2024-01-01", "",
     "2024-01-01T25:00:00Z", "1719792000", "2024-01-01T00:00:00+25:00"],
)
async def test_balance_at_malformed_400(
    http: httpx.AsyncClient, api: Api, world: World, at: str
) -> None:
    r = await http.get(f"/v1/accounts/{world.purse}/balance", params={"at": at},
                       headers=api.read)
    assert_error(r, 400)


@pytest.mark.parametrize("at", ["9999-12-31T23:59:59Z", "2300-01-01T00:00:00Z",
                                "0001-01-01T00:00:00Z"])
async def test_balance_at_out_of_range_is_not_a_500(
    http: httpx.AsyncClient, api: Api, world: World, at: str
) -> None:
    r = await http.get(f"/v1/accounts/{world.purse}/balance", params={"at": at},
                       headers=api.read)
    assert_error(r, 400)


# -- operations ----------------------------------------------------------------------------------


async def test_openapi(http: httpx.AsyncClient) -> None:
    r = await http.get("/openapi.json")
    assert r.status_code == 200
    doc = json.loads(r.content)
    assert doc["openapi"].startswith("3.")
    paths = set(doc["paths"])
    for p in ("/v1/accounts", "/v1/transfers", "/v1/transfers/{transfer_id}",
              "/v1/accounts/{account_id}/balance", "/v1/accounts/{account_id}/transfers"):
        assert p in paths, sorted(paths)
    assert "post" in doc["paths"]["/v1/transfers"]


async def test_metrics(http: httpx.AsyncClient, api: Api, world: World) -> None:
    w = world

    def created_count(text: str) -> float:
        for line in text.splitlines():
            if line.startswith('onecard_transfers_total{status="created"}'):
                return float(line.split()[-1])
        return 0.0

    r = await http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    n0 = created_count(r.text)
    assert n0 >= 1  # the world's top-up
    await post(http, api, [tr(w.ledger, w.purse, w.canteen, 1) for _ in range(3)])
    r = await http.get("/metrics")
    assert "# TYPE onecard_transfers_total counter" in r.text
    assert created_count(r.text) == n0 + 3


async def test_request_latency_is_counted_per_route_and_status(http: httpx.AsyncClient) -> None:
    # the timing middleware keeps each labelled child: every request still counts, by status
    def count(text: str, status: str) -> float:
        for line in text.splitlines():
            if line.startswith("onecard_http_request_seconds_count{") and (
                'route="/healthz"' in line and f'status="{status}"' in line
            ):
                return float(line.split()[-1])
        return 0.0

    before = count((await http.get("/metrics")).text, "200")
    for _ in range(3):
        assert (await http.get("/healthz")).status_code == 200
    assert count((await http.get("/metrics")).text, "200") == before + 3


async def test_healthz(http: httpx.AsyncClient) -> None:
    r = await http.get("/healthz")
    assert r.status_code == 200


# -- fuzz: never a 500 ---------------------------------------------------------------------------

# Integers the fuzzer may put anywhere: boundaries and small values, but never an account id
# from the range the session's `ids` hands out (a fuzzed account must not steal one).
_INTS = st.one_of(
    st.integers(min_value=-3, max_value=300),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53, INT64_MAX, 2**63, -(2**63),
                     2**64, 10**30]),
)
_TEXT = st.text(max_size=20)
_SCALARS = st.one_of(
    st.none(), st.booleans(), _INTS,
    st.floats(allow_nan=False, allow_infinity=False),
    _TEXT,
    st.sampled_from(["linked", "pending", "post_pending", "purse", "merchant",
                     "00000000-0000-0000-0000-000000000000", "é" * 200, "x" * 300,
                     "a\x00b"]),
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=12,
)
_FIELDS = ["id", "ledger", "debit_account_id", "credit_account_id", "amount", "code",
           "flags", "pending_id", "timeout_s", "user_data", "kind", "holder_id", "name",
           "extra"]


def _mutated(base: st.SearchStrategy[Json]) -> st.SearchStrategy[Any]:
    """A valid body with one to three fields replaced, dropped or added."""

    def apply(b: Json, edits: list[tuple[str, str, Any]]) -> Any:
        out = dict(b)
        for op, field, value in edits:
            if op == "drop":
                out.pop(field, None)
            else:
                out[field] = value
        return [out]

    plausible = st.sampled_from([None, 0, 1, 7, 2**31 - 1, "", [], ["pending"], ["linked"],
                                 ["void_pending"], ["post_pending", "force"],
                                 "5f0c6b1e-4f5e-4a4e-9a37-2d1f0d1c2b3a", "purse"])
    edit = st.tuples(st.sampled_from(["set", "set", "drop"]), st.sampled_from(_FIELDS),
                     plausible | JSON_VALUES)
    return st.builds(apply, base, st.lists(edit, min_size=0, max_size=3))


# Stand-ins for the test's own ledger and accounts (the strategies run before the fixtures'
# values are at hand); the test substitutes them in every top-level field.
_LEDGER, _PURSE, _CANTEEN = "$ledger", "$purse", "$canteen"


def _valid_transfer() -> st.SearchStrategy[Json]:
    def build(amount: int, flags: list[str], ud: str | None) -> Json:
        body = tr(0, 0, 0, amount, flags=flags)
        body.update(ledger=_LEDGER, debit_account_id=_PURSE, credit_account_id=_CANTEEN)
        if ud is not None:
            body["user_data"] = ud
        return body

    return st.builds(build, st.integers(1, 50),
                     st.sampled_from([[], ["pending"], ["force"], ["linked"]]),
                     st.none() | _TEXT)


def _valid_account() -> st.SearchStrategy[Json]:
    def build(n: int, kind: str) -> Json:
        # far above the session's id range; fuzzed ids come from _INTS, below it
        return {"id": 9_000_000_000_000 + uuid.uuid4().int % 10**12, "ledger": _LEDGER,
                "kind": kind, "code": n}

    return st.builds(build, st.integers(0, 9), st.sampled_from(["purse", "merchant", "fund"]))


_PRIVATE_IDS: Final = 9_000_000_000_000


def _substitute(body: Any, w: World, path: str) -> Any:
    real = {_LEDGER: w.ledger, _PURSE: w.purse, _CANTEEN: w.canteen}

    def value(field: str, v: Any) -> Any:
        if isinstance(v, str):
            return real.get(v, v)
        # A fuzzed account may be valid and get created: keep its id out of every range other
        # tests use (they may create small fixed ids, or take them from `ids`).
        if path == "/v1/accounts" and field == "id" and type(v) is int and 0 < v < _PRIVATE_IDS:
            return v + _PRIVATE_IDS
        return v

    if isinstance(body, list):
        return [{k: value(k, v) for k, v in x.items()} if isinstance(x, dict) else x
                for x in body]
    return body


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    path=st.sampled_from(["/v1/transfers", "/v1/accounts"]),
    body=st.one_of(JSON_VALUES, _mutated(_valid_transfer()), _mutated(_valid_account()),
                   st.lists(JSON_VALUES, max_size=3)),
)
async def test_fuzz_never_500(
    http: httpx.AsyncClient, api: Api, world: World, engine: Engine, path: str, body: Any
) -> None:
    body = _substitute(body, world, path)
    before = await ledger_state(engine, world.ledger)
    raw = json.dumps(body).encode()
    r = await http.post(path, headers={**api.admin, "Content-Type": "application/json"},
                        content=raw)
    assert r.status_code in (200, 400, 413), (r.status_code, r.text, raw)
    event(f"{path} -> {r.status_code}")
    if r.status_code != 200:
        assert set(r.json()) == {"error", "detail"}
        assert await ledger_state(engine, world.ledger) == before
    else:
        assert isinstance(r.json(), list) and len(r.json()) == len(body)

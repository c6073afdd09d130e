"""Hostile HTTP input against the real server: hypothesis-generated garbage for every request
body, path and query, plus the classic edge cases (huge numbers, deep nesting, NaN, invalid
UTF-8, unknown fields, wrong types, negative and zero amounts).

Every answer must be a 4xx with the contract's error shape (or a 200 whose transfers are all
refused), never a 500; the guarded ledger must not change by a single fen.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.conftest import Target
from tests.faults.harness import ADMIN, ADMIN_TOKEN, READ, READ_TOKEN

ERROR_CODES = {
    "invalid_body",
    "invalid_parameter",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "too_large",
    "overloaded",
    "unavailable",
}
POST_OK = {200, 400, 404, 413}
GET_OK = {200, 400, 404}
EXAMPLES = 150
NOWHERE = 7_399_999_999  # an account id that never exists
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)

HOSTILE_INTS = [
    0,
    -1,
    1,
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    -(2**63) - 1,
    10**30,
]
HOSTILE_SCALARS: list[Any] = [
    *HOSTILE_INTS,
    1.5,
    -0.0,
    1e308,
    "100",
    "",
    "x" * 300,
    "💰" * 100,
    "\u0000",
    None,
    True,
    False,
    [],
    {},
    [1],
    {"a": 1},
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "not-a-uuid",
    "1e3",
    "0x10",
]
FLAG_NAMES = ["linked", "pending", "post_pending", "void_pending", "force", "closed", "", "LINKED"]
TRANSFER_FIELDS = [
    "id",
    "ledger",
    "debit_account_id",
    "credit_account_id",
    "amount",
    "code",
    "flags",
    "pending_id",
    "timeout_s",
    "user_data",
    "timestamp",
    "evil",
    "__proto__",
]
ACCOUNT_FIELDS = ["id", "ledger", "kind", "code", "flags", "holder_id", "name", "balance"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(HOSTILE_SCALARS)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=25,
)
hostile = st.sampled_from(HOSTILE_SCALARS) | scalars
flag_lists = st.lists(st.sampled_from(FLAG_NAMES), max_size=4)


@st.composite
def hostile_transfer(draw: st.DrawFn, ledger: int, debit: int) -> dict[str, Any]:
    """A transfer from an unfunded purse to an account that does not exist, with up to four
    fields replaced by hostile values, dropped, or added: it can never move money."""
    t: dict[str, Any] = {
        "id": str(draw(st.uuids())),
        "ledger": ledger,
        "debit_account_id": debit,
        "credit_account_id": NOWHERE,
        "amount": draw(st.integers(-10, 10**6)),
        "code": 1,
    }
    for key in draw(st.lists(st.sampled_from(TRANSFER_FIELDS), max_size=4, unique=True)):
        if key in t and draw(st.booleans()):
            del t[key]
        elif key == "flags":
            t[key] = draw(flag_lists | hostile)
        else:
            t[key] = draw(hostile)
    return t


@st.composite
def hostile_account(draw: st.DrawFn) -> dict[str, Any]:
    """An account with hostile fields (creating one moves no money)."""
    a: dict[str, Any] = {
        "id": draw(st.integers(1, 2**40)),
        "ledger": draw(st.integers(1, 9)),
        "kind": draw(st.sampled_from(["purse", "merchant", "fund", "x", ""])),
    }
    for key in draw(st.lists(st.sampled_from(ACCOUNT_FIELDS), max_size=3, unique=True)):
        if key in a and draw(st.booleans()):
            del a[key]
        else:
            a[key] = draw(flag_lists if key == "flags" else hostile)
    return a


def _check_error(r: httpx.Response) -> None:
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] in ERROR_CODES, r.text


def _check_transfers_answer(r: httpx.Response) -> None:
    assert r.status_code in POST_OK, (r.status_code, r.text[:300])
    if r.status_code == 200:
        statuses = {x["status"] for x in r.json()}
        assert not statuses & {"created", "exists"}, statuses
    else:
        _check_error(r)


def _post_routes(url: str) -> list[str]:
    doc = httpx.get(f"{url}/openapi.json", timeout=10).json()
    return sorted(p for p, ops in doc["paths"].items() if "post" in ops)


async def _fuzz(target: Target, run: Any) -> None:
    """Run a synchronous hypothesis fuzzer in a thread (the server is another process), then
    check that the guarded ledger did not move and that double entry holds everywhere."""
    before = await target.fingerprint()
    await asyncio.to_thread(run)
    assert await target.fingerprint() == before, "garbage moved money"
    assert await target.unbalanced_ledgers() == []
    assert "unhandled error" not in target.server.log_text(), target.server.log_tail()


async def test_hostile_transfers(target: Target) -> None:
    book = target.book

    def run() -> None:
        with httpx.Client(base_url=target.url, headers=ADMIN, timeout=10) as c:

            @FUZZ
            @given(st.lists(hostile_transfer(book.ledger, book.empty), min_size=0, max_size=6))
            def one(body: list[dict[str, Any]]) -> None:
                _check_transfers_answer(c.post("/v1/transfers", json=body))

            one()

    await _fuzz(target, run)


async def test_garbage_json_and_bytes_on_every_post_route(target: Target) -> None:
    routes = _post_routes(target.url)
    assert "/v1/transfers" in routes and "/v1/accounts" in routes

    def run() -> None:
        with httpx.Client(base_url=target.url, headers=ADMIN, timeout=10) as c:

            @FUZZ
            @given(
                st.sampled_from(routes),
                st.text(max_size=20),
                json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=600),
            )
            def one(route: str, param: str, body: bytes) -> None:
                path = route.replace("{card_no}", quote(param or "x", safe=""))
                r = c.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code in POST_OK, (path, r.status_code, r.text[:300])
                if route == "/v1/transfers" and r.status_code == 200:
                    assert not {x["status"] for x in r.json()} & {"created", "exists"}
                if r.status_code != 200:
                    _check_error(r)

            one()

    await _fuzz(target, run)


async def test_hostile_accounts(target: Target) -> None:
    def run() -> None:
        with httpx.Client(base_url=target.url, headers=ADMIN, timeout=10) as c:

            @FUZZ
            @given(st.lists(hostile_account(), max_size=4))
            def one(body: list[dict[str, Any]]) -> None:
                r = c.post("/v1/accounts", json=body)
                assert r.status_code in POST_OK, (r.status_code, r.text[:300])
                if r.status_code != 200:
                    _check_error(r)

            one()

    await _fuzz(target, run)


async def test_garbage_paths_and_queries(target: Target) -> None:
    paths = [
        "/v1/transfers/{}",
        "/v1/accounts/{}/balance",
        "/v1/accounts/{}/transfers",
        "/v1/cards/{}/balance",
    ]

    def run() -> None:
        with httpx.Client(base_url=target.url, headers=READ, timeout=10) as c:

            @FUZZ
            @given(
                st.sampled_from(paths),
                st.text(min_size=1, max_size=30) | st.sampled_from([str(v) for v in HOSTILE_INTS]),
                st.dictionaries(
                    st.sampled_from(["at", "limit", "before"]),
                    st.text(max_size=30) | st.sampled_from([str(v) for v in HOSTILE_INTS]),
                ),
            )
            def one(template: str, param: str, query: dict[str, str]) -> None:
                r = c.get(template.format(quote(param, safe="")), params=query)
                assert r.status_code in GET_OK, (
                    template,
                    param,
                    query,
                    r.status_code,
                    r.text[:300],
                )
                if r.status_code != 200:
                    _check_error(r)

            one()

    await _fuzz(target, run)


async def test_garbage_tokens(target: Target) -> None:
    def run() -> None:
        with httpx.Client(base_url=target.url, timeout=10) as c:

            @FUZZ
            @given(
                st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
            )
            def one(auth: str) -> None:
                auth = auth.strip()  # HTTP forbids surrounding blanks in a header value
                if ADMIN_TOKEN in auth or READ_TOKEN in auth:
                    return
                r = c.post("/v1/transfers", json=[], headers={"authorization": auth})
                assert r.status_code in (401, 403), (auth, r.status_code)
                _check_error(r)
                r = c.get("/v1/accounts/1/balance", headers={"authorization": auth})
                assert r.status_code == 401, (auth, r.status_code)

            one()

    await _fuzz(target, run)


def _raw(body: bytes) -> dict[str, Any]:
    return {"content": body, "headers": {**ADMIN, "content-type": "application/json"}}


async def test_edge_cases(target: Target) -> None:
    book = target.book
    meal = {
        "id": str(uuid.uuid4()),
        "ledger": book.ledger,
        "debit_account_id": book.purses[0],
        "credit_account_id": book.merchants[0],
        "amount": 100,
        "code": 1,
    }
    body = json.dumps([meal]).encode()
    cases: dict[str, tuple[bytes, int]] = {
        "deep nesting": (b"[" * 100_000 + b"]" * 100_000, 400),
        "huge integer": (body.replace(b'"amount": 100', b'"amount": ' + b"9" * 5000), 400),
        "NaN": (body.replace(b'"amount": 100', b'"amount": NaN'), 400),
        "Infinity": (body.replace(b'"amount": 100', b'"amount": Infinity'), 400),
        "float amount": (body.replace(b'"amount": 100', b'"amount": 100.0'), 400),
        "string amount": (body.replace(b'"amount": 100', b'"amount": "100"'), 400),
        "amount over int64": (
            body.replace(b'"amount": 100', b'"amount": 9223372036854775808'),
            400,
        ),
        "invalid utf-8": (body.replace(b'"code": 1', b'"code": 1, "user_data": "\xff\xfe"'), 400),
        "unknown field": (body.replace(b'"code": 1', b'"code": 1, "timestamp": 1'), 400),
        "truncated": (body[: len(body) // 2], 400),
        "not a list": (json.dumps(meal).encode(), 400),
        "empty list": (b"[]", 400),
        "empty body": (b"", 400),
        "null": (b"null", 400),
        "user_data over 256 bytes": (json.dumps([{**meal, "user_data": "饭" * 86}]).encode(), 400),
        "NUL in user_data": (json.dumps([{**meal, "user_data": "a\u0000b"}]).encode(), 400),
        "too many transfers": (json.dumps([meal] * 8191).encode(), 413),
    }
    before = await target.fingerprint()
    async with httpx.AsyncClient(base_url=target.url, timeout=30) as c:
        for name, (raw, want) in cases.items():
            r = await c.post("/v1/transfers", **_raw(raw))
            assert r.status_code == want, (name, r.status_code, r.text[:300])
            _check_error(r)
        # Zero and negative amounts, and a duplicate key that tries to sneak a negative amount
        # past a positive one: refused per transfer, nothing posted.
        for amount in (0, -1, -(2**63) + 1):
            r = await c.post(
                "/v1/transfers",
                json=[{**meal, "id": str(uuid.uuid4()), "amount": amount}],
                headers=ADMIN,
            )
            assert r.status_code in (200, 400), r.text
            if r.status_code == 200:
                assert r.json()[0]["status"] == "amount_must_be_positive", r.text
        dup = json.dumps([meal]).replace('"amount": 100', '"amount": 100, "amount": -100')
        r = await c.post(
            "/v1/transfers", **_raw(dup.replace(meal["id"], str(uuid.uuid4())).encode())
        )
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200:
            assert r.json()[0]["status"] == "amount_must_be_positive", r.text
        # Wrong methods are 405, not 500.
        for method in ("PUT", "DELETE", "PATCH"):
            r = await c.request(method, "/v1/transfers", headers=ADMIN)
            assert r.status_code == 405, (method, r.status_code)
    assert await target.fingerprint() == before


async def test_a_poisoned_transfer_cannot_fail_other_clients(target: Target) -> None:
    """Requests are merged into one database transaction: a transfer that the database would
    refuse (U+0000 in user_data) must be stopped at the edge, not sink everyone's batch."""
    book = target.book
    good = [
        [
            {
                "id": str(uuid.uuid4()),
                "ledger": book.ledger,
                "debit_account_id": book.purses[1],
                "credit_account_id": book.merchants[1],
                "amount": 1,
                "code": 1,
            }
        ]
        for _ in range(20)
    ]
    bad = [[{**g[0], "id": str(uuid.uuid4()), "user_data": "x\u0000"}] for g in good]
    async with httpx.AsyncClient(base_url=target.url, timeout=30, headers=ADMIN) as c:
        answers = await asyncio.gather(
            *(c.post("/v1/transfers", json=b) for pair in zip(good, bad, strict=True) for b in pair)
        )
    for r, body in zip(
        answers, [b for pair in zip(good, bad, strict=True) for b in pair], strict=True
    ):
        if "user_data" in body[0]:
            assert r.status_code == 400, r.text
        else:
            assert r.status_code == 200 and r.json()[0]["status"] == "created", r.text

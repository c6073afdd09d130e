"""Clean answers for bad input (issue 18, finding 8): a 4xx ``{"error", "detail"}``, never a
500 and never a silent wrong read. The live HTTP API (httpx over a real socket) on the
session's engine and PostgreSQL; each test ends with the touched ledgers' books in balance."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from typing import Any, Final
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.campus import Campus, Outcome
from engine.campus.accounts import holder_account_ids
from engine.http.params import rfc3339
from engine.service import Engine
from ledger.transfer import MAX_TIMEOUT_S, USER_DATA_MAX_BYTES, Transfer
from ledger.types import TransferFlag
from tests.campus.test_campus import World as CampusWorld
from tests.campus.test_campus import card_number
from tests.conftest import Api, Ids

Json = dict[str, Any]
SUPERSCRIPT_TWO: Final = "\u00b2"
ARABIC_INDIC: Final = str.maketrans("0123456789", "".join(chr(0x0660 + d) for d in range(10)))
SQL_UNBALANCED = """
SELECT ledger FROM accounts WHERE ledger = ANY($1::int[]) GROUP BY ledger
HAVING sum(debits_posted) <> sum(credits_posted) OR sum(debits_pending) <> sum(credits_pending)
"""


def arabic(n: int) -> str:
    """``n`` written in Arabic-Indic digits (int() reads them as ``n``)."""
    return str(n).translate(ARABIC_INDIC)


def assert_error(r: httpx.Response, status: int = 400) -> Json:
    assert r.status_code == status, (r.status_code, r.text)
    body: Json = r.json()
    assert set(body) == {"error", "detail"} and body["error"] and body["detail"], body
    return body


async def assert_balanced(engine: Engine, *ledgers: int) -> None:
    """The fault suite's invariant: per ledger, debits equal credits (posted and pending)."""
    async with engine.store.pool.acquire() as conn:
        assert await conn.fetch(SQL_UNBALANCED, list(ledgers)) == []


async def accounts(http: httpx.AsyncClient, api: Api, ids: Ids, *kinds: str,
                   ledger: int | None = None) -> tuple[int, list[int]]:
    """A ledger (fresh unless given) with one new account per kind, no flags."""
    ledger = ledger or ids.ledger()
    aids = ids.accounts(len(kinds))
    r = await http.post("/v1/accounts", headers=api.admin, json=[
        {"id": a, "ledger": ledger, "kind": k, "code": 1} for a, k in zip(aids, kinds, strict=True)
    ])
    assert [x["status"] for x in r.json()] == ["created"] * len(kinds), r.text
    return ledger, aids


async def transfer(http: httpx.AsyncClient, api: Api, ledger: int, debit: int, credit: int,
                   amount: int, **kw: Any) -> Json:
    body = {"id": str(uuid.uuid4()), "ledger": ledger, "debit_account_id": debit,
            "credit_account_id": credit, "amount": amount, "code": 1, **kw}
    r = await http.post("/v1/transfers", headers=api.admin, json=[body])
    assert r.status_code == 200, r.text
    out: Json = r.json()[0]
    assert out["status"] == "created", out
    return {**body, **out}


async def holder(http: httpx.AsyncClient, api: Api, ledger: int, hid: str) -> None:
    r = await http.post("/v1/holders", headers=api.admin,
                        json={"id": hid, "ledger": ledger, "name": "Zhang San",
                              "kind": "student"})
    assert r.status_code == 200, r.text


# -- numbers in paths and queries are ASCII digits ------------------------------------------


async def test_unicode_digits_in_paths_and_queries_are_400(
    http: httpx.AsyncClient, api: Api, ids: Ids, engine: Engine
) -> None:
    ledger, (bank, purse) = await accounts(http, api, ids, "clearing", "purse")
    t = await transfer(http, api, ledger, bank, purse, 500, code=4)
    hdr = api.read
    # "²".isdigit() is True and int("²") raises: was a 500
    assert_error(await http.get(f"/v1/accounts/{SUPERSCRIPT_TWO}/balance", headers=hdr))
    assert_error(await http.get(f"/v1/accounts/{SUPERSCRIPT_TWO}/transfers", headers=hdr))
    # int() reads Arabic-Indic digits: this read the purse's balance and statement
    assert_error(await http.get(f"/v1/accounts/{arabic(purse)}/balance", headers=hdr))
    assert_error(await http.get(f"/v1/accounts/{arabic(purse)}/transfers", headers=hdr))
    for query in ({"limit": arabic(5)}, {"before": arabic(t["timestamp"] + 1)},
                  {"limit": SUPERSCRIPT_TWO}, {"limit": " 5"}, {"limit": "+5"},
                  {"before": "1_000"}):
        r = await http.get(f"/v1/accounts/{purse}/transfers", headers=hdr, params=query)
        assert_error(r)
    # uuid.UUID() reads other scripts' digits, "+" and "_" too: never another transfer's id
    digits = t["id"].replace("-", "")
    for tid in (arabic(1) * 32, "+" + "0" * 31, "0" * 30 + "_1", "{" + t["id"] + "}",
                "urn:uuid:" + t["id"]):
        assert_error(await http.get(f"/v1/transfers/{quote(tid, safe='')}", headers=hdr))
    for tid in (t["id"], digits, t["id"].upper()):  # the forms a JSON body takes
        r = await http.get(f"/v1/transfers/{tid}", headers=hdr)
        assert r.status_code == 200 and r.json()["id"] == t["id"], r.text
    assert (await http.get(f"/v1/accounts/{purse}/balance", headers=hdr)).json()["balance"] \
        == 500
    await assert_balanced(engine, ledger)


NUMBERISH: Final = st.text(
    alphabet=st.characters(categories=["Nd", "No", "Nl"]) | st.sampled_from("0123456789+-_ "),
    min_size=1, max_size=20,
)
ROUTES: Final = ["/v1/accounts/{}/balance", "/v1/accounts/{}/transfers", "/v1/transfers/{}",
                 "/v1/cards/{}/balance"]


async def test_no_path_segment_or_query_number_is_a_500(api: Api) -> None:
    """Number-like text from every script in every path parameter and integer query: 400 or
    404, and 200 only for ASCII digits."""

    def run() -> None:
        with httpx.Client(base_url=api.base_url, headers=api.read, timeout=10) as c:

            @settings(max_examples=200, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(st.sampled_from(ROUTES), NUMBERISH,
                   st.sampled_from(["limit", "before", "at"]), NUMBERISH)
            def one(route: str, segment: str, name: str, value: str) -> None:
                r = c.get(route.format(quote(segment, safe="")), params={name: value})
                assert r.status_code in (200, 400, 404), (route, segment, name, value, r.text)
                if r.status_code == 200:
                    assert segment.isascii(), (route, segment)
                else:
                    assert set(r.json()) == {"error", "detail"}

            one()

    await asyncio.to_thread(run)


# -- U+0000 (and a trailing newline) in text the database stores ------------------------------


@pytest.mark.parametrize("case", ["holder_id", "holder_name", "card_holder_id",
                                  "subsidy_holder_id", "subsidy_batch_id"])
async def test_nul_in_campus_text_is_400(
    http: httpx.AsyncClient, api: Api, ids: Ids, engine: Engine, case: str
) -> None:
    ledger = ids.ledger()
    hid = "H" + secrets.token_hex(4)
    await holder(http, api, ledger, hid)
    nul = "a\x00b"
    posts = {
        "holder_id": ("/v1/holders", {"id": nul, "ledger": ledger, "name": "n",
                                      "kind": "student"}),
        "holder_name": ("/v1/holders", {"id": hid + "2", "ledger": ledger, "name": nul,
                                        "kind": "student"}),
        "card_holder_id": ("/v1/cards", {"card_no": card_number(), "holder_id": nul}),
        "subsidy_holder_id": ("/v1/subsidies", [{"ledger": ledger, "holder_id": nul,
                                                 "amount": 100, "batch_id": "b1"}]),
        "subsidy_batch_id": ("/v1/subsidies", [{"ledger": ledger, "holder_id": hid,
                                                "amount": 100, "batch_id": nul}]),
    }
    path, body = posts[case]
    assert_error(await http.post(path, headers=api.admin, json=body))
    async with engine.store.pool.acquire() as conn:  # nothing was created
        assert await conn.fetchval("SELECT count(*) FROM holders WHERE ledger = $1", ledger) == 1
        assert await conn.fetchval("SELECT count(*) FROM transfers WHERE ledger = $1", ledger) \
            == 0


@pytest.mark.parametrize("field", ["room_id", "new_card_no"])
async def test_a_trailing_newline_does_not_pass_a_pattern(
    http: httpx.AsyncClient, api: Api, ids: Ids, engine: Engine, field: str
) -> None:
    """msgspec searches patterns with Python's re, whose ``$`` also matches before a final
    newline: a 28-character room id or a card number with "\\n" after it passed and then
    broke the table's CHECK (500). Every pattern of the campus API now matches whole strings
    (card numbers, PINs and terminal fields were refused deeper down already)."""
    ledger = ids.ledger()
    hid = "H" + secrets.token_hex(4)
    await holder(http, api, ledger, hid)
    card = card_number()
    ok = await http.post("/v1/cards", headers=api.admin, json={"card_no": card, "holder_id": hid})
    assert ok.status_code == 200, ok.text
    posts: dict[str, tuple[str, Json]] = {
        "room_id": ("/v1/rooms", {"room_id": "x" * 28 + "\n", "ledger": ledger}),
        "new_card_no": (f"/v1/cards/{card}/replace", {"new_card_no": card_number() + "\n"}),
    }
    path, body = posts[field]
    assert_error(await http.post(path, headers=api.admin, json=body))
    async with engine.store.pool.acquire() as conn:  # nothing was created or changed
        assert await conn.fetchval("SELECT count(*) FROM rooms WHERE ledger = $1", ledger) == 0
        assert await conn.fetch("SELECT status FROM cards WHERE ledger = $1", ledger) == [
            ("active",)]


# -- subsidies are validated before anything reaches a batch ----------------------------------


async def test_a_poisoned_subsidy_cannot_fail_other_clients(
    http: httpx.AsyncClient, api: Api, ids: Ids, engine: Engine
) -> None:
    """A subsidy whose batch id PostgreSQL refuses (U+0000) used to reach the group-committed
    batch: it failed there (500), taking other clients' transfers merged with it down too."""
    ledger = ids.ledger()
    hid = "H" + secrets.token_hex(4)
    await holder(http, api, ledger, hid)
    other, (bank, purse) = await accounts(http, api, ids, "clearing", "purse")
    good = [[{"id": str(uuid.uuid4()), "ledger": other, "debit_account_id": bank,
              "credit_account_id": purse, "amount": 1, "code": 4}] for _ in range(20)]
    bad = [{"ledger": ledger, "holder_id": hid, "amount": 100, "batch_id": f"b{i}\x00"}
           for i in range(20)]
    answers = await asyncio.gather(*(
        call for g, b in zip(good, bad, strict=True)
        for call in (http.post("/v1/transfers", headers=api.admin, json=g),
                     http.post("/v1/subsidies", headers=api.admin, json=[b]))
    ))
    for r in answers[1::2]:
        assert_error(r)
    for r in answers[0::2]:  # each created by its own (first) submission
        assert r.status_code == 200 and r.json()[0]["status"] == "created", r.text
    subsidy = holder_account_ids(ledger, hid)[1]
    assert (await http.get(f"/v1/accounts/{subsidy}/balance", headers=api.read)).json()[
        "balance"] == 0
    await assert_balanced(engine, ledger, other)


async def test_a_batch_id_must_fit_the_user_data(
    http: httpx.AsyncClient, api: Api, ids: Ids, engine: Engine
) -> None:
    """64 characters of 4-byte UTF-8 made a 264-byte user_data ("subsidy " + the id), past
    the 256 bytes a transfer holds; the longest batch id that fits is accepted."""
    ledger = ids.ledger()
    hid = "H" + secrets.token_hex(4)
    await holder(http, api, ledger, hid)
    item = {"ledger": ledger, "holder_id": hid, "amount": 100}
    too_long = "\U0001f35a" * 64  # rice bowls: 64 characters, 256 bytes
    assert_error(await http.post("/v1/subsidies", headers=api.admin,
                                 json=[{**item, "batch_id": too_long}]))
    fits = "\U0001f35a" * 62  # 248 bytes: user_data exactly 256
    r = await http.post("/v1/subsidies", headers=api.admin, json=[{**item, "batch_id": fits}])
    assert r.status_code == 200 and r.json()[0]["status"] == "created", r.text
    async with engine.store.pool.acquire() as conn:
        sizes = [x[0] for x in await conn.fetch(
            "SELECT octet_length(user_data) FROM transfers WHERE ledger = $1", ledger)]
    assert sizes == [USER_DATA_MAX_BYTES]
    await assert_balanced(engine, ledger)


# -- sums past the bigint range ----------------------------------------------------------------


async def test_balance_at_after_huge_voided_holds(
    http: httpx.AsyncClient, api: Api, ids: Ids, engine: Engine
) -> None:
    """Holds created in the window are summed, releases subtracted: two voided holds of
    6e18 fen overflowed bigint (a 500) although every field fits at every instant."""
    ledger, (bank, merchant) = await accounts(http, api, ids, "clearing", "merchant")
    huge = 6 * 10**18
    for _ in range(2):
        h = await transfer(http, api, ledger, bank, merchant, huge, code=2, flags=["pending"])
        await transfer(http, api, ledger, 0, 0, 0, code=0, pending_id=h["id"],
                       flags=["void_pending"])
    last = await transfer(http, api, ledger, bank, merchant, 7)
    at = rfc3339(last["timestamp"] + 1000)  # the balance read floors to the microsecond
    r = await http.get(f"/v1/accounts/{merchant}/balance", headers=api.read, params={"at": at})
    assert r.status_code == 200, r.text
    b = r.json()
    assert (b["balance"], b["credits_pending"], b["credits_posted"]) == (7, 0, 7)
    r = await http.get(f"/v1/accounts/{bank}/balance", headers=api.read, params={"at": at})
    assert r.status_code == 200 and r.json()["debits_pending"] == 0, r.text
    await assert_balanced(engine, ledger)


async def test_daily_spending_past_bigint_is_a_refusal_not_an_outage(
    engine: Engine, ids: Ids
) -> None:
    """Both purses of a limited card debited (with force, offline) past 9.2e18 fen in one day:
    the daily sum overflowed bigint inside the shared card-state read, so the payment, and
    every payment sharing that statement, answered UNAVAILABLE (96)."""
    campus = Campus(engine)
    w = await CampusWorld(engine, campus, ids).setup(daily_limit=1_000)
    huge = 5 * 10**18
    for purse, merchant in ((w.purse, w.canteen), (w.subsidy, w.water_acc)):
        st = await w.post(Transfer(id=uuid.uuid4(), ledger=w.ledger, debit_account_id=purse,
                                   credit_account_id=merchant, amount=huge, code=1,
                                   flags=(TransferFlag.FORCE,)))
        assert [s.value for s in st] == ["created"]
    r = await campus.purchase(w.pos, card_no=w.card, amount=1, key=uuid.uuid4())
    assert r.outcome is Outcome.DAILY_LIMIT_EXCEEDED
    assert await w.balances() == (-huge, -huge)
    await assert_balanced(engine, w.ledger)


# -- the hold timeout's bound ---------------------------------------------------------------


async def test_a_hold_timeout_beyond_a_week_is_a_400_naming_the_limit(
    http: httpx.AsyncClient, api: Api, ids: Ids, engine: Engine
) -> None:
    """Kept a 400 (contract §4: malformed body), not a transfer status: the bound is part of
    the published schema (``maximum`` in /openapi.json), so a client can know it before
    sending, and the contract's status list has no name for it. A week is accepted."""
    ledger, (bank, merchant) = await accounts(http, api, ids, "clearing", "merchant")
    base = {"ledger": ledger, "debit_account_id": bank, "credit_account_id": merchant,
            "amount": 1, "code": 2, "flags": ["pending"]}
    r = await http.post("/v1/transfers", headers=api.admin,
                        json=[{**base, "id": str(uuid.uuid4()), "timeout_s": MAX_TIMEOUT_S + 1}])
    detail = assert_error(r)["detail"]
    assert "timeout_s" in detail and str(MAX_TIMEOUT_S) in detail, detail
    schema = (await http.get("/openapi.json")).json()["components"]["schemas"]["Transfer"]
    timeout = schema["properties"]["timeout_s"]
    assert any(s.get("maximum") == MAX_TIMEOUT_S for s in timeout.get("anyOf", [timeout])), timeout
    held = await transfer(http, api, ledger, bank, merchant, 1, code=2, flags=["pending"],
                          timeout_s=MAX_TIMEOUT_S)
    assert held["status"] == "created"
    await assert_balanced(engine, ledger)

"""Every account and transfer status of contract §1 (and the extensions of ``ledger.status``),
each driven over the real HTTP API against the real database, with the balances it leaves.

``daily_limit_exceeded`` and ``card_not_active`` belong to the campus layer and are tested
there. Each test builds its own ledger and accounts (fresh ``ids``), so tests never share money.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any, Final

import httpx
import msgspec
import pytest

from engine.service import Engine
from ledger.status import AccountStatus, TransferStatus
from ledger.types import INT64_MAX, AccountFlags
from tests.conftest import Api, Ids

NIL: Final = "00000000-0000-0000-0000-000000000000"
DMNEC: Final = "debits_must_not_exceed_credits"
CMNED: Final = "credits_must_not_exceed_debits"
# Codes of contract §1 used below.
MEAL, HOT_WATER, TOP_UP, REFUND = 1, 2, 4, 6
FUNDED: Final = 10_000  # what the `world` fixture tops the purse up with

Json = dict[str, Any]


# -- helpers -------------------------------------------------------------------------------------


def new_id() -> str:
    """A fresh transfer id."""
    return str(uuid.uuid4())


def tr(ledger: int, debit: int, credit: int, amount: int, code: int = MEAL, **kw: Any) -> Json:
    """A transfer body with a fresh id."""
    return {"id": new_id(), "ledger": ledger, "debit_account_id": debit,
            "credit_account_id": credit, "amount": amount, "code": code, **kw}


async def post(http: httpx.AsyncClient, api: Api, transfers: list[Json]) -> list[Json]:
    """POST /v1/transfers; asserts 200 and one answer per transfer, in order."""
    r = await http.post("/v1/transfers", headers=api.admin, json=transfers)
    assert r.status_code == 200, r.text
    out: list[Json] = r.json()
    assert [x["id"] for x in out] == [t["id"] for t in transfers]
    for x in out:
        if x["status"] in ("created", "exists"):
            assert isinstance(x["timestamp"], int) and x["timestamp"] > 0, x
        else:
            assert "timestamp" not in x, x
    return out


async def statuses(http: httpx.AsyncClient, api: Api, transfers: list[Json]) -> list[str]:
    """The statuses of one request."""
    return [x["status"] for x in await post(http, api, transfers)]


async def accounts(http: httpx.AsyncClient, api: Api, bodies: list[Json]) -> list[str]:
    """POST /v1/accounts; the statuses in request order."""
    r = await http.post("/v1/accounts", headers=api.admin, json=bodies)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [x["id"] for x in out] == [b["id"] for b in bodies]
    return [x["status"] for x in out]


async def balance(http: httpx.AsyncClient, api: Api, account_id: int) -> Json:
    """GET /v1/accounts/{id}/balance."""
    r = await http.get(f"/v1/accounts/{account_id}/balance", headers=api.read)
    assert r.status_code == 200, r.text
    b: Json = r.json()
    return b


async def bal(http: httpx.AsyncClient, api: Api, account_id: int) -> tuple[int, int]:
    """(balance, available) of an account."""
    b = await balance(http, api, account_id)
    return b["balance"], b["available"]


async def transfer_state(http: httpx.AsyncClient, api: Api, transfer_id: str) -> str | None:
    """The state of a transfer, or None when it is unknown (404)."""
    r = await http.get(f"/v1/transfers/{transfer_id}", headers=api.read)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    state: str = r.json()["state"]
    return state


async def zero_sum(engine: Engine, ledger: int) -> None:
    """Contract §1 invariants for one ledger, straight from SQL."""
    async with engine.store.pool.acquire() as conn:
        r = await conn.fetchrow(
            "SELECT sum(debits_posted) AS dp, sum(credits_posted) AS cp, "
            "sum(debits_pending) AS dq, sum(credits_pending) AS cq FROM accounts WHERE ledger = $1",
            ledger,
        )
    assert r is not None
    assert r["dp"] == r["cp"] and r["dq"] == r["cq"], dict(r)


SQL_SET_FLAGS: Final = """
UPDATE accounts SET flags = (flags | $3::int) & ~$4::int WHERE ledger = $1 AND id = $2
RETURNING flags
"""


async def set_flags(engine: Engine, ledger: int, account_id: int, *, add: int, remove: int) -> int:
    """Set and clear account flag bits straight in SQL (what an operator's tool would do)."""
    async with engine.store.pool.acquire() as conn:
        flags: int = await conn.fetchval(SQL_SET_FLAGS, ledger, account_id, add, remove)
    return flags


class World(msgspec.Struct, frozen=True):
    """A ledger with a bank (clearing), a funded no-overdraft purse, a merchant, a water
    utility, a second purse (empty) and a suspense account."""

    ledger: int
    bank: int
    purse: int
    canteen: int
    water: int
    other: int
    suspense: int


@pytest.fixture
async def world(http: httpx.AsyncClient, api: Api, ids: Ids) -> World:
    """A fresh ledger whose purse holds ``FUNDED`` fen."""
    ledger = ids.ledger()
    bank, purse, canteen, water, other, suspense = ids.accounts(6)
    assert await accounts(http, api, [
        {"id": bank, "ledger": ledger, "kind": "clearing", "code": 1},
        {"id": purse, "ledger": ledger, "kind": "purse", "code": 1, "flags": [DMNEC]},
        {"id": canteen, "ledger": ledger, "kind": "merchant", "code": 1},
        {"id": water, "ledger": ledger, "kind": "utility", "code": 2},
        {"id": other, "ledger": ledger, "kind": "purse", "code": 1, "flags": [DMNEC]},
        {"id": suspense, "ledger": ledger, "kind": "suspense", "code": 1},
    ]) == ["created"] * 6
    assert await statuses(http, api, [tr(ledger, bank, purse, FUNDED, TOP_UP)]) == ["created"]
    return World(ledger, bank, purse, canteen, water, other, suspense)


async def snapshot(http: httpx.AsyncClient, api: Api, w: World) -> dict[int, tuple[int, int]]:
    """(balance, available) of every account of the world."""
    ids_ = (w.bank, w.purse, w.canteen, w.water, w.other, w.suspense)
    return dict(zip(ids_, await asyncio.gather(*(bal(http, api, a) for a in ids_)), strict=True))


async def hold(
    http: httpx.AsyncClient, api: Api, w: World, amount: int, **kw: Any
) -> str:
    """Place a hold of ``amount`` on the purse for the water utility; returns its id."""
    t = tr(w.ledger, w.purse, w.water, amount, HOT_WATER, flags=["pending"], **kw)
    assert await statuses(http, api, [t]) == ["created"]
    return str(t["id"])


def resolve(w: World, pending_id: str, flag: str, amount: int | None = None, **kw: Any) -> Json:
    """A post_pending / void_pending body (accounts and code left to the hold)."""
    body: Json = {"id": new_id(), "ledger": w.ledger, "pending_id": pending_id, "flags": [flag]}
    if amount is not None:
        body["amount"] = amount
    return {**body, **kw}


# -- account statuses ----------------------------------------------------------------------------


async def test_account_created_and_exists(
    http: httpx.AsyncClient, api: Api, ids: Ids, engine: Engine
) -> None:
    ledger, a = ids.ledger(), ids.account()
    body = {"id": a, "ledger": ledger, "kind": "purse", "code": 7, "flags": [DMNEC],
            "holder_id": "S1", "name": "Li Lei"}
    assert await accounts(http, api, [body]) == ["created"]
    # holder_id and name are metadata: a different one still answers exists
    assert await accounts(http, api, [{**body, "holder_id": "S2", "name": "x"}]) == ["exists"]
    # a duplicate inside one request answers exists too
    b = ids.account()
    assert await accounts(http, api, [{**body, "id": b}, {**body, "id": b}]) == [
        "created", "exists"]
    got = await balance(http, api, a)
    assert (got["ledger"], got["balance"], got["available"]) == (ledger, 0, 0)
    rec = await engine.store.get_account(a)
    assert rec is not None and rec.holder_id == "S1" and rec.name == "Li Lei"


@pytest.mark.parametrize(
    ("field", "change", "status"),
    [
        ("kind", "merchant", AccountStatus.EXISTS_WITH_DIFFERENT_KIND),
        ("ledger", None, AccountStatus.EXISTS_WITH_DIFFERENT_LEDGER),
        ("code", 8, AccountStatus.EXISTS_WITH_DIFFERENT_CODE),
        ("flags", [DMNEC, "frozen"], AccountStatus.EXISTS_WITH_DIFFERENT_FLAGS),
        ("flags", [], AccountStatus.EXISTS_WITH_DIFFERENT_FLAGS),
    ],
)
async def test_account_exists_with_different(
    http: httpx.AsyncClient,
    api: Api,
    ids: Ids,
    engine: Engine,
    field: str,
    change: Any,
    status: AccountStatus,
) -> None:
    ledger, a = ids.ledger(), ids.account()
    body = {"id": a, "ledger": ledger, "kind": "purse", "code": 7, "flags": [DMNEC]}
    assert await accounts(http, api, [body]) == ["created"]
    if field == "ledger":
        change = ids.ledger()
    assert await accounts(http, api, [{**body, field: change}]) == [status.value]
    rec = await engine.store.get_account(a)  # the stored account is untouched
    assert rec is not None
    s = rec.state
    assert (s.ledger, s.kind, s.code, s.flags) == (
        ledger, "purse", 7, AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
    got = await balance(http, api, a)
    assert (got["ledger"], got["balance"]) == (ledger, 0)


@pytest.mark.parametrize(
    ("patch", "status"),
    [
        ({"id": 0}, AccountStatus.ID_MUST_NOT_BE_ZERO),
        ({"ledger": 0}, AccountStatus.LEDGER_MUST_NOT_BE_ZERO),
        ({"flags": [DMNEC, CMNED]}, AccountStatus.FLAGS_ARE_MUTUALLY_EXCLUSIVE),
    ],
)
async def test_account_refused(
    http: httpx.AsyncClient, api: Api, ids: Ids, patch: Json, status: AccountStatus
) -> None:
    ledger, a, ok = ids.ledger(), ids.account(), ids.account()
    body = {"id": a, "ledger": ledger, "kind": "purse", "code": 1, **patch}
    # a refused account does not spoil the rest of its request
    assert await accounts(http, api, [
        body, {"id": ok, "ledger": ledger, "kind": "purse", "code": 1}
    ]) == [status.value, "created"]
    if patch.get("id") != 0:
        r = await http.get(f"/v1/accounts/{a}/balance", headers=api.read)
        assert r.status_code == 404
    assert await bal(http, api, ok) == (0, 0)


# -- transfers: plain ----------------------------------------------------------------------------


async def test_created(http: httpx.AsyncClient, api: Api, world: World, engine: Engine) -> None:
    w = world
    t = tr(w.ledger, w.purse, w.canteen, 1_250)
    [x] = await post(http, api, [t])
    assert x["status"] == "created"
    assert await bal(http, api, w.purse) == (FUNDED - 1_250, FUNDED - 1_250)
    assert await bal(http, api, w.canteen) == (1_250, 1_250)
    assert await bal(http, api, w.bank) == (FUNDED, FUNDED)  # debit-normal: the reverse sign
    assert await transfer_state(http, api, t["id"]) == "posted"
    await zero_sum(engine, w.ledger)


async def test_exists(http: httpx.AsyncClient, api: Api, world: World) -> None:
    w = world
    t = tr(w.ledger, w.purse, w.canteen, 300, user_data="pos-1")
    [first] = await post(http, api, [t])
    [again] = await post(http, api, [dict(t)])
    assert (first["status"], again["status"]) == ("created", "exists")
    assert again["timestamp"] == first["timestamp"]
    # a duplicate inside the same request is charged once too
    u = tr(w.ledger, w.purse, w.canteen, 200)
    assert await statuses(http, api, [u, dict(u)]) == ["created", "exists"]
    # ... and a changed copy later in the same request is compared with the first
    v = tr(w.ledger, w.purse, w.canteen, 50)
    assert await statuses(http, api, [v, {**v, "amount": 51}, {**v, "code": REFUND}]) == [
        "created", "exists_with_different_amount", "exists_with_different_code"]
    assert await bal(http, api, w.purse) == (FUNDED - 550, FUNDED - 550)
    assert await bal(http, api, w.canteen) == (550, 550)


def _mutations(w: World, other_ledger: int) -> dict[str, Callable[[Json], Json]]:
    return {
        "amount": lambda t: {**t, "amount": t["amount"] + 1},
        "debit_account_id": lambda t: {**t, "debit_account_id": w.other},
        "credit_account_id": lambda t: {**t, "credit_account_id": w.suspense},
        "flags": lambda t: {**t, "flags": [*t.get("flags", []), "force"]},
        "pending_id": lambda t: {**t, "pending_id": new_id()},
        "code": lambda t: {**t, "code": REFUND},
        "ledger": lambda t: {**t, "ledger": other_ledger},
        "user_data": lambda t: {**t, "user_data": "pos-2"},
        "timeout": lambda t: {**t, "timeout_s": t["timeout_s"] + 1},
    }


DIFFERENT_FIELDS: Final = ["amount", "debit_account_id", "credit_account_id", "flags",
                            "pending_id", "code", "ledger", "user_data", "timeout"]


@pytest.mark.parametrize("field", DIFFERENT_FIELDS)
async def test_exists_with_different(
    http: httpx.AsyncClient, api: Api, world: World, ids: Ids, field: str
) -> None:
    w = world
    # timeout_s only belongs on a hold, so the base transfer is a hold for every field
    base = tr(w.ledger, w.purse, w.canteen, 700, flags=["pending"], timeout_s=600,
              user_data="pos-1")
    assert await statuses(http, api, [base]) == ["created"]
    before = await snapshot(http, api, w)
    changed = _mutations(w, ids.ledger())[field](base)
    assert await statuses(http, api, [changed]) == [f"exists_with_different_{field}"]
    assert await snapshot(http, api, w) == before
    assert before[w.purse] == (FUNDED, FUNDED - 700)
    # a plain transfer as the original: absent optional fields compare as absent
    plain = tr(w.ledger, w.purse, w.canteen, 100)
    assert await statuses(http, api, [plain]) == ["created"]
    if field == "timeout":
        changed = {**plain, "timeout_s": 5}
    elif field == "user_data":
        changed = {**plain, "user_data": "x"}
    else:
        changed = _mutations(w, ids.ledger())[field](plain)
    assert await statuses(http, api, [changed]) == [f"exists_with_different_{field}"]
    assert await bal(http, api, w.purse) == (FUNDED - 100, FUNDED - 800)


async def test_id_must_not_be_zero(http: httpx.AsyncClient, api: Api, world: World) -> None:
    w = world
    t = {**tr(w.ledger, w.purse, w.canteen, 100), "id": NIL}
    assert await statuses(http, api, [t]) == ["id_must_not_be_zero"]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)


@pytest.mark.parametrize("amount", [0, -1, -INT64_MAX])
async def test_amount_must_be_positive(
    http: httpx.AsyncClient, api: Api, world: World, amount: int
) -> None:
    w = world
    assert await statuses(http, api, [tr(w.ledger, w.purse, w.canteen, amount)]) == [
        "amount_must_be_positive"
    ]
    h = await hold(http, api, w, 300)
    assert await statuses(http, api, [resolve(w, h, "post_pending", amount=-5)]) == [
        "amount_must_be_positive"
    ]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED - 300)
    assert await bal(http, api, w.canteen) == (0, 0)


async def test_accounts_must_be_different(
    http: httpx.AsyncClient, api: Api, world: World
) -> None:
    w = world
    assert await statuses(http, api, [tr(w.ledger, w.purse, w.purse, 100)]) == [
        "accounts_must_be_different"
    ]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)


SIDES: Final = ["debit", "credit"]


@pytest.mark.parametrize("side", SIDES)
async def test_account_not_found(
    http: httpx.AsyncClient, api: Api, world: World, ids: Ids, side: str
) -> None:
    w = world
    ghost = ids.account()
    t = (tr(w.ledger, ghost, w.canteen, 100) if side == "debit"
         else tr(w.ledger, w.purse, ghost, 100))
    assert await statuses(http, api, [t]) == [f"{side}_account_not_found"]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)
    assert await bal(http, api, w.canteen) == (0, 0)
    r = await http.get(f"/v1/accounts/{ghost}/balance", headers=api.read)
    assert r.status_code == 404


@pytest.mark.parametrize("case", ["credit_elsewhere", "debit_elsewhere", "transfer_elsewhere"])
async def test_accounts_must_have_the_same_ledger(
    http: httpx.AsyncClient, api: Api, world: World, ids: Ids, case: str
) -> None:
    w = world
    ledger2 = ids.ledger()
    far = ids.account()
    assert await accounts(http, api, [
        {"id": far, "ledger": ledger2, "kind": "merchant", "code": 1}]) == ["created"]
    t = {
        "credit_elsewhere": tr(w.ledger, w.purse, far, 100),
        "debit_elsewhere": tr(w.ledger, far, w.canteen, 100, flags=["force"]),
        # both accounts in the world's ledger, the transfer names another one
        "transfer_elsewhere": tr(ledger2, w.purse, w.canteen, 100),
    }[case]
    assert await statuses(http, api, [t]) == ["accounts_must_have_the_same_ledger"]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)
    assert await bal(http, api, w.canteen) == (0, 0)
    assert await bal(http, api, far) == (0, 0)


async def test_exceeds_credits_and_force(
    http: httpx.AsyncClient, api: Api, world: World, engine: Engine
) -> None:
    w = world
    over = tr(w.ledger, w.purse, w.canteen, FUNDED + 1)
    assert await statuses(http, api, [over]) == ["exceeds_credits"]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)
    # holds count against the limit too
    await hold(http, api, w, 4_000)
    assert await statuses(http, api, [tr(w.ledger, w.purse, w.canteen, 6_001)]) == [
        "exceeds_credits"
    ]
    assert await statuses(http, api, [tr(w.ledger, w.purse, w.canteen, 6_000)]) == ["created"]
    assert await bal(http, api, w.purse) == (4_000, 0)
    # force: offline advice posts past the limit, the money was already spent
    forced = tr(w.ledger, w.purse, w.canteen, 1_500, flags=["force"])
    assert await statuses(http, api, [forced]) == ["created"]
    assert await bal(http, api, w.purse) == (2_500, -1_500)
    assert await bal(http, api, w.canteen) == (7_500, 7_500)
    await zero_sum(engine, w.ledger)


async def test_exceeds_debits(
    http: httpx.AsyncClient, api: Api, world: World, ids: Ids
) -> None:
    w = world
    capped = ids.account()  # a clearing account that may only be credited back what it paid
    assert await accounts(http, api, [
        {"id": capped, "ledger": w.ledger, "kind": "clearing", "code": 1, "flags": [CMNED]}
    ]) == ["created"]
    assert await statuses(http, api, [tr(w.ledger, w.purse, capped, 1)]) == ["exceeds_debits"]
    assert await statuses(http, api, [tr(w.ledger, capped, w.other, 300, TOP_UP)]) == ["created"]
    assert await statuses(http, api, [tr(w.ledger, w.purse, capped, 301, REFUND)]) == [
        "exceeds_debits"
    ]
    assert await statuses(http, api, [tr(w.ledger, w.purse, capped, 300, REFUND)]) == ["created"]
    assert await bal(http, api, capped) == (0, 0)
    assert await bal(http, api, w.purse) == (FUNDED - 300, FUNDED - 300)
    # force overrides the credit-side limit as well
    assert await statuses(http, api, [
        tr(w.ledger, w.purse, capped, 50, REFUND, flags=["force"])]) == ["created"]
    assert await bal(http, api, capped) == (-50, -50)


async def test_debit_account_frozen(
    http: httpx.AsyncClient, api: Api, world: World, engine: Engine
) -> None:
    w = world
    h = await hold(http, api, w, 1_000)
    h2 = await hold(http, api, w, 500)
    flags = await set_flags(engine, w.ledger, w.purse, add=AccountFlags.FROZEN, remove=0)
    assert flags == AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags.FROZEN
    assert await statuses(http, api, [tr(w.ledger, w.purse, w.canteen, 100)]) == [
        "debit_account_frozen"
    ]
    assert await statuses(http, api, [
        tr(w.ledger, w.purse, w.canteen, 100, flags=["force"])]) == ["debit_account_frozen"]
    assert await statuses(http, api, [
        tr(w.ledger, w.purse, w.water, 100, HOT_WATER, flags=["pending"])
    ]) == ["debit_account_frozen"]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED - 1_500)
    # frozen refuses debits only: money can still come in
    assert await statuses(http, api, [tr(w.ledger, w.bank, w.purse, 200, TOP_UP)]) == ["created"]
    # a hold taken before the freeze may still be settled or released
    assert await statuses(http, api, [resolve(w, h, "post_pending", amount=600)]) == ["created"]
    assert await statuses(http, api, [resolve(w, h2, "void_pending")]) == ["created"]
    assert await bal(http, api, w.purse) == (FUNDED + 200 - 600, FUNDED + 200 - 600)
    await set_flags(engine, w.ledger, w.purse, add=0, remove=AccountFlags.FROZEN)
    assert await statuses(http, api, [tr(w.ledger, w.purse, w.canteen, 100)]) == ["created"]


async def test_store_set_account_flags(http: httpx.AsyncClient, api: Api, world: World,
                                       engine: Engine, ids: Ids) -> None:
    w = world
    frozen = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags.FROZEN
    assert await engine.store.set_account_flags(
        w.ledger, w.purse, add=AccountFlags.FROZEN, remove=0) == frozen
    assert await statuses(http, api, [tr(w.ledger, w.purse, w.canteen, 100)]) == [
        "debit_account_frozen"]
    assert await engine.store.set_account_flags(
        w.ledger, w.purse, add=0, remove=AccountFlags.FROZEN
    ) == AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
    assert await statuses(http, api, [tr(w.ledger, w.purse, w.canteen, 100)]) == ["created"]
    assert await engine.store.set_account_flags(w.ledger, ids.account(), add=1, remove=0) is None


@pytest.mark.parametrize("side", SIDES)
async def test_account_closed(
    http: httpx.AsyncClient, api: Api, world: World, engine: Engine, side: str
) -> None:
    w = world
    h = await hold(http, api, w, 1_000)
    h2 = await hold(http, api, w, 500)
    closed = w.purse if side == "debit" else w.water
    await set_flags(engine, w.ledger, closed, add=AccountFlags.CLOSED, remove=0)
    t = (tr(w.ledger, w.purse, w.canteen, 100) if side == "debit"
         else tr(w.ledger, w.other, w.water, 100, HOT_WATER, flags=["force"]))
    assert await statuses(http, api, [t]) == ["account_closed"]
    assert await statuses(http, api, [resolve(w, h, "post_pending")]) == ["account_closed"]
    # releasing a hold can only make the holder better off: allowed on a closed account
    assert await statuses(http, api, [resolve(w, h2, "void_pending")]) == ["created"]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED - 1_000)
    assert await bal(http, api, w.water) == (0, 0)
    assert await transfer_state(http, api, h) == "pending"


async def test_account_created_closed(
    http: httpx.AsyncClient, api: Api, world: World, ids: Ids
) -> None:
    w = world
    gone = ids.account()
    assert await accounts(http, api, [
        {"id": gone, "ledger": w.ledger, "kind": "merchant", "code": 1, "flags": ["closed"]}
    ]) == ["created"]
    assert await statuses(http, api, [tr(w.ledger, w.purse, gone, 100)]) == ["account_closed"]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)


@pytest.mark.parametrize(
    "flags",
    [["pending", "post_pending"], ["pending", "void_pending"], ["post_pending", "void_pending"],
     ["pending", "post_pending", "void_pending", "linked"]],
)
async def test_flags_are_mutually_exclusive(
    http: httpx.AsyncClient, api: Api, world: World, flags: list[str]
) -> None:
    w = world
    h = await hold(http, api, w, 300)
    t = {**resolve(w, h, "post_pending"), "flags": flags}
    if "linked" in flags:  # the chain's failure: the follower answers linked_event_failed
        follow = tr(w.ledger, w.purse, w.canteen, 100)
        assert await statuses(http, api, [t, follow]) == [
            "flags_are_mutually_exclusive", "linked_event_failed"]
    else:
        assert await statuses(http, api, [t]) == ["flags_are_mutually_exclusive"]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED - 300)
    assert await transfer_state(http, api, h) == "pending"


# -- extension statuses --------------------------------------------------------------------------


async def test_code_must_not_be_zero(http: httpx.AsyncClient, api: Api, world: World) -> None:
    w = world
    assert await statuses(http, api, [tr(w.ledger, w.purse, w.canteen, 100, code=0)]) == [
        "code_must_not_be_zero"
    ]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)


async def test_pending_id_must_be_zero(http: httpx.AsyncClient, api: Api, world: World) -> None:
    w = world
    h = await hold(http, api, w, 300)
    assert await statuses(http, api, [tr(w.ledger, w.purse, w.canteen, 100, pending_id=h)]) == [
        "pending_id_must_be_zero"
    ]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED - 300)


async def test_timeout_reserved_for_pending_transfer(
    http: httpx.AsyncClient, api: Api, world: World
) -> None:
    w = world
    assert await statuses(http, api, [tr(w.ledger, w.purse, w.canteen, 100, timeout_s=30)]) == [
        "timeout_reserved_for_pending_transfer"
    ]
    h = await hold(http, api, w, 300)
    assert await statuses(http, api, [resolve(w, h, "post_pending", timeout_s=30)]) == [
        "timeout_reserved_for_pending_transfer"
    ]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED - 300)


HOLD_FIELDS: Final = ["debit_account_id", "credit_account_id", "code", "ledger"]


@pytest.mark.parametrize("field", HOLD_FIELDS)
async def test_pending_transfer_has_different(
    http: httpx.AsyncClient, api: Api, world: World, ids: Ids, field: str
) -> None:
    w = world
    h = await hold(http, api, w, 300)
    patch: Json = {
        "debit_account_id": {"debit_account_id": w.other},
        "credit_account_id": {"credit_account_id": w.canteen},
        "code": {"code": MEAL},
        "ledger": {"ledger": ids.ledger()},
    }[field]
    for flag in ("post_pending", "void_pending"):
        assert await statuses(http, api, [resolve(w, h, flag, **patch)]) == [
            f"pending_transfer_has_different_{field}"
        ]
    # the same fields, stated explicitly and equal to the hold's, are fine
    same = resolve(w, h, "post_pending", debit_account_id=w.purse, credit_account_id=w.water,
                   code=HOT_WATER, amount=300)
    assert await statuses(http, api, [same]) == ["created"]
    assert await bal(http, api, w.purse) == (FUNDED - 300, FUNDED - 300)


async def test_pending_transfer_has_different_amount(
    http: httpx.AsyncClient, api: Api, world: World
) -> None:
    w = world
    h = await hold(http, api, w, 300)
    # a void releases the whole hold: a partial amount is refused
    assert await statuses(http, api, [resolve(w, h, "void_pending", amount=100)]) == [
        "pending_transfer_has_different_amount"
    ]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED - 300)
    assert await statuses(http, api, [resolve(w, h, "void_pending", amount=300)]) == ["created"]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)


async def test_overflows(http: httpx.AsyncClient, api: Api, ids: Ids, engine: Engine) -> None:
    ledger = ids.ledger()
    src, big, dst, src2 = ids.accounts(4)
    assert await accounts(http, api, [
        {"id": a, "ledger": ledger, "kind": "suspense", "code": 1} for a in (src, big, dst, src2)
    ]) == ["created"] * 4
    assert await statuses(http, api, [tr(ledger, src, big, INT64_MAX, 8)]) == ["created"]
    # src has debited INT64_MAX: one more fen on either field would not fit a BIGINT
    assert await statuses(http, api, [tr(ledger, src, dst, 1, 8)]) == ["overflows_debits"]
    assert await statuses(http, api, [tr(ledger, src2, big, 1, 8)]) == ["overflows_credits"]
    assert await statuses(http, api, [
        tr(ledger, src, dst, 1, 8, flags=["pending"])]) == ["overflows_debits"]
    assert await bal(http, api, big) == (INT64_MAX, INT64_MAX)
    assert await bal(http, api, src) == (-INT64_MAX, -INT64_MAX)
    assert await bal(http, api, dst) == (0, 0)
    await zero_sum(engine, ledger)


# -- linked chains -------------------------------------------------------------------------------


async def test_linked_chain_commits_together(
    http: httpx.AsyncClient, api: Api, world: World
) -> None:
    w = world
    subsidy_part = tr(w.ledger, w.other, w.canteen, 1, flags=["linked"])
    # the `other` purse is empty: the first leg fails, so the cash leg must not post either
    cash_part = tr(w.ledger, w.purse, w.canteen, 800)
    assert await statuses(http, api, [subsidy_part, cash_part]) == [
        "exceeds_credits", "linked_event_failed"]
    assert await transfer_state(http, api, cash_part["id"]) is None
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)
    assert await bal(http, api, w.canteen) == (0, 0)

    # the failure in the middle: the first leg is rolled back, the last never evaluated
    a = tr(w.ledger, w.purse, w.canteen, 100, flags=["linked"])
    b = tr(w.ledger, w.other, w.canteen, 100, flags=["linked"])
    c = tr(w.ledger, w.purse, w.water, 100, HOT_WATER)
    assert await statuses(http, api, [a, b, c]) == [
        "linked_event_failed", "exceeds_credits", "linked_event_failed"]
    assert await transfer_state(http, api, a["id"]) is None
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)

    # a chain then an unlinked transfer in the same request: independent
    d = tr(w.ledger, w.purse, w.other, 400, flags=["linked"])
    e = tr(w.ledger, w.other, w.canteen, 400)
    f = tr(w.ledger, w.purse, w.canteen, FUNDED)  # fails alone: 600 left after the chain
    assert await statuses(http, api, [d, e, f]) == ["created", "created", "exceeds_credits"]
    assert await bal(http, api, w.purse) == (FUNDED - 400, FUNDED - 400)
    assert await bal(http, api, w.other) == (0, 0)
    assert await bal(http, api, w.canteen) == (400, 400)
    # the rolled-back transfer was never recorded: its id is still free
    assert await statuses(http, api, [{**a, "flags": []}]) == ["created"]
    # a retried chain answers exists for every event
    assert await statuses(http, api, [d, e]) == ["exists", "exists"]
    assert await bal(http, api, w.purse) == (FUNDED - 500, FUNDED - 500)


async def test_linked_chain_rolls_back_a_hold_and_its_post(
    http: httpx.AsyncClient, api: Api, world: World
) -> None:
    w = world
    h = await hold(http, api, w, 2_000)
    post_ = resolve(w, h, "post_pending", amount=1_500, flags=["post_pending", "linked"])
    bad = tr(w.ledger, w.other, w.canteen, 1)
    assert await statuses(http, api, [post_, bad]) == ["linked_event_failed", "exceeds_credits"]
    assert await transfer_state(http, api, h) == "pending"
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED - 2_000)
    assert await bal(http, api, w.water) == (0, 0)


async def test_linked_event_chain_open(http: httpx.AsyncClient, api: Api, world: World) -> None:
    w = world
    a = tr(w.ledger, w.purse, w.canteen, 100, flags=["linked"])
    b = tr(w.ledger, w.purse, w.canteen, 200, flags=["linked"])
    assert await statuses(http, api, [a, b]) == ["linked_event_failed", "linked_event_chain_open"]
    lone = tr(w.ledger, w.purse, w.canteen, 300, flags=["linked"])
    assert await statuses(http, api, [lone]) == ["linked_event_chain_open"]
    # a chain never spans requests: the next request does not close it
    c = tr(w.ledger, w.purse, w.canteen, 400)
    assert await statuses(http, api, [c]) == ["created"]
    for t in (a, b, lone):
        assert await transfer_state(http, api, t["id"]) is None
    assert await bal(http, api, w.purse) == (FUNDED - 400, FUNDED - 400)


async def test_linked_chain_mixing_ledgers(
    http: httpx.AsyncClient, api: Api, world: World, ids: Ids
) -> None:
    w = world
    ledger2 = ids.ledger()
    bank2, purse2 = ids.accounts(2)
    assert await accounts(http, api, [
        {"id": bank2, "ledger": ledger2, "kind": "clearing", "code": 1},
        {"id": purse2, "ledger": ledger2, "kind": "purse", "code": 1},
    ]) == ["created", "created"]
    a = tr(w.ledger, w.purse, w.canteen, 100, flags=["linked"])
    b = tr(ledger2, bank2, purse2, 100, TOP_UP, flags=["linked"])
    c = tr(w.ledger, w.purse, w.water, 100, HOT_WATER)
    alone = tr(ledger2, bank2, purse2, 50, TOP_UP)
    assert await statuses(http, api, [a, b, c, alone]) == [
        "linked_event_failed", "accounts_must_have_the_same_ledger", "linked_event_failed",
        "created"]
    for t in (a, b, c):
        assert await transfer_state(http, api, t["id"]) is None
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)
    assert await bal(http, api, purse2) == (50, 50)
    assert await bal(http, api, bank2) == (50, 50)


# -- holds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [None, 0, 2_000])
async def test_post_pending_full(
    http: httpx.AsyncClient, api: Api, world: World, amount: int | None
) -> None:
    w = world
    h = await hold(http, api, w, 2_000, timeout_s=600)
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED - 2_000)
    b = await balance(http, api, w.water)
    assert (b["balance"], b["credits_pending"]) == (0, 2_000)
    p = resolve(w, h, "post_pending", amount=amount)
    [x] = await post(http, api, [p])
    assert x["status"] == "created"
    assert await bal(http, api, w.purse) == (FUNDED - 2_000, FUNDED - 2_000)
    b = await balance(http, api, w.water)
    assert (b["balance"], b["credits_pending"]) == (2_000, 0)
    assert await transfer_state(http, api, h) == "settled"
    r = (await http.get(f"/v1/transfers/{p['id']}", headers=api.read)).json()
    assert (r["amount"], r["state"], r["pending_id"]) == (2_000, "posted", h)
    assert (r["debit_account_id"], r["credit_account_id"], r["code"]) == (
        w.purse, w.water, HOT_WATER)
    # idempotent with the same body (amount 0 or absent still means "the full hold")
    assert await statuses(http, api, [p]) == ["exists"]
    assert await statuses(http, api, [resolve(w, h, "post_pending", amount=2_000)]) == [
        "pending_transfer_already_posted"]
    assert await statuses(http, api, [resolve(w, h, "void_pending")]) == [
        "pending_transfer_already_posted"]
    assert await bal(http, api, w.purse) == (FUNDED - 2_000, FUNDED - 2_000)


async def test_post_pending_partial_releases_the_rest(
    http: httpx.AsyncClient, api: Api, world: World, engine: Engine
) -> None:
    w = world
    h = await hold(http, api, w, 2_000)
    assert await statuses(http, api, [resolve(w, h, "post_pending", amount=2_001)]) == [
        "exceeds_pending_transfer_amount"]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED - 2_000)
    p = resolve(w, h, "post_pending", amount=730)
    assert await statuses(http, api, [p]) == ["created"]
    assert await bal(http, api, w.purse) == (FUNDED - 730, FUNDED - 730)
    b = await balance(http, api, w.water)
    assert (b["balance"], b["available"], b["credits_pending"]) == (730, 730, 0)
    assert await transfer_state(http, api, h) == "settled"
    assert await statuses(http, api, [p]) == ["exists"]
    # the same id with amount 0 ("the full hold") is a different transfer than the 730 post
    assert await statuses(http, api, [{**p, "amount": 0}]) == ["exists_with_different_amount"]
    assert await statuses(http, api, [resolve(w, h, "post_pending", amount=100)]) == [
        "pending_transfer_already_posted"]
    await zero_sum(engine, w.ledger)


async def test_void_pending(http: httpx.AsyncClient, api: Api, world: World) -> None:
    w = world
    h = await hold(http, api, w, 2_000)
    v = resolve(w, h, "void_pending")
    assert await statuses(http, api, [v]) == ["created"]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)
    b = await balance(http, api, w.water)
    assert (b["balance"], b["credits_pending"]) == (0, 0)
    assert await transfer_state(http, api, h) == "voided"
    assert await statuses(http, api, [v]) == ["exists"]
    assert await statuses(http, api, [resolve(w, h, "void_pending")]) == [
        "pending_transfer_already_voided"]
    assert await statuses(http, api, [resolve(w, h, "post_pending")]) == [
        "pending_transfer_already_voided"]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)


async def test_pending_transfer_not_found_and_not_pending(
    http: httpx.AsyncClient, api: Api, world: World
) -> None:
    w = world
    for flag in ("post_pending", "void_pending"):
        assert await statuses(http, api, [resolve(w, new_id(), flag)]) == [
            "pending_transfer_not_found"]
    plain = tr(w.ledger, w.purse, w.canteen, 100)
    assert await statuses(http, api, [plain]) == ["created"]
    for flag in ("post_pending", "void_pending"):
        assert await statuses(http, api, [resolve(w, plain["id"], flag)]) == [
            "pending_transfer_not_pending"]
    # a post of a post is not a hold either
    h = await hold(http, api, w, 300)
    p = resolve(w, h, "post_pending")
    assert await statuses(http, api, [p]) == ["created"]
    assert await statuses(http, api, [resolve(w, p["id"], "void_pending")]) == [
        "pending_transfer_not_pending"]
    assert await bal(http, api, w.purse) == (FUNDED - 400, FUNDED - 400)


async def test_hold_and_post_in_one_request(
    http: httpx.AsyncClient, api: Api, world: World
) -> None:
    w = world
    h = tr(w.ledger, w.purse, w.water, 900, HOT_WATER, flags=["pending"])
    p = resolve(w, h["id"], "post_pending", amount=250)
    assert await statuses(http, api, [h, p]) == ["created", "created"]
    assert await bal(http, api, w.purse) == (FUNDED - 250, FUNDED - 250)
    assert await transfer_state(http, api, h["id"]) == "settled"


async def test_pending_transfer_expired(
    http: httpx.AsyncClient, api: Api, world: World
) -> None:
    w = world
    h = await hold(http, api, w, 2_000, timeout_s=1)
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED - 2_000)
    await asyncio.sleep(1.1)
    # whether the expirer or this batch releases it, the hold is past its timeout
    assert await statuses(http, api, [resolve(w, h, "post_pending")]) == [
        "pending_transfer_expired"]
    assert await statuses(http, api, [resolve(w, h, "void_pending")]) == [
        "pending_transfer_expired"]
    assert await transfer_state(http, api, h) == "expired"
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)
    b = await balance(http, api, w.water)
    assert (b["balance"], b["credits_pending"]) == (0, 0)


async def test_exists_after_hold_resolved(
    http: httpx.AsyncClient, api: Api, world: World
) -> None:
    w = world
    h = tr(w.ledger, w.purse, w.water, 900, HOT_WATER, flags=["pending"], timeout_s=60)
    assert await statuses(http, api, [h]) == ["created"]
    assert await statuses(http, api, [resolve(w, h["id"], "void_pending")]) == ["created"]
    # the hold itself stays a fact: resubmitting it answers exists, not a new hold
    assert await statuses(http, api, [h]) == ["exists"]
    assert await bal(http, api, w.purse) == (FUNDED, FUNDED)


# -- coverage of the status list -----------------------------------------------------------------

CAMPUS_ONLY: Final = {TransferStatus.DAILY_LIMIT_EXCEEDED, TransferStatus.CARD_NOT_ACTIVE}


def test_every_status_is_exercised() -> None:
    """Each transfer and account status (campus ones aside) is asserted by a test above."""
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    body = source[: source.index("# -- coverage of the status list")]
    named = {f"exists_with_different_{f}" for f in DIFFERENT_FIELDS}
    named |= {f"pending_transfer_has_different_{f}" for f in HOLD_FIELDS}
    named |= {f"{side}_account_not_found" for side in SIDES}
    missing = [
        s.value
        for s in TransferStatus
        if s not in CAMPUS_ONLY and s.value not in named and f'"{s.value}"' not in body
    ]
    missing += [s.value for s in AccountStatus if f"AccountStatus.{s.name}" not in body
                and f'"{s.value}"' not in body]
    assert missing == []

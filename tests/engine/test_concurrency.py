"""Concurrency: many HTTP clients racing over the same accounts and the same transfer ids, and
two independent engines (two pools, two batchers: two "engine processes") on one database.

Whatever the interleaving, each distinct transfer id counts once, every duplicate answers
``exists``, the books balance, and the per-ledger clock and audit chain stay strictly ordered.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections import Counter, defaultdict
from typing import Any, Final

import asyncpg
import httpx
import pytest

from engine.service import Engine
from ledger import audit
from ledger.status import TransferStatus
from ledger.transfer import Transfer
from ledger.types import TransferFlag
from tests.conftest import Api, Ids

Json = dict[str, Any]
CLIENTS: Final = 32
DMNEC: Final = "debits_must_not_exceed_credits"

SQL_ACCOUNTS: Final = """
SELECT id, debits_posted, credits_posted, debits_pending, credits_pending
FROM accounts WHERE ledger = $1 ORDER BY id
"""
# Each account's live fields recomputed from its transfers and open holds.
SQL_RECOMPUTED: Final = """
SELECT a.id,
  coalesce((SELECT sum(amount) FROM transfers t WHERE t.ledger = a.ledger
            AND t.debit_account_id = a.id AND t.flags & 10 = 0), 0) AS debits_posted,
  coalesce((SELECT sum(amount) FROM transfers t WHERE t.ledger = a.ledger
            AND t.credit_account_id = a.id AND t.flags & 10 = 0), 0) AS credits_posted,
  coalesce((SELECT sum(amount) FROM holds h WHERE h.ledger = a.ledger
            AND h.debit_account_id = a.id AND h.state = 'pending'), 0) AS debits_pending,
  coalesce((SELECT sum(amount) FROM holds h WHERE h.ledger = a.ledger
            AND h.credit_account_id = a.id AND h.state = 'pending'), 0) AS credits_pending
FROM accounts a WHERE a.ledger = $1 ORDER BY a.id
"""
SQL_SUMS: Final = """
SELECT sum(debits_posted) AS dp, sum(credits_posted) AS cp,
       sum(debits_pending) AS dq, sum(credits_pending) AS cq
FROM accounts WHERE ledger = $1
"""
SQL_TRANSFERS: Final = """
SELECT id, ledger, debit_account_id, credit_account_id, amount, pending_id, code, flags,
       timeout_s, user_data, timestamp
FROM transfers WHERE ledger = $1 ORDER BY timestamp
"""
SQL_AUDIT: Final = """
SELECT first_timestamp, last_timestamp, transfer_count, prev_head, head
FROM audit_batches WHERE ledger = $1 ORDER BY last_timestamp
"""
SQL_CLOCK: Final = "SELECT last_timestamp, chain_head FROM ledgers WHERE ledger = $1"


# -- helpers -------------------------------------------------------------------------------------


def tr(ledger: int, debit: int, credit: int, amount: int, code: int = 1, **kw: Any) -> Json:
    """A transfer body with a fresh id."""
    return {"id": str(uuid.uuid4()), "ledger": ledger, "debit_account_id": debit,
            "credit_account_id": credit, "amount": amount, "code": code, **kw}


async def check_books(pool: asyncpg.Pool, ledger: int) -> dict[int, tuple[int, int, int, int]]:
    """Contract §1 invariants of a ledger from SQL; returns each account's live fields."""
    async with pool.acquire() as conn:
        live = {r["id"]: tuple(r.values())[1:] for r in await conn.fetch(SQL_ACCOUNTS, ledger)}
        recomputed = {r["id"]: tuple(int(x) for x in tuple(r.values())[1:])
                      for r in await conn.fetch(SQL_RECOMPUTED, ledger)}
        sums = await conn.fetchrow(SQL_SUMS, ledger)
    assert sums is not None
    assert sums["dp"] == sums["cp"], dict(sums)
    assert sums["dq"] == sums["cq"], dict(sums)
    assert live == recomputed
    return live


async def check_clock_and_chain(pool: asyncpg.Pool, ledger: int) -> list[int]:
    """Timestamps unique and strictly increasing, batches in disjoint ordered ranges, and the
    audit chain recomputed from the rows; returns the ledger's timestamps in order."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(SQL_TRANSFERS, ledger)
        batches = await conn.fetch(SQL_AUDIT, ledger)
        clock = await conn.fetchrow(SQL_CLOCK, ledger)
    assert clock is not None
    stamps = [r["timestamp"] for r in rows]
    assert all(a < b for a, b in itertools.pairwise(stamps))
    assert clock["last_timestamp"] >= stamps[-1]
    head = audit.GENESIS
    prev_last = 0
    i = 0
    for b in batches:
        assert b["first_timestamp"] > prev_last
        assert b["prev_head"] == head
        members = []
        while i < len(rows) and rows[i]["timestamp"] <= b["last_timestamp"]:
            members.append(rows[i])
            i += 1
        assert len(members) == b["transfer_count"]
        assert members[0]["timestamp"] == b["first_timestamp"]
        assert members[-1]["timestamp"] == b["last_timestamp"]
        head = audit.extend(head, (tuple(r.values()) for r in members))
        assert b["head"] == head
        prev_last = b["last_timestamp"]
    assert i == len(rows), "transfers outside every audited batch"
    assert clock["chain_head"] == head
    return stamps


# -- 32 HTTP clients -----------------------------------------------------------------------------


async def test_32_clients_overlapping_and_duplicated(
    api: Api, http: httpx.AsyncClient, ids: Ids, engine: Engine
) -> None:
    rng = random.Random(20240901)
    ledger = ids.ledger()
    hot = ids.accounts(5)  # every transfer touches two of these five
    bank = ids.account()
    r = await http.post("/v1/accounts", headers=api.admin, json=[
        {"id": bank, "ledger": ledger, "kind": "clearing", "code": 1},
        *({"id": a, "ledger": ledger, "kind": "suspense", "code": 1} for a in hot),
    ])
    assert [x["status"] for x in r.json()] == ["created"] * 6

    # Units: one transfer, a linked chain, or a hold settled (partly) in the same chain.
    units: list[list[Json]] = []
    for _ in range(500):
        kind = rng.random()
        d, c = rng.sample(hot, 2)
        if kind < 0.7:
            flags = ["force"] if rng.random() < 0.1 else []
            units.append([tr(ledger, d, c, rng.randint(1, 999), flags=flags)])
        elif kind < 0.85:
            e = rng.choice([a for a in hot if a != c])
            units.append([tr(ledger, d, c, rng.randint(1, 99), flags=["linked"]),
                          tr(ledger, c, e, rng.randint(1, 99))])
        else:
            h = tr(ledger, d, c, rng.randint(100, 999), 2, flags=["pending", "linked"])
            units.append([h, {"id": str(uuid.uuid4()), "ledger": ledger, "pending_id": h["id"],
                              "amount": rng.randint(1, 100), "flags": ["post_pending"]}])
    # a few top-ups from the bank into the hot accounts
    units += [[tr(ledger, bank, a, 10_000, 4)] for a in hot]

    # Every unit goes to 2..4 distinct clients; each client sends its units in random
    # requests of 1..8 units.
    per_client: list[list[list[Json]]] = [[] for _ in range(CLIENTS)]
    copies: Counter[str] = Counter()
    for u in units:
        for ci in rng.sample(range(CLIENTS), rng.randint(2, 4)):
            per_client[ci].append(u)
            for t in u:
                copies[t["id"]] += 1
    requests: list[list[list[Json]]] = []
    for mine in per_client:
        rng.shuffle(mine)
        reqs: list[list[Json]] = []
        while mine:
            n = rng.randint(1, 8)
            reqs.append([t for u in mine[:n] for t in u])
            mine = mine[n:]
        requests.append(reqs)

    go = asyncio.Event()
    answers: list[Json] = []

    async def client(reqs: list[list[Json]]) -> None:
        async with httpx.AsyncClient(base_url=api.base_url, headers=api.admin,
                                     timeout=60) as c:
            await go.wait()
            for body in reqs:
                resp = await c.post("/v1/transfers", json=body)
                assert resp.status_code == 200, resp.text
                out = resp.json()
                assert [x["id"] for x in out] == [t["id"] for t in body]
                answers.extend(out)

    tasks = [asyncio.create_task(client(reqs)) for reqs in requests]
    await asyncio.sleep(0.05)
    go.set()
    await asyncio.gather(*tasks)

    # each distinct id created exactly once, every other copy answered `exists`
    by_id: dict[str, Counter[str]] = defaultdict(Counter)
    created_ts: dict[str, int] = {}
    for ans in answers:
        by_id[ans["id"]][ans["status"]] += 1
        if ans["status"] == "created":
            created_ts[ans["id"]] = ans["timestamp"]
    assert set(by_id) == set(copies)
    bad = {i: dict(c) for i, c in by_id.items()
           if c != Counter({"created": 1, "exists": copies[i] - 1})}
    assert bad == {}
    assert len(set(created_ts.values())) == len(created_ts)

    # exact balances: every distinct transfer counted once
    want: dict[int, list[int]] = {a: [0, 0, 0, 0] for a in [bank, *hot]}
    for u in units:
        if len(u) == 2 and "pending_id" in u[1]:
            h, p = u
            want[h["debit_account_id"]][0] += p["amount"]
            want[h["credit_account_id"]][1] += p["amount"]
        else:
            for t in u:
                want[t["debit_account_id"]][0] += t["amount"]
                want[t["credit_account_id"]][1] += t["amount"]
    live = await check_books(engine.store.pool, ledger)
    assert live == {a: tuple(v) for a, v in want.items()}
    for a in hot:
        b = (await http.get(f"/v1/accounts/{a}/balance", headers=api.read)).json()
        assert b["balance"] == want[a][1] - want[a][0]
        assert b["debits_pending"] == b["credits_pending"] == 0
    stamps = await check_clock_and_chain(engine.store.pool, ledger)
    assert len(stamps) == len(copies)
    assert sorted(created_ts.values()) == stamps


# -- two engines on one database -----------------------------------------------------------------


def _transfer(body: Json) -> Transfer:
    return Transfer(
        id=uuid.UUID(body["id"]),
        ledger=body["ledger"],
        debit_account_id=body["debit_account_id"],
        credit_account_id=body["credit_account_id"],
        amount=body["amount"],
        code=body["code"],
        flags=tuple(TransferFlag(f) for f in body.get("flags", ())),
    )


@pytest.fixture
async def two_engines(dsn: str) -> Any:
    """Two independently started engines (own pool, store, batcher, expirer) on the session
    database: what two engine processes look like to PostgreSQL."""
    a, b = Engine(dsn, expirer_interval_s=0.1), Engine(dsn, expirer_interval_s=0.1)
    await a.start(run_migrations=False)
    await b.start(run_migrations=False)
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def test_two_engines_conflicting_work(
    two_engines: tuple[Engine, Engine], api: Api, http: httpx.AsyncClient, ids: Ids
) -> None:
    e1, e2 = two_engines
    assert e1.store.pool is not e2.store.pool and e1.batcher is not e2.batcher
    rng = random.Random(7)
    ledger = ids.ledger()
    bank, purse, m1, m2 = ids.accounts(4)
    hot = ids.accounts(4)
    r = await http.post("/v1/accounts", headers=api.admin, json=[
        {"id": bank, "ledger": ledger, "kind": "clearing", "code": 1},
        {"id": purse, "ledger": ledger, "kind": "purse", "code": 1, "flags": [DMNEC]},
        {"id": m1, "ledger": ledger, "kind": "merchant", "code": 1},
        {"id": m2, "ledger": ledger, "kind": "merchant", "code": 1},
        *({"id": a, "ledger": ledger, "kind": "suspense", "code": 1} for a in hot),
    ])
    assert {x["status"] for x in r.json()} == {"created"}
    [top] = await e1.batcher.submit([_transfer(tr(ledger, bank, purse, 1_000, 4))])
    assert top.status is TransferStatus.CREATED

    # Conflicting: 60 meals of 100 against a purse holding 1 000; both engines submit all of
    # them (in different orders), so exactly 10 can be created, whatever the interleaving.
    meals = [tr(ledger, purse, rng.choice([m1, m2]), 100) for _ in range(60)]
    # Independent: 300 transfers among the hot accounts, each sent to both engines.
    moves = []
    for _ in range(300):
        d, c = rng.sample(hot, 2)
        moves.append(tr(ledger, d, c, rng.randint(1, 500)))

    def plan() -> list[list[Json]]:
        work = meals + moves
        rng.shuffle(work)
        out = []
        while work:
            n = rng.randint(1, 6)
            out.append(work[:n])
            work = work[n:]
        return out

    results: list[tuple[int, Any]] = []

    async def worker(engine: Engine, reqs: list[list[Json]], who: int) -> None:
        last = 0
        for body in reqs:
            res = await engine.batcher.submit([_transfer(t) for t in body])
            assert [x.id for x in res] == [t["id"] for t in body]
            stamps = [x.timestamp or 0 for x in res if x.status is TransferStatus.CREATED]
            assert all(stamps)
            # one caller's successive requests see a clock that only moves forward
            assert all(last < s for s in stamps) and stamps == sorted(stamps)
            last = max([last, *stamps])
            results.extend((who, x) for x in res)

    # three concurrent callers per engine, each with its own shuffled copy of all the work
    await asyncio.gather(*(worker(e, plan(), i) for i, e in enumerate([e1, e2, e1, e2, e1, e2])))

    by_id: dict[str, Counter[str]] = defaultdict(Counter)
    creators: dict[str, set[int]] = defaultdict(set)
    for who, x in results:
        by_id[x.id][x.status.value] += 1
        if x.status is TransferStatus.CREATED:
            creators[x.id].add(who % 2)
    for t in moves:
        assert by_id[t["id"]] == Counter({"created": 1, "exists": 5}), t["id"]
    won = [t for t in meals if by_id[t["id"]]["created"] == 1]
    assert len(won) == 10
    for t in meals:
        seen = by_id[t["id"]]
        assert seen in (Counter({"created": 1, "exists": 5}),
                        Counter({"exceeds_credits": 6})), seen
    # both engines did real work (neither simply waited for the other)
    assert {next(iter(s)) for s in creators.values()} == {0, 1}

    want: dict[int, list[int]] = {a: [0, 0, 0, 0] for a in [bank, purse, m1, m2, *hot]}
    for t in [*moves, *won]:
        want[t["debit_account_id"]][0] += t["amount"]
        want[t["credit_account_id"]][1] += t["amount"]
    want[bank][0] += 1_000
    want[purse][1] += 1_000
    live = await check_books(e2.store.pool, ledger)
    assert live == {a: tuple(v) for a, v in want.items()}
    assert live[purse][1] - live[purse][0] == 0  # spent to the last fen, never below
    b = (await http.get(f"/v1/accounts/{purse}/balance", headers=api.read)).json()
    assert (b["balance"], b["available"]) == (0, 0)
    stamps = await check_clock_and_chain(e1.store.pool, ledger)
    assert len(stamps) == 1 + len(moves) + 10


async def test_one_bad_request_does_not_fail_its_batch_neighbours(
    engine: Engine, api: Api, http: httpx.AsyncClient, ids: Ids
) -> None:
    ledger = ids.ledger()
    a, b = ids.accounts(2)
    r = await http.post("/v1/accounts", headers=api.admin, json=[
        {"id": x, "ledger": ledger, "kind": "suspense", "code": 1} for x in (a, b)])
    assert {x["status"] for x in r.json()} == {"created"}
    good = [_transfer(tr(ledger, a, b, 1)) for _ in range(5)]
    poison = Transfer(id=uuid.uuid4(), ledger=ledger, debit_account_id=a, credit_account_id=b,
                      amount=1, code=1, user_data="a\x00b")
    # submitted in one loop turn, so the committer takes them as one batch
    out = await asyncio.gather(*(engine.batcher.submit([t]) for t in [*good[:3], poison,
                                                                       *good[3:]]),
                               return_exceptions=True)
    innocent = [o for i, o in enumerate(out) if i != 3]
    assert all(isinstance(o, list) and o[0].status is TransferStatus.CREATED
               for o in innocent), out

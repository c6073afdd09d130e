"""Issue 18, findings 2 and 6: one transfer id is one transfer across ledgers, and ledgers come
only from accounts (nothing is created for a ledger a transfer or a subsidy merely names; many
ledgers in one request cannot hold the committer; the hold expirer asks one question a second).

Real PostgreSQL, the real batcher, the real HTTP API; after each test the ledgers involved are
verified (``engine.verify``: audit chain, balances against transfers, holds) and no transfer id
may be stored twice anywhere in the database.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import asyncpg
import httpx
import msgspec

from engine.campus import Campus, HolderKind, HolderResult
from engine.campus.accounts import fund_account_id, holder_account_ids
from engine.db.migrate import migrate, migration_files
from engine.finance.verify import verify
from engine.grouping import TransferResult
from engine.service import Engine
from engine.store import Store
from ledger.account import Account
from ledger.status import TransferStatus
from ledger.transfer import Transfer
from ledger.types import AccountFlag, AccountKind, TransferFlag
from tests.conftest import Api, Ids
from tests.faults.harness import scratch_database

# What these tests guard is new API (engine.batcher's ledger groups, the one-question expirer):
# imported where used, so that against the code before the fix each test fails on what it
# checks rather than all of them on an import.

S = TransferStatus
SQL_ROWS = "SELECT id, ledger FROM transfers WHERE id = ANY($1::uuid[]) ORDER BY id"
SQL_LEDGER_ROWS = "SELECT ledger FROM ledgers WHERE ledger = ANY($1::int[])"
SQL_ACCOUNT_ROWS = "SELECT id FROM accounts WHERE ledger = ANY($1::int[])"


class Book:
    """A ledger with a clearing account (top-up channel) and two purses."""

    def __init__(self, ledger: int, clearing: int, purse: int, other: int) -> None:
        self.ledger = ledger
        self.clearing = clearing
        self.purse = purse
        self.other = other

    def transfer(self, tid: uuid.UUID, *, amount: int = 100, **kw: Any) -> Transfer:
        """A top-up of ``amount`` into the purse (fields overridable)."""
        fields: dict[str, Any] = {
            "id": tid, "ledger": self.ledger, "debit_account_id": self.clearing,
            "credit_account_id": self.purse, "amount": amount, "code": 4,
        }
        fields.update(kw)
        return Transfer(**fields)


async def _book(engine: Engine, ids: Ids) -> Book:
    ledger = ids.ledger()
    clearing, purse, other = ids.accounts(3)
    statuses = await engine.store.create_accounts([
        Account(id=clearing, ledger=ledger, kind=AccountKind.CLEARING, code=4),
        Account(id=purse, ledger=ledger, kind=AccountKind.PURSE, code=10,
                flags=(AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,)),
        Account(id=other, ledger=ledger, kind=AccountKind.MERCHANT, code=1),
    ])
    assert statuses == ["created"] * 3
    return Book(ledger, clearing, purse, other)


def _json(t: Transfer) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": str(t.id), "ledger": t.ledger, "debit_account_id": t.debit_account_id,
        "credit_account_id": t.credit_account_id, "amount": t.amount, "code": t.code,
    }
    if t.flags:
        out["flags"] = [str(f) for f in t.flags]
    if t.pending_id is not None:
        out["pending_id"] = str(t.pending_id)
    return out


async def _fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


# Ids of these ledgers' transfers stored more than once, in any ledger. (Not every id of the
# session database: bench.export_day's COPY loader, which tests use, bypasses the engine.)
SQL_DUPLICATES_OF = """
SELECT count(*) FROM (
    SELECT id FROM transfers
    WHERE id IN (SELECT id FROM transfers WHERE ledger = ANY($1::int[]))
    GROUP BY id HAVING count(*) > 1
) d
"""


async def _invariants(engine: Engine, dsn: str, ledgers: list[int]) -> None:
    """The fault suite's checks: the ledgers verify (audit chain, every balance equal to its
    transfers, holds), and none of their transfer ids is stored twice, in any ledger."""
    report = await verify(engine.store.pool, ledgers=ledgers)
    assert report.ok, [str(p) for p in report.ordered()]
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval(SQL_DUPLICATES_OF, ledgers) == 0, "an id is stored twice"
    finally:
        await conn.close()


# -- finding 2: one transfer id, two transfers -----------------------------------------------------


def _two_ledger_request(a: Book, b: Book) -> tuple[list[Transfer], list[S]]:
    """One request naming ids in two ledgers, and the statuses one-at-a-time application
    gives (each later occurrence sees the earlier one, whatever the ledger groups' order)."""
    x, y, w, v, u, p = (uuid.uuid4() for _ in range(6))
    body = [
        a.transfer(x),
        # the same fields in ledger B (A's accounts): only the ledger differs
        a.transfer(x, ledger=b.ledger),
        b.transfer(y),
        a.transfer(y),  # its accounts differ before its ledger does
        a.transfer(w, amount=0),  # refused: the id stays free...
        b.transfer(w),  # ...for ledger B
        b.transfer(v),  # B's group opens before A's next one...
        a.transfer(u),  # ...but u is named in A first
        b.transfer(u),
        a.transfer(p, flags=(TransferFlag.PENDING,)),  # a hold in A...
        b.transfer(uuid.uuid4(), amount=0, pending_id=p, flags=(TransferFlag.POST_PENDING,),
                   debit_account_id=0, credit_account_id=0),  # ...posted from B
    ]
    want = [
        S.CREATED, S.EXISTS_WITH_DIFFERENT_LEDGER,
        S.CREATED, S.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID,
        S.AMOUNT_MUST_BE_POSITIVE, S.CREATED,
        S.CREATED, S.CREATED, S.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID,
        S.CREATED, S.PENDING_TRANSFER_HAS_DIFFERENT_LEDGER,
    ]
    return body, want


async def test_one_id_in_two_ledgers_of_one_request(
    http: httpx.AsyncClient, api: Api, engine: Engine, dsn: str, ids: Ids
) -> None:
    a, b = await _book(engine, ids), await _book(engine, ids)
    body, want = _two_ledger_request(a, b)
    r = await http.post("/v1/transfers", headers=api.admin, json=[_json(t) for t in body])
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()] == want

    # the same transfers one request at a time (fresh ids, same shape): the same answers
    a2, b2 = await _book(engine, ids), await _book(engine, ids)
    body2, _ = _two_ledger_request(a2, b2)
    one_by_one = [(await engine.batcher.submit([t]))[0].status for t in body2]
    assert one_by_one == want

    created = {t.id: t.ledger for t, st in zip(body, want, strict=True) if st is S.CREATED}
    rows = await _fetch(dsn, SQL_ROWS, list({t.id for t in body}))
    assert {r["id"]: r["ledger"] for r in rows} == created and len(rows) == len(created)
    for tid, ledger in created.items():
        g = await http.get(f"/v1/transfers/{tid}", headers=api.read)
        assert g.status_code == 200 and g.json()["ledger"] == ledger
    await _invariants(engine, dsn, [a.ledger, b.ledger, a2.ledger, b2.ledger])


async def test_one_id_in_two_concurrent_requests(
    http: httpx.AsyncClient, api: Api, engine: Engine, dsn: str, ids: Ids
) -> None:
    """Two requests arriving together (one batch): the second sees the first."""
    a, b = await _book(engine, ids), await _book(engine, ids)
    sent = []
    for _ in range(20):
        x = uuid.uuid4()
        sent.append(x)
        first, second = await asyncio.gather(
            engine.batcher.submit([a.transfer(x)]), engine.batcher.submit([b.transfer(x)])
        )
        assert [first[0].status, second[0].status] == [
            S.CREATED, S.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID]
    rows = await _fetch(dsn, SQL_ROWS, sent)
    assert [r["ledger"] for r in rows] == [a.ledger] * len(sent)
    for x in sent[:3]:
        g = await http.get(f"/v1/transfers/{x}", headers=api.read)
        assert g.status_code == 200 and g.json()["ledger"] == a.ledger
    await _invariants(engine, dsn, [a.ledger, b.ledger])


async def test_one_id_in_consecutive_batches(engine: Engine, dsn: str, ids: Ids) -> None:
    """The second request arrives while the first one's batch commits: the next batch is
    prepared meanwhile, but not its ledger group that names the id in flight elsewhere."""
    a, b, c = [await _book(engine, ids) for _ in range(3)]

    async def later(t: Transfer) -> list[TransferResult]:
        await asyncio.sleep(0.01)  # the first batch is taken: this comes in the next one
        return await engine.batcher.submit([t])

    sent = []
    for _ in range(5):
        x = uuid.uuid4()
        sent.append(x)
        # one batch: 3,000 transfers of ledger C (they keep it writing a while) and x in A
        filler, first, second = await asyncio.gather(
            engine.batcher.submit([c.transfer(uuid.uuid4()) for _ in range(3000)]),
            engine.batcher.submit([a.transfer(x)]),
            later(b.transfer(x)),
        )
        assert {r.status for r in filler} == {S.CREATED}
        assert first[0].status is S.CREATED
        assert second[0].status is S.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID
    rows = await _fetch(dsn, SQL_ROWS, sent)
    assert [r["ledger"] for r in rows] == [a.ledger] * len(sent)
    await _invariants(engine, dsn, [a.ledger, b.ledger, c.ledger])


# -- finding 6: ledgers from nowhere ---------------------------------------------------------------


async def test_transfer_to_a_ledger_without_accounts_leaves_nothing(
    http: httpx.AsyncClient, api: Api, engine: Engine, dsn: str, ids: Ids
) -> None:
    a = await _book(engine, ids)
    x = uuid.uuid4()
    assert (await engine.batcher.submit([a.transfer(x)]))[0].status is S.CREATED
    ghosts = [ids.ledger() for _ in range(3)]
    body = [
        Transfer(id=uuid.uuid4(), ledger=ghosts[0], debit_account_id=ids.account(),
                 credit_account_id=ids.account(), amount=1, code=1),
        a.transfer(uuid.uuid4(), ledger=ghosts[1]),  # real accounts, of another ledger
        a.transfer(x, ledger=ghosts[2]),  # an id stored in another ledger
    ]
    want = [S.DEBIT_ACCOUNT_NOT_FOUND, S.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER,
            S.EXISTS_WITH_DIFFERENT_LEDGER]
    r = await http.post("/v1/transfers", headers=api.admin, json=[_json(t) for t in body])
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()] == want
    # the store's locked path (the expirer's, and the batcher's fallback) answers the same
    for t, st in zip(body, want, strict=True):
        assert (await engine.store.post_batch(t.ledger, [t])).statuses == [st]
    assert await _fetch(dsn, SQL_LEDGER_ROWS, ghosts) == []
    assert await _fetch(dsn, SQL_ACCOUNT_ROWS, ghosts) == []
    rows = await _fetch(dsn, "SELECT id FROM transfers WHERE ledger = ANY($1::int[])", ghosts)
    assert rows == []
    await _invariants(engine, dsn, [a.ledger])


async def test_a_request_naming_too_many_ledgers_is_refused(
    http: httpx.AsyncClient, api: Api, engine: Engine, dsn: str, ids: Ids
) -> None:
    ghosts = [ids.ledger() for _ in range(2000)]
    body = [{"id": str(uuid.uuid4()), "ledger": g, "debit_account_id": 1,
             "credit_account_id": 2, "amount": 1, "code": 1} for g in ghosts]
    r = await http.post("/v1/transfers", headers=api.admin, json=body)
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"] == "too_large" and "at most 64 ledgers" in r.json()["detail"]
    assert "needs 2000" in r.json()["detail"]
    # as many as a batch may hold: answered, and still nothing created
    r = await http.post("/v1/transfers", headers=api.admin, json=body[:64])
    assert r.status_code == 200, r.text
    assert {x["status"] for x in r.json()} == {"debit_account_not_found"}
    assert await _fetch(dsn, SQL_LEDGER_ROWS, ghosts) == []


async def test_ledger_groups_bound_a_batch() -> None:
    """The taker stops adding requests at MAX_LEDGER_GROUPS_PER_BATCH (transactions)."""
    from engine import limits
    from engine.grouping import Batch, Request, ledger_groups

    def request(ledgers: range, tid: uuid.UUID | None = None) -> Any:
        ts = [Transfer(id=tid or uuid.uuid4(), ledger=g, debit_account_id=1,
                       credit_account_id=2, amount=1, code=1) for g in ledgers]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        one = ts[0].ledger if len(ledgers) == 1 else None
        return Request(ts, fut, ledger=one, cost=len(ts))

    bound = limits.MAX_LEDGER_GROUPS_PER_BATCH
    assert bound == 64
    b = Batch()
    assert b.add(request(range(1, 41)), max_groups=bound)
    assert not b.add(request(range(100, 140)), max_groups=bound)  # 80 > 64: next batch
    assert b.add(request(range(1, 25)), max_groups=bound)  # the same ledgers: no new groups
    assert b.add(request(range(200, 224)), max_groups=bound)  # 64 groups
    assert not b.add(request(range(300, 301)), max_groups=bound)
    assert len(b.groups) == bound
    big = Batch()
    assert big.add(request(range(1, 1000)), max_groups=bound)  # an empty batch takes any
    # one id named in ledgers 1, 2, 1, 2...: a new round (and groups) at each step
    x = uuid.uuid4()
    assert ledger_groups(request(range(1, 3), x).transfers * 3) == 6


async def test_many_ledgers_do_not_hold_the_committer(engine: Engine, dsn: str,
                                                      ids: Ids) -> None:
    """64 requests naming 63 made-up ledgers each (4,032 ledgers) are submitted, then one
    transfer on a real ledger: it is answered within a bound, not after 4,032 transactions.
    (The queue counts each extra ledger of a request as LEDGER_GROUP_COST transfers, so some
    of the 64 are refused at once as overload; those queued are answered without a
    transaction each, their ledgers having no accounts.)"""
    from engine.batcher import Overloaded

    a = await _book(engine, ids)
    ghosts = [[ids.ledger() for _ in range(63)] for _ in range(64)]

    async def attack(gs: list[int]) -> list[TransferResult] | Overloaded:
        try:
            return await engine.batcher.submit([
                Transfer(id=uuid.uuid4(), ledger=g, debit_account_id=1, credit_account_id=2,
                         amount=1, code=1) for g in gs])
        except Overloaded as e:
            return e

    async def honest() -> float:
        t0 = time.perf_counter()
        r = await engine.batcher.submit([a.transfer(uuid.uuid4())])
        assert r[0].status is S.CREATED
        return time.perf_counter() - t0

    *answers, waited = await asyncio.gather(*map(attack, ghosts), honest())
    assert isinstance(waited, float)
    taken = [x for x in answers if not isinstance(x, Overloaded)]
    print(f"\nhonest one-transfer request behind {len(taken) * 63} made-up ledgers "
          f"({len(answers) - len(taken)} requests refused as overload): {waited * 1000:.0f} ms")
    assert waited < 2.0, f"the honest request waited {waited:.1f} s"
    assert taken
    for x in taken:
        assert isinstance(x, list) and {r.status for r in x} == {S.DEBIT_ACCOUNT_NOT_FOUND}
    assert await _fetch(dsn, SQL_LEDGER_ROWS, [g for gs in ghosts for g in gs]) == []
    await _invariants(engine, dsn, [a.ledger])


async def test_the_expirer_asks_one_question_for_all_ledgers(admin_dsn: str) -> None:
    """10,000 ledgers with accounts and no holds: each expirer pass is one statement. A due
    hold in one of them: that ledger alone gets an expiry batch."""
    async with scratch_database(admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        await migrate(conn)
        await conn.close()
        statements: list[str] = []

        async def log_queries(c: asyncpg.Connection) -> None:
            c.add_query_logger(lambda q: statements.append(q.query))

        async def no_reset(c: asyncpg.Connection) -> None:
            pass  # as the engine's pool: no statement on release

        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, init=log_queries,
                                         reset=no_reset)
        assert pool is not None
        try:
            store = Store(pool)
            accounts = [Account(id=i + 1, ledger=i + 1, kind=AccountKind.CLEARING, code=4)
                        for i in range(10_000)]
            for k in range(0, len(accounts), 1000):
                assert set(await store.create_accounts(accounts[k : k + 1000])) == {"created"}
            assert len(await store.ledgers()) == 10_000

            from engine.expiry import run_expirer

            statements.clear()
            task = asyncio.create_task(run_expirer(store, interval_s=60))
            await asyncio.sleep(1.0)  # one pass
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert len(statements) == 1, f"{len(statements)} statements in one pass"

            # one due hold, in ledger 7 (a purse to hold from)
            await store.create_accounts(
                [Account(id=20_007, ledger=7, kind=AccountKind.PURSE, code=10)])
            hold = uuid.uuid4()
            out = await store.post_batch(7, [Transfer(
                id=hold, ledger=7, debit_account_id=7, credit_account_id=20_007, amount=5,
                code=2, flags=(TransferFlag.PENDING,), timeout_s=1)])
            assert out.statuses == [S.CREATED]
            await asyncio.sleep(1.1)
            from engine.expiry import expire_due_holds

            statements.clear()
            assert await expire_due_holds(store) == 1
            touched = {s for s in statements if "ledgers" in s and "UPDATE" in s}
            assert touched, "the expiry batch takes ledger 7's clock"
            assert len(statements) < 12, statements  # the question + one expiry batch
            state = await pool.fetchval("SELECT state FROM holds WHERE id = $1", hold)
            assert state == "expired"
        finally:
            await pool.close()


# -- subsidies create no fund --------------------------------------------------------------------


async def test_subsidies_create_no_fund_and_no_ledger(
    http: httpx.AsyncClient, api: Api, engine: Engine, dsn: str, ids: Ids
) -> None:
    ghosts = [ids.ledger() for _ in range(50)]
    items = [{"ledger": g, "holder_id": "S1", "amount": 100, "batch_id": "b"} for g in ghosts]
    r = await http.post("/v1/subsidies", headers=api.admin, json=items)
    assert r.status_code == 200, r.text
    assert {x["status"] for x in r.json()} == {"holder_not_found"}
    assert await _fetch(dsn, SQL_ACCOUNT_ROWS, ghosts) == []
    assert await _fetch(dsn, SQL_LEDGER_ROWS, ghosts) == []

    # a holder registered before funds came with holders (its ledger has no fund): refused,
    # and the fund is still not created
    ledger = ids.ledger()
    purse, subsidy = holder_account_ids(ledger, "old")
    assert await engine.store.create_accounts([
        Account(id=purse, ledger=ledger, kind=AccountKind.PURSE, code=10),
        Account(id=subsidy, ledger=ledger, kind=AccountKind.SUBSIDY, code=20),
    ]) == ["created", "created"]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO holders (ledger, id, name, kind, purse_account_id, subsidy_account_id,"
            " created_at) VALUES ($1, 'old', 'Old', 'student', $2, $3, 0)",
            ledger, purse, subsidy)
    finally:
        await conn.close()
    item = {"ledger": ledger, "holder_id": "old", "amount": 100, "batch_id": "b"}
    r = await http.post("/v1/subsidies", headers=api.admin, json=[item])
    assert [x["status"] for x in r.json()] == ["fund_not_found"]
    assert await engine.store.get_account(fund_account_id(ledger)) is None

    # a holder registered now brings the ledger's fund: the subsidy is paid from it
    campus = Campus(engine)
    assert isinstance(await campus.create_holder(holder_id="new", ledger=ledger, name="New",
                                                 kind=HolderKind.STUDENT), HolderResult)
    fund = await engine.store.get_account(fund_account_id(ledger))
    assert fund is not None and fund.state.kind is AccountKind.FUND
    r = await http.post("/v1/subsidies", headers=api.admin, json=[item])
    assert [x["status"] for x in r.json()] == ["created"]
    await _invariants(engine, dsn, [ledger])


SQL_LEGACY = """
INSERT INTO accounts (ledger, id, kind, code, flags, created_at) VALUES
    ($1, $2, 'purse', 10, 0, 0), ($1, $3, 'subsidy', 20, 0, 0);
INSERT INTO holders (ledger, id, name, kind, purse_account_id, subsidy_account_id, created_at)
    VALUES ($1, 'h', 'H', 'student', $2, $3, 0);
"""


async def test_migration_gives_legacy_ledgers_their_fund(admin_dsn: str) -> None:
    """Ledgers whose holders predate funds-with-holders get their fund (the id the engine
    derives); clock rows left by transfers to ledgers without accounts are dropped."""
    async with scratch_database(admin_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "CREATE TABLE schema_migrations (name text PRIMARY KEY, sha256 text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())")
            import hashlib

            for name, sql in migration_files():
                if name >= "0005":
                    break
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name, sha256) VALUES ($1, $2)",
                                   name, hashlib.sha256(sql.encode()).hexdigest())
            for ledger in (3, 2_000_000_000):
                purse, subsidy = holder_account_ids(ledger, "h")
                await conn.execute("INSERT INTO ledgers (ledger) VALUES ($1)", ledger)
                for stmt in SQL_LEGACY.strip().split(";\n"):
                    await conn.execute(stmt.rstrip(";"), ledger, purse, subsidy)
            await conn.execute("INSERT INTO ledgers (ledger) VALUES (77), (78)")  # no accounts
            assert await migrate(conn) == [n for n, _ in migration_files() if n >= "0005"]
            funds = await conn.fetch(
                "SELECT ledger, id, code, flags FROM accounts WHERE kind = 'fund' ORDER BY ledger")
            assert [tuple(f) for f in funds] == [
                (3, fund_account_id(3), 90, 0),
                (2_000_000_000, fund_account_id(2_000_000_000), 90, 0)]
            ledgers = await conn.fetch("SELECT ledger FROM ledgers ORDER BY ledger")
            assert [r["ledger"] for r in ledgers] == [3, 2_000_000_000]
        finally:
            await conn.close()


# -- random requests over several ledgers against the reference model ------------------------------


class _Scenario:
    """Random requests over three ledgers with accounts and one without, naming ids from a
    small shared pool (as ``id`` and as ``pending_id``), so the same id keeps turning up in
    several ledgers, in one request and across requests."""

    def __init__(self, rng: random.Random, books: list[Book], ghost: int) -> None:
        self.rng = rng
        self.books = books
        self.ghost = ghost
        self.pool = [uuid.uuid4() for _ in range(4)]

    def tid(self) -> uuid.UUID:
        return self.rng.choice(self.pool) if self.rng.random() < 0.7 else uuid.uuid4()

    def one(self, book: Book, *, chained: bool = False) -> Transfer:
        r, kind = self.rng, self.rng.randrange(8)
        if chained and kind == 2:
            kind = 7  # a chain stays in one ledger (one naming two fails in the batcher)
        if kind == 0:  # a purse spends: may exceed its credits
            return book.transfer(self.tid(), debit_account_id=book.purse,
                                 credit_account_id=book.other, amount=r.randint(1, 80))
        if kind == 1:  # another ledger's accounts
            other = r.choice([b for b in self.books if b is not book])
            return other.transfer(self.tid(), ledger=book.ledger)
        if kind == 2:  # a ledger without accounts
            return book.transfer(self.tid(), ledger=self.ghost)
        if kind == 3:  # a hold
            return book.transfer(self.tid(), flags=(TransferFlag.PENDING,))
        if kind == 4:  # posting a hold in full, from any ledger
            return book.transfer(self.tid(), amount=0, pending_id=r.choice(self.pool),
                                 flags=(TransferFlag.POST_PENDING,), debit_account_id=0,
                                 credit_account_id=0)
        if kind == 5:
            return book.transfer(self.tid(), amount=0)  # refused: the id stays free
        return book.transfer(self.tid(), amount=r.randint(1, 50))

    def request(self) -> list[Transfer]:
        out: list[Transfer] = []
        for _ in range(self.rng.randint(1, 5)):
            book = self.rng.choice(self.books)
            if self.rng.random() < 0.15:  # a linked pair, in one ledger
                first = self.one(book, chained=True)
                out += [msgspec.structs.replace(first, flags=(*first.flags, TransferFlag.LINKED)),
                        self.one(book, chained=True)]
            else:
                out.append(self.one(book))
        return out


async def test_random_requests_over_ledgers_answer_as_one_at_a_time(
    engine: Engine, dsn: str, ids: Ids
) -> None:
    """Requests arriving together (merged, split in ledger groups and rounds, pipelined)
    answer exactly what the reference model gives applying them one at a time in arrival
    order, and store each id once."""
    from tests.ledger.model import Model

    async def wave(rs: list[list[Transfer]], delay: float) -> list[list[TransferResult]]:
        if delay:
            await asyncio.sleep(delay)
        return list(await asyncio.gather(*(engine.batcher.submit(r) for r in rs)))

    rng = random.Random(18)
    for _ in range(40):
        books = [await _book(engine, ids) for _ in range(3)]
        model = Model()
        for b in books:
            model.create_accounts([
                Account(id=b.clearing, ledger=b.ledger, kind=AccountKind.CLEARING, code=4),
                Account(id=b.purse, ledger=b.ledger, kind=AccountKind.PURSE, code=10,
                        flags=(AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,)),
                Account(id=b.other, ledger=b.ledger, kind=AccountKind.MERCHANT, code=1)])
        scenario = _Scenario(rng, books, ids.ledger())
        requests = [scenario.request() for _ in range(rng.randint(2, 8))]
        # in waves, 2 ms apart: a wave is merged into a batch, the next one is prepared while
        # that batch commits; arrival order is the requests' order
        n = len(requests)
        cuts = sorted(rng.sample(range(1, n), rng.randint(0, min(2, n - 1))))
        waves = [requests[i:j] for i, j in zip([0, *cuts], [*cuts, n], strict=True)]
        got = [x for answers in await asyncio.gather(*(
            wave(w, 0.002 * k) for k, w in enumerate(waves))) for x in answers]
        want = [model.apply_batch(r, time.time_ns() + 10**9 * k)[0]
                for k, r in enumerate(requests)]
        assert [[x.status for x in g] for g in got] == want, requests
        await _invariants(engine, dsn, [b.ledger for b in books])

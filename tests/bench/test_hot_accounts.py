"""Throughput semantics the bench relies on, checked on the real database:

- a batch touching one merchant 5,000 times writes its row once (one UPDATE per account);
- a full queue refuses at once (``Overloaded``; HTTP 503 with Retry-After) while the committer
  is stuck, and everything queued is still answered once it is free;
- two engines (two pools, two batchers) hammering one hot merchant keep the books and the audit
  chain verifiable.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Final

import httpx
import msgspec
import pytest
import uvicorn

from engine.batcher import Batcher, Overloaded
from engine.finance.verify import verify
from engine.grouping import TransferResult
from engine.http.app import create_app
from engine.service import Engine
from ledger.account import Account
from ledger.status import AccountStatus, TransferStatus
from ledger.transfer import Transfer
from ledger.types import AccountFlag, AccountKind, TransferCode
from tests.conftest import Ids

PURSE_FUNDS: Final = 10_000_000
SQL_XACT_UPDATES: Final = """
SELECT n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = 'accounts'
"""
SQL_MERCHANT: Final = "SELECT credits_posted FROM accounts WHERE ledger = $1 AND id = $2"
SQL_LOCK_CLOCK: Final = "SELECT 1 FROM ledgers WHERE ledger = $1 FOR UPDATE"


class Campus:
    """A ledger with funded purses, a merchant and a clearing account."""

    def __init__(self, ids: Ids, purses: int) -> None:
        self.ledger = ids.ledger()
        self.purses = ids.accounts(purses)
        self.merchant, self.clearing = ids.accounts(2)

    async def load(self, engine: Engine) -> None:
        dmnec = (AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,)
        accounts = [Account(id=p, ledger=self.ledger, kind=AccountKind.PURSE, flags=dmnec)
                    for p in self.purses]
        accounts += [
            Account(id=self.merchant, ledger=self.ledger, kind=AccountKind.MERCHANT),
            Account(id=self.clearing, ledger=self.ledger, kind=AccountKind.CLEARING),
        ]
        assert set(await engine.store.create_accounts(accounts)) == {AccountStatus.CREATED}
        tops = [Transfer(id=uuid.uuid4(), ledger=self.ledger, debit_account_id=self.clearing,
                         credit_account_id=p, amount=PURSE_FUNDS, code=TransferCode.TOP_UP)
                for p in self.purses]
        out = await engine.store.post_batch(self.ledger, tops)
        assert set(out.statuses) == {TransferStatus.CREATED}

    def meal(self, rng: random.Random, purse: int | None = None) -> Transfer:
        """A meal on the merchant, from ``purse`` or a random one."""
        return Transfer(id=uuid.UUID(int=rng.getrandbits(128), version=4), ledger=self.ledger,
                        debit_account_id=purse or rng.choice(self.purses),
                        credit_account_id=self.merchant, amount=rng.randint(300, 2500),
                        code=TransferCode.MEAL)

    def meals(self, n: int, rng: random.Random) -> list[Transfer]:
        return [self.meal(rng) for _ in range(n)]


async def test_hot_merchant_row_written_once_per_batch(engine: Engine, ids: Ids) -> None:
    c = Campus(ids, 50)
    await c.load(engine)
    batch = c.meals(5000, random.Random(1))
    async with engine.store.pool.acquire() as conn, conn.transaction():
        before = await conn.fetchval(SQL_XACT_UPDATES)
        outcome, _ = await engine.store._post_tip(conn, c.ledger, batch, (), False, None)
        updates = await conn.fetchval(SQL_XACT_UPDATES) - before
    assert set(outcome.statuses) == {TransferStatus.CREATED}
    touched = set(outcome.touched_accounts)
    assert c.merchant in touched and len(touched) == len(outcome.touched_accounts) <= 51
    assert updates == len(touched)  # 5000 credits to the merchant, one row version
    async with engine.store.pool.acquire() as conn:
        assert await conn.fetchval(SQL_MERCHANT, c.ledger, c.merchant) == sum(
            t.amount for t in batch
        )


Stuck = tuple[Batcher, "Campus", "ClockLock"]


@pytest.fixture
async def stuck_batcher(engine: Engine, ids: Ids) -> AsyncIterator[Stuck]:
    c = Campus(ids, 20)
    await c.load(engine)
    b = Batcher(engine.store, max_queued=100)
    b.start()
    lock = ClockLock(engine, c.ledger)
    yield b, c, lock
    await lock.release()
    await b.stop()


class ClockLock:
    """Holds the ledger's clock row locked from another connection: the committer blocks."""

    def __init__(self, engine: Engine, ledger: int) -> None:
        self.engine, self.ledger = engine, ledger
        self._conn: object | None = None
        self._tx: object | None = None

    async def take(self) -> None:
        conn = await self.engine.store.pool.acquire()
        tx = conn.transaction()
        await tx.start()
        await conn.execute(SQL_LOCK_CLOCK, self.ledger)
        self._conn, self._tx = conn, tx

    async def release(self) -> None:
        if self._tx is not None:
            await self._tx.rollback()  # type: ignore[attr-defined]
            await self.engine.store.pool.release(self._conn)  # type: ignore[arg-type]
            self._conn = self._tx = None


async def _fill(b: Batcher, c: Campus) -> list[asyncio.Task[list[TransferResult]]]:
    rng = random.Random(2)
    first = asyncio.create_task(b.submit(c.meals(1, rng)))
    await _until(lambda: b.queued == 0)  # the committer took it: it waits for the clock row
    await asyncio.sleep(0.05)
    tasks = [first] + [asyncio.create_task(b.submit(c.meals(10, rng))) for _ in range(10)]
    await _until(lambda: b.queued == 100)
    return tasks


async def _until(done: Callable[[], bool], *, limit_s: float = 10.0) -> None:
    """Poll ``done`` (state of another task, not an event anyone sets) until it holds."""
    for _ in range(int(limit_s / 0.002)):
        if done():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition not reached")


async def test_full_queue_refuses_at_once_then_drains(
    stuck_batcher: Stuck,
) -> None:
    b, c, lock = stuck_batcher
    await lock.take()
    tasks = await _fill(b, c)
    t0 = time.perf_counter()
    with pytest.raises(Overloaded):
        await b.submit(c.meals(1, random.Random(3)))
    assert time.perf_counter() - t0 < 0.05
    assert not any(t.done() for t in tasks)
    await lock.release()
    answers = await asyncio.gather(*tasks)
    assert [len(a) for a in answers] == [1] + [10] * 10
    assert {r.status for a in answers for r in a} == {TransferStatus.CREATED}


class _SmallQueueEngine(Engine):
    """The session engine seen through a batcher with a tiny queue."""

    def __init__(self, inner: Engine, batcher: Batcher) -> None:
        self._inner, self._small = inner, batcher

    @property
    def store(self):  # type: ignore[no-untyped-def]
        return self._inner.store

    @property
    def batcher(self) -> Batcher:
        return self._small

    async def ready(self) -> bool:
        return await self._inner.ready()


async def test_http_503_with_retry_after_when_the_queue_is_full(
    engine: Engine, stuck_batcher: Stuck
) -> None:
    b, c, lock = stuck_batcher
    app = create_app(_SmallQueueEngine(engine, b), admin_token="a", read_token="r")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, loop="none",
                                           lifespan="off", log_level="warning"))
    serving = asyncio.create_task(server.serve())
    await _until(lambda: server.started)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        await lock.take()
        tasks = await _fill(b, c)
        body = [msgspec.to_builtins(t) for t in c.meals(1, random.Random(4))]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            await http.get("/healthz")  # connection and route warm
            t0 = time.perf_counter()
            r = await http.post("/v1/transfers", json=body, headers={"Authorization": "Bearer a"})
            elapsed = time.perf_counter() - t0
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "overloaded"
        assert int(r.headers["retry-after"]) >= 1
        assert elapsed < 0.25  # answered while the committer is still stuck
        await lock.release()
        assert all(len(a) for a in await asyncio.gather(*tasks))
    finally:
        server.should_exit = True
        await serving


@pytest.mark.slow
async def test_two_engines_on_one_hot_merchant_stay_verifiable(
    engine: Engine, dsn: str, ids: Ids
) -> None:
    c = Campus(ids, 200)
    await c.load(engine)
    other = Engine(dsn, expirer_interval_s=0.2)
    await other.start(run_migrations=False)
    rng = random.Random(5)
    requests = [c.meals(rng.randint(1, 40), rng) for _ in range(200)]
    try:
        async def client(e: Engine, mine: list[list[Transfer]]) -> list[TransferResult]:
            out: list[TransferResult] = []
            for req in mine:
                out += await e.batcher.submit(req)
            return out

        results = await asyncio.gather(
            *(client(engine if i % 2 else other, requests[i::16]) for i in range(16))
        )
    finally:
        await other.stop()
    statuses = Counter(r.status for rs in results for r in rs)
    assert set(statuses) == {TransferStatus.CREATED}
    created = {r.id for rs in results for r in rs}
    amount = sum(t.amount for req in requests for t in req if str(t.id) in created)
    async with engine.store.pool.acquire() as conn:
        assert await conn.fetchval(SQL_MERCHANT, c.ledger, c.merchant) == amount
    report = await verify(engine.store.pool, ledgers=[c.ledger])
    assert report.ok, report.ordered()[:3]
    assert report.transfers == len(c.purses) + sum(len(r) for r in requests)


async def test_array_literals_round_trip(engine: Engine) -> None:
    """The store sends id and amount arrays as array literals: every value survives."""
    from engine.rows import pg_array as _pg_array

    ids = [uuid.uuid4() for _ in range(50)] + [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)]
    ints = [0, 1, -1, 2**63 - 1, -(2**63), 42]
    async with engine.store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT $1::text::uuid[]", _pg_array(ids)) == ids
        assert await conn.fetchval("SELECT $1::text::bigint[]", _pg_array(ints)) == ints
        got = await conn.fetchval("SELECT $1::text::uuid[]", _pg_array([ids[0], None]))
        assert got == [ids[0], None]
        assert await conn.fetchval("SELECT $1::text::int[]", _pg_array([])) == []

"""The batcher's pipeline under load: the next batch is prepared while the previous one is
written, and only commits if nothing else changed the ledger in between.

- under concurrent load most batches commit as prepared, and the books stay exact and
  verifiable (audit chain, live fields = facts, zero sum);
- a flag changed straight in SQL while batches keep flowing (prepared on tips read before
  it) is obeyed by every transfer submitted after the change committed: preparations read
  flags afresh;
- a second engine writing the same ledger makes preparations miss (its batches move the
  clock), never answers wrong.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Final

from engine import metrics
from engine.batcher import Batcher
from engine.finance.verify import verify
from engine.service import Engine
from engine.store import SQL_SET_FLAGS
from ledger.status import TransferStatus
from ledger.transfer import StoredTransfer, Transfer
from ledger.types import AccountFlags
from tests.bench.test_hot_accounts import PURSE_FUNDS, Campus
from tests.conftest import Ids

PURSES: Final = 40
SQL_BALANCES: Final = """
SELECT id, credits_posted - debits_posted AS balance FROM accounts WHERE ledger = $1
"""


def _speculation(outcome: str) -> float:
    v = metrics.REGISTRY.get_sample_value(
        "onecard_batch_speculation_total", {"outcome": outcome}
    )
    return v or 0.0


async def _load(batcher: Batcher, c: Campus, seed: int, stop: asyncio.Event,
                created: dict[uuid.UUID, Transfer]) -> None:
    """One submitter: requests of 4 meals (with the odd retry) until ``stop``."""
    rng = random.Random(f"{c.ledger}/{seed}")  # ids unique across tests and runs' ledgers
    last: list[Transfer] = []
    while not stop.is_set():
        req = [c.meal(rng) for _ in range(4)]
        if last and rng.random() < 0.1:
            req[0] = last[0]  # a retry: answers exists
        for t, r in zip(req, await batcher.submit(req), strict=True):
            if r.status is TransferStatus.CREATED:
                assert t.id not in created, "a transfer was created twice"
                created[t.id] = t
            else:
                assert r.status in (TransferStatus.EXISTS, TransferStatus.DEBIT_ACCOUNT_FROZEN), r
        last = req


async def _check_books(engine: Engine, c: Campus, created: dict[uuid.UUID, Transfer]) -> None:
    rows = {r["id"]: r["balance"]
            for r in await engine.store.pool.fetch(SQL_BALANCES, c.ledger)}
    spent = {p: 0 for p in c.purses}
    for t in created.values():
        spent[t.debit_account_id] += t.amount
    assert {p: rows[p] for p in c.purses} == {p: PURSE_FUNDS - spent[p] for p in c.purses}
    assert rows[c.merchant] == sum(spent.values())
    assert rows[c.clearing] == -PURSE_FUNDS * PURSES
    report = await verify(engine.store.pool, ledgers=[c.ledger])
    assert report.problems == [], report.problems


class _Heard:
    """A commit observer recording what the batcher reports for one ledger."""

    def __init__(self, ledger: int) -> None:
        self.ledger = ledger
        self.ids: Counter[uuid.UUID] = Counter()
        self.unknowns = 0

    def committed(self, ledger: int, created: Sequence[StoredTransfer]) -> None:
        if ledger == self.ledger:
            self.ids.update(t.id for t in created)

    def unknown(self, ledger: int) -> None:
        self.unknowns += 1


async def test_batches_commit_as_prepared_under_load(engine: Engine, ids: Ids) -> None:
    c = Campus(ids, PURSES)
    await c.load(engine)
    heard = _Heard(c.ledger)
    engine.batcher.observe(heard)
    held0 = _speculation("held")
    stop = asyncio.Event()
    created: dict[uuid.UUID, Transfer] = {}
    tasks = [asyncio.create_task(_load(engine.batcher, c, s, stop, created)) for s in range(64)]
    await asyncio.sleep(1.5)
    stop.set()
    await asyncio.gather(*tasks)
    assert len(created) > 500
    assert _speculation("held") - held0 > 5, "the pipeline never engaged"
    await _check_books(engine, c, created)
    # every transfer created was reported to the commit observer once, on both paths
    assert heard.unknowns == 0 and set(heard.ids) == set(created)
    assert set(heard.ids.values()) == {1}


async def test_flag_changed_in_sql_is_obeyed_by_the_next_batch(engine: Engine, ids: Ids) -> None:
    c = Campus(ids, PURSES)
    await c.load(engine)
    victim = c.purses[0]
    stop = asyncio.Event()
    created: dict[uuid.UUID, Transfer] = {}
    tasks = [asyncio.create_task(_load(engine.batcher, c, s, stop, created)) for s in range(32)]
    rng = random.Random(f"{c.ledger}/victim")
    frozen = int(AccountFlags.FROZEN)
    held0 = _speculation("held")
    try:
        for _ in range(10):
            await asyncio.sleep(0.05)  # batches keep flowing, each prepared on the last
            async with engine.store.pool.acquire() as conn:
                await conn.fetchval(SQL_SET_FLAGS, c.ledger, victim, frozen, 0)
            # the freeze has committed: a debit submitted now must see it
            [r] = await engine.batcher.submit([c.meal(rng, victim)])
            assert r.status is TransferStatus.DEBIT_ACCOUNT_FROZEN
            async with engine.store.pool.acquire() as conn:
                await conn.fetchval(SQL_SET_FLAGS, c.ledger, victim, 0, frozen)
            t = c.meal(rng, victim)
            [r] = await engine.batcher.submit([t])
            assert r.status is TransferStatus.CREATED
            created[t.id] = t
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert _speculation("held") - held0 > 5, "the pipeline never engaged"
    await _check_books(engine, c, created)


async def test_two_engines_on_one_ledger_answer_right(
    engine: Engine, dsn: str, ids: Ids
) -> None:
    c = Campus(ids, PURSES)
    await c.load(engine)
    other = Engine(dsn, expirer_interval_s=3600)
    await other.start(run_migrations=False)
    missed0 = _speculation("missed")
    try:
        stop = asyncio.Event()
        created: dict[uuid.UUID, Transfer] = {}
        tasks = [
            asyncio.create_task(_load(e.batcher, c, s, stop, created))
            for s, e in enumerate([engine, other] * 16)
        ]
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        await other.stop()
    assert len(created) > 200
    assert _speculation("missed") > missed0, "the engines never moved each other's clock"
    await _check_books(engine, c, created)

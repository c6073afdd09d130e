"""One batch, one worker: ``EXPLAIN`` on the coordinator shows the batch's write delegated as
one call to the worker owning its ledger, and every read of the batch and of the campus's hot
path routed to that same worker as a single task (never a task per shard)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

import asyncpg
import pytest

from engine.campus.reads import SQL_AFTER, SQL_CARD_REFS, SQL_CARD_STATES, SQL_PARTS, SQL_TERMINALS
from engine.loading import (
    SQL_DUE_HOLDS,
    SQL_LOAD_LEDGER_TRANSFERS,
    SQL_LOCK_ACCOUNTS,
    SQL_PEEK_ACCOUNTS,
    SQL_PEEK_LEDGER_TRANSFERS,
)
from engine.rows import pg_array
from engine.service import Engine
from engine.store import SQL_RESERVE
from engine.writing import COMMIT_PREPARED, WRITE_BATCH, Prepared
from ledger.account import Account
from ledger.status import AccountStatus, TransferStatus
from ledger.transfer import Transfer
from ledger.types import AccountKind, TransferCode, TransferFlag
from tests.citus.conftest import Node, worker_of
from tests.conftest import Ids

pytestmark = pytest.mark.citus


class Plan:
    """An EXPLAIN's text, and what it says about where the statement runs."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.text = "\n".join(lines)

    @property
    def tasks(self) -> int:
        counts = [int(n) for n in re.findall(r"Task Count: (\d+)", self.text)]
        assert counts, self.text
        return sum(counts)

    @property
    def nodes(self) -> set[Node]:
        return {(h, int(p)) for h, p in re.findall(r"Node: host=(\S+) port=(\d+)", self.text)}


async def explain(conn: asyncpg.Connection, sql: str, *args: object) -> Plan:
    rows = await conn.fetch("EXPLAIN (VERBOSE) " + sql, *args)
    return Plan([r[0] for r in rows])


class Ledger:
    """A fresh ledger with a clearing account and two purses, money in one, a pending hold."""

    def __init__(self, engine: Engine, ids: Ids) -> None:
        self.engine = engine
        self.ledger = ids.ledger()
        self.bank, self.purse, self.other = ids.accounts(3)

    async def setup(self) -> Ledger:
        st = await self.engine.store.create_accounts([
            Account(id=self.bank, ledger=self.ledger, kind=AccountKind.CLEARING, code=1),
            Account(id=self.purse, ledger=self.ledger, kind=AccountKind.PURSE, code=1),
            Account(id=self.other, ledger=self.ledger, kind=AccountKind.PURSE, code=1),
        ])
        assert st == [AccountStatus.CREATED] * 3
        self.hold = uuid.uuid4()
        results = await self.engine.batcher.submit([
            self.transfer(self.bank, self.purse, 1_000),
            Transfer(id=self.hold, ledger=self.ledger, debit_account_id=self.purse,
                     credit_account_id=self.other, amount=10, code=TransferCode.MEAL,
                     flags=(TransferFlag.PENDING,), timeout_s=3600),
        ])
        assert [r.status for r in results] == [TransferStatus.CREATED] * 2
        return self

    def transfer(self, debit: int, credit: int, amount: int) -> Transfer:
        return Transfer(id=uuid.uuid4(), ledger=self.ledger, debit_account_id=debit,
                        credit_account_id=credit, amount=amount, code=TransferCode.TOP_UP)

    async def prepared(self) -> Prepared:
        """A batch of a top-up, a payment and the hold's post, applied but not written."""
        batch = [
            self.transfer(self.bank, self.purse, 500),
            self.transfer(self.purse, self.other, 200),
            Transfer(id=uuid.uuid4(), ledger=self.ledger, pending_id=self.hold,
                     flags=(TransferFlag.POST_PENDING,)),
        ]
        p = await self.engine.store.prepare(self.ledger, batch)
        assert p is not None and p.args is not None
        return p


@pytest.fixture
async def book(engine: Engine, ids: Ids) -> Ledger:
    return await Ledger(engine, ids).setup()


def _one_call(plan: Plan, function: str, worker: Node) -> None:
    assert plan.tasks == 1 and plan.nodes == {worker}, plan.text
    assert f"{function}(" in plan.text, plan.text  # the task is the function call itself
    assert "Distributed Subplan" not in plan.text, plan.text


async def test_a_prepared_batch_commits_as_one_call_on_its_worker(
    engine: Engine, book: Ledger, conn: asyncpg.Connection
) -> None:
    assert engine.store.distributed
    worker = await worker_of(conn, book.ledger)
    p = await book.prepared()
    # past PostgreSQL's first five custom plans of the prepared statement: still one call
    for _ in range(7):
        plan = await explain(conn, COMMIT_PREPARED.call, *p.args, p.tip.last, p.after)
    _one_call(plan, COMMIT_PREPARED.function, worker)


async def test_the_locked_path_is_one_transaction_on_one_worker(
    engine: Engine, book: Ledger, conn: asyncpg.Connection
) -> None:
    worker = await worker_of(conn, book.ledger)
    p = await book.prepared()
    assert p.args is not None
    async with conn.transaction():
        # the batch's transaction: the clock, its reads, then the write, all on the worker
        reserve = await explain(conn, SQL_RESERVE, book.ledger, 0, 3)
        assert (reserve.tasks, reserve.nodes) == (1, {worker}), reserve.text
        ids = pg_array([uuid.uuid4(), book.hold])
        accounts = pg_array(sorted([book.bank, book.purse, book.other]))
        for sql, args in (
            (SQL_LOAD_LEDGER_TRANSFERS, (ids, book.ledger)),
            (SQL_LOCK_ACCOUNTS, (book.ledger, accounts)),
            (SQL_DUE_HOLDS, (book.ledger, 0, 100)),
        ):
            plan = await explain(conn, sql, *args)
            assert (plan.tasks, plan.nodes) == (1, {worker}), (sql, plan.text)
        for _ in range(7):
            plan = await explain(conn, WRITE_BATCH.call, *p.args)
        _one_call(plan, WRITE_BATCH.function, worker)


async def test_a_preparations_reads_go_to_the_ledgers_worker(
    book: Ledger, conn: asyncpg.Connection
) -> None:
    worker = await worker_of(conn, book.ledger)
    ids = pg_array([uuid.uuid4(), book.hold])
    for sql, args in (
        (SQL_PEEK_LEDGER_TRANSFERS, (ids, book.ledger)),
        (SQL_PEEK_ACCOUNTS, (book.ledger, pg_array([book.purse, book.other]))),
    ):
        plan = await explain(conn, sql, *args)
        assert (plan.tasks, plan.nodes) == (1, {worker}), (sql, plan.text)


async def test_the_campus_reads_go_to_the_ledgers_worker(
    book: Ledger, conn: asyncpg.Connection
) -> None:
    worker = await worker_of(conn, book.ledger)
    ledger, key = book.ledger, uuid.uuid4()
    for sql, args in (
        (SQL_CARD_REFS, (ledger, ["8800000000000001"])),
        (SQL_CARD_STATES, (ledger, ["8800000000000001"], [book.purse], [book.other], [key],
                           [uuid.uuid4()], [uuid.uuid4()], [True], [0], [2**62])),
        (SQL_PARTS, (ledger, [book.hold], [key])),
        (SQL_AFTER, (ledger, [book.purse], [key])),
        (SQL_TERMINALS, (ledger, ["T0000001"])),
    ):
        for _ in range(7):  # generic plans too
            plan = await explain(conn, sql, *args)
        assert (plan.tasks, plan.nodes) == (1, {worker}), (sql, plan.text)

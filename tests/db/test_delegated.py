"""The cluster's write path without a cluster: the batch writes as the functions Citus would
delegate (engine/db/delegated.py), defined on a plain PostgreSQL, and a store that reads one
ledger's transfers only and writes through them. The same batches, posted by this store and
by the ordinary one, leave the same balances, holds and audit chain. (The Citus suite,
tests/citus, runs the same on a real cluster; CI has none.)"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import pytest

from engine.db.delegated import PREFIX, Delegated
from engine.db.distribute import define
from engine.db.migrate import migrate
from engine.db.pool import create_pool
from engine.store import Store
from engine.writing import DELEGATED, SQL_WRITE_BATCH, WRITE_BATCH
from ledger.account import Account
from ledger.status import AccountStatus, TransferStatus
from ledger.transfer import Transfer
from ledger.types import AccountFlag, AccountKind, TransferCode, TransferFlag
from tests.databases import scratch_database

SQL_STATE = """
SELECT (SELECT array_agg((id, debits_posted, credits_posted, debits_pending, credits_pending)
                         ORDER BY id)::text FROM accounts WHERE ledger = $1),
       (SELECT array_agg((id, state, amount) ORDER BY id)::text FROM holds WHERE ledger = $1),
       (SELECT array_agg((id, amount, flags) ORDER BY timestamp)::text FROM transfers
        WHERE ledger = $1),
       (SELECT chain_head FROM ledgers WHERE ledger = $1)
"""


def test_a_function_is_named_by_its_statement_and_body() -> None:
    a = Delegated(name="write", sql="SELECT $1::int + $3::int, $2::text", steps=("SELECT 1",))
    assert a.arity == 3
    assert a.call == f"SELECT {a.function}($1, $2, $3)"
    assert a.function.startswith(PREFIX + "write_")
    # another text, another name: an engine never calls another version's function
    assert msgspec.structs.replace(a, sql=a.sql + " ").function != a.function
    assert msgspec.structs.replace(a, steps=("SELECT 2",)).function != a.function
    assert msgspec.structs.replace(a, guard="SELECT 1").function != a.function
    assert len({d.function for d in DELEGATED}) == len(DELEGATED)
    assert WRITE_BATCH.sql is SQL_WRITE_BATCH


@pytest.fixture
async def pool(admin_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    async with scratch_database(admin_dsn, prefix="onecard_delegated") as url:
        p = await create_pool(url, max_size=4)
        try:
            async with p.acquire() as conn:
                await migrate(conn)
                for d in DELEGATED:
                    assert (await define(conn, d)).startswith(d.function + "(")
            yield p
        finally:
            await p.close()


async def _book(store: Store, ledger: int) -> tuple[int, int, int]:
    bank, purse, shop = ledger * 10 + 1, ledger * 10 + 2, ledger * 10 + 3
    st = await store.create_accounts([
        Account(id=bank, ledger=ledger, kind=AccountKind.CLEARING, code=1),
        Account(id=purse, ledger=ledger, kind=AccountKind.PURSE, code=1,
                flags=(AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,)),
        Account(id=shop, ledger=ledger, kind=AccountKind.MERCHANT, code=1),
    ])
    assert st == [AccountStatus.CREATED] * 3
    return bank, purse, shop


async def _day(store: Store, ledger: int, ids: list[uuid.UUID]) -> list[TransferStatus]:
    """Top-up, payments, a hold posted in part, one refused, a retry: by both paths."""
    bank, purse, shop = await _book(store, ledger)

    def t(i: int, debit: int, credit: int, amount: int, **kw: object) -> Transfer:
        return Transfer(id=ids[i], ledger=ledger, debit_account_id=debit,
                        credit_account_id=credit, amount=amount, code=TransferCode.MEAL,
                        **kw)  # type: ignore[arg-type]

    first = [t(0, bank, purse, 1_000), t(1, purse, shop, 300),
             t(2, purse, shop, 200, flags=(TransferFlag.PENDING,), timeout_s=60)]
    outcome, _ = await store.post_locked(ledger, first)  # the locked path
    statuses = list(outcome.statuses)
    second = [t(3, purse, shop, 5_000),  # exceeds credits
              Transfer(id=ids[4], ledger=ledger, pending_id=ids[2], amount=150,
                       flags=(TransferFlag.POST_PENDING,)),
              t(1, purse, shop, 300)]  # the same payment again
    p = await store.prepare(ledger, second)  # the prepared path
    assert p is not None
    assert await store.commit_prepared(p)
    # one prepared on a clock that moves before it commits writes nothing at all
    stale = await store.prepare(ledger, [t(5, bank, purse, 1)])
    assert stale is not None
    await store.post_locked(ledger, [t(6, bank, purse, 2)])
    assert not await store.commit_prepared(stale)
    assert await store.get_transfer(ids[5]) is None
    return statuses + list(p.outcome.statuses)


async def test_the_delegated_path_writes_what_the_statement_writes(pool: asyncpg.Pool) -> None:
    ids = [uuid.uuid4() for _ in range(7)]
    plain = await _day(Store(pool), 31, ids)
    cluster = await _day(Store(pool, distributed=True), 32, [uuid.uuid4() for _ in ids])
    assert plain == cluster == [
        TransferStatus.CREATED, TransferStatus.CREATED, TransferStatus.CREATED,
        TransferStatus.EXCEEDS_CREDITS, TransferStatus.CREATED, TransferStatus.EXISTS]
    async with pool.acquire() as conn:
        a = await conn.fetchrow(SQL_STATE, 31)
        b = await conn.fetchrow(SQL_STATE, 32)
    assert a is not None and b is not None
    # the same money, holds and flags; the ids and the chain differ with the ledger
    assert a[0].replace("31", "32") == b[0]
    assert [x.split(",", 1)[1] for x in a[1].split("(")[1:]] == [
        x.split(",", 1)[1] for x in b[1].split("(")[1:]]


async def test_on_a_cluster_a_transfer_id_is_one_ledgers(pool: asyncpg.Pool) -> None:
    # the one answer that differs: the same id in another ledger is that ledger's transfer
    tid = uuid.uuid4()
    plain, cluster = Store(pool), Store(pool, distributed=True)
    bank, purse, _ = await _book(plain, 41)
    other_bank, other_purse, _ = await _book(plain, 42)
    one = Transfer(id=tid, ledger=41, debit_account_id=bank, credit_account_id=purse,
                   amount=5, code=TransferCode.TOP_UP)
    two = Transfer(id=tid, ledger=42, debit_account_id=other_bank,
                   credit_account_id=other_purse, amount=5, code=TransferCode.TOP_UP)
    assert (await plain.post_locked(41, [one]))[0].statuses == [
        TransferStatus.CREATED]
    [answer] = (await plain.post_locked(42, [two]))[0].statuses
    assert answer is TransferStatus.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID  # ledger 41's
    assert (await cluster.post_locked(42, [two]))[0].statuses == [
        TransferStatus.CREATED]

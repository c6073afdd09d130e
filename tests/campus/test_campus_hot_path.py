"""The campus hot path on a real PostgreSQL: shared (coalesced) reads instead of a round trip per
request, card states that are never stale, the remembered daily spending and when it is read
again, the per-holder locks, and the query plan of the daily-spending sum."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from engine.calendar import day_window_at, to_ns
from engine.campus import Campus, Card, HolderKind, HolderResult, Outcome, Replacement
from engine.campus.accounts import holder_account_ids
from engine.campus.locks import KeyedLocks
from engine.campus.reads import SQL_CARD_STATES
from engine.campus.spending import SpendMemory
from engine.db.coalesce import Connection
from engine.db.migrate import migrate
from engine.service import Engine
from ledger.status import TransferStatus
from ledger.transfer import StoredTransfer, Transfer
from ledger.types import TransferCode, TransferFlags
from tests.campus.test_campus import World, card_number, make_world
from tests.conftest import Ids
from tests.databases import scratch_database


def key() -> uuid.UUID:
    return uuid.uuid4()


# -- shared reads ----------------------------------------------------------------------------


async def test_concurrent_payments_share_their_reads(engine: Engine, ids: Ids) -> None:
    campus = Campus(engine)
    w = await make_world(engine, campus, ids)
    people = []
    for i in range(40):
        holder = f"P{i}-{uuid.uuid4().hex[:6]}"
        r = await campus.create_holder(holder_id=holder, ledger=w.ledger, name=holder,
                                       kind=HolderKind.STUDENT)
        assert isinstance(r, HolderResult)
        card = card_number()
        assert isinstance(await campus.create_card(card_no=card, holder_id=holder,
                                                   ledger=w.ledger), Card)
        purse, subsidy = holder_account_ids(w.ledger, holder)
        await w.top_up(5_000, purse)
        await w.post(Transfer(id=uuid.uuid4(), ledger=w.ledger, debit_account_id=w.fund,
                              credit_account_id=subsidy, amount=300, code=TransferCode.SUBSIDY))
        people.append((card, purse, subsidy))
    before = campus.statements
    # three payments per holder at once: 120 requests, each needing a card read, a card-state
    # read and a balances-after read
    amounts = [[100 + 7 * i + j for j in range(3)] for i in range(len(people))]
    results = await asyncio.gather(*(
        campus.purchase(w.pos, card_no=card, amount=a, key=key())
        for (card, _, _), mine in zip(people, amounts, strict=True) for a in mine
    ))
    assert {r.outcome for r in results} == {Outcome.APPROVED}
    statements = campus.statements - before
    assert statements <= 30, statements  # one round trip per request would be 360
    for (_, purse, subsidy), mine in zip(people, amounts, strict=True):
        spent = sum(mine)
        assert await w.available(subsidy) == max(0, 300 - spent)  # subsidy first, every time
        assert await w.available(purse) == 5_000 - max(0, spent - 300)
    assert await w.available(w.canteen) == sum(map(sum, amounts))


async def test_a_card_number_that_cannot_exist_costs_no_read(w: World) -> None:
    before = w.campus.statements
    for bad in ("12ab5678", "123", "1" * 20, "1234567\x00"):
        r = await w.campus.purchase(w.pos, card_no=bad, amount=100, key=key())
        assert r.outcome is Outcome.INVALID_CARD
    assert await w.campus.terminal("SHORT") is None
    assert w.campus.statements == before


@pytest.fixture
async def w(engine: Engine, ids: Ids) -> World:
    return await make_world(engine, Campus(engine), ids)


async def test_card_changes_take_effect_at_once_in_every_campus(w: World, engine: Engine) -> None:
    """The card -> purses mapping is cached, the card's state never is: a change made through
    another Campus (another process) is seen by the very next payment."""
    await w.top_up(10_000)
    other = Campus(engine)
    assert (await w.campus.purchase(w.pos, card_no=w.card, amount=100, key=key())).outcome \
        is Outcome.APPROVED  # cached now
    assert isinstance(await other.report_lost(w.card), Card)
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=100, key=key())
    assert r.outcome is Outcome.LOST_CARD
    assert (await w.campus.balance(w.pos, card_no=w.card)).outcome is Outcome.LOST_CARD
    assert isinstance(await other.card_found(w.card), Card)
    assert (await w.campus.purchase(w.pos, card_no=w.card, amount=100, key=key())).outcome \
        is Outcome.APPROVED
    new = card_number()
    assert isinstance(await other.replace_card(w.card, new), Replacement)
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=100, key=key())
    assert r.outcome is Outcome.CARD_NOT_ACTIVE
    r = await w.campus.purchase(w.pos, card_no=new, amount=100, key=key())
    assert r.outcome is Outcome.APPROVED and r.purses is not None and r.purses.cash == 9_700
    assert isinstance(await w.campus.close_card(new), Card)
    r = await w.campus.hold(w.water, card_no=new, amount=100, key=key())
    assert r.outcome is Outcome.CARD_NOT_ACTIVE
    assert await w.balances() == (9_700, 0)


# -- remembered daily spending ---------------------------------------------------------------


async def test_spending_elsewhere_counts_once_the_memory_ages_out(engine: Engine,
                                                                 ids: Ids) -> None:
    here = Campus(engine, spend_ttl_s=0.3)
    w = await make_world(engine, here, ids, daily_limit=1_000)
    await w.top_up(10_000)
    other = Engine(engine.dsn)  # another process: its own batcher, whose commits `here` misses
    await other.start(run_migrations=False)
    try:
        elsewhere = Campus(other)
        assert (await here.purchase(w.pos, card_no=w.card, amount=600, key=key())).outcome \
            is Outcome.APPROVED
        assert (await elsewhere.purchase(w.pos, card_no=w.card, amount=300, key=key())).outcome \
            is Outcome.APPROVED
    finally:
        await other.stop()
    await asyncio.sleep(0.35)
    r = await here.purchase(w.pos, card_no=w.card, amount=101, key=key())
    assert r.outcome is Outcome.DAILY_LIMIT_EXCEEDED  # 600 + 300 + 101
    assert (await here.purchase(w.pos, card_no=w.card, amount=100, key=key())).outcome \
        is Outcome.APPROVED  # exactly the limit
    assert await w.balances() == (9_000, 0)


async def test_a_split_made_stale_by_another_process_is_decided_again(
    engine: Engine, ids: Ids
) -> None:
    """Two processes paying for one holder at once both read the subsidy before either posts
    (the holder lock is per process): the one whose subsidy part the other spent first must
    not answer 51 while the cash purse can pay; it reads again and splits again."""
    here = Campus(engine)
    w = await make_world(engine, here, ids)
    await w.top_up(100_000)
    await w.grant(500)
    other = Engine(engine.dsn)
    await other.start(run_migrations=False)
    try:
        elsewhere = Campus(other)
        for _ in range(4):  # rounds of two at once: 500, 300, 100 (both read it), then cash
            both = await asyncio.gather(
                here.purchase(w.pos, card_no=w.card, amount=100, key=key()),
                elsewhere.purchase(w.pos, card_no=w.card, amount=100, key=key()),
            )
            assert [r.outcome for r in both] == [Outcome.APPROVED] * 2
    finally:
        await other.stop()
    assert await w.balances() == (100_000 - 300, 0)  # 800 spent: the 500 of subsidy first


async def test_completion_and_reversal_lower_the_remembered_spending(w_limit: World) -> None:
    w = w_limit
    h = key()
    assert (await w.campus.hold(w.water, card_no=w.card, amount=900, key=h)).outcome \
        is Outcome.APPROVED
    assert (await w.campus.purchase(w.pos, card_no=w.card, amount=200, key=key())).outcome \
        is Outcome.DAILY_LIMIT_EXCEEDED
    assert (await w.campus.complete(w.water, hold_key=h, amount=100, key=key())).outcome \
        is Outcome.APPROVED  # 100 spent now, not 900
    meal = key()
    assert (await w.campus.purchase(w.pos, card_no=w.card, amount=200, key=meal)).outcome \
        is Outcome.APPROVED
    assert (await w.campus.purchase(w.pos, card_no=w.card, amount=800, key=key())).outcome \
        is Outcome.DAILY_LIMIT_EXCEEDED  # 100 + 200 + 800
    assert (await w.campus.reverse(w.pos, original_key=meal, key=key())).outcome \
        is Outcome.APPROVED
    assert (await w.campus.purchase(w.pos, card_no=w.card, amount=800, key=key())).outcome \
        is Outcome.APPROVED  # 100 + 800
    assert await w.balances() == (10_000 - 900, 0)


@pytest.fixture
async def w_limit(engine: Engine, ids: Ids) -> World:
    w = await make_world(engine, Campus(engine), ids, daily_limit=1_000)
    await w.top_up(10_000)
    return w


async def test_a_hold_stops_counting_when_it_times_out(engine: Engine, ids: Ids) -> None:
    campus = Campus(engine, hold_timeout_s=1)
    w = await make_world(engine, campus, ids, daily_limit=1_000)
    await w.top_up(5_000)
    assert (await campus.hold(w.water, card_no=w.card, amount=800, key=key())).outcome \
        is Outcome.APPROVED
    assert (await campus.purchase(w.pos, card_no=w.card, amount=300, key=key())).outcome \
        is Outcome.DAILY_LIMIT_EXCEEDED
    for _ in range(50):  # the engine's expirer runs every 0.2 s in tests
        await asyncio.sleep(0.1)
        if await w.balances() == (5_000, 0):
            break
    assert await w.balances() == (5_000, 0)
    r = await campus.purchase(w.pos, card_no=w.card, amount=300, key=key())
    assert r.outcome is Outcome.APPROVED  # the remembered 800 went with the hold's timeout


def _stored(ledger: int, debit: int, amount: int, ts: int, *, code: int = 1, flags: int = 0,
            timeout_s: int = 0, credit: int = 5, user_data: str | None = None) -> StoredTransfer:
    return StoredTransfer(id=uuid.uuid4(), ledger=ledger, debit_account_id=debit,
                          credit_account_id=credit, amount=amount, pending_id=None, code=code,
                          flags=flags, timeout_s=timeout_s, user_data=user_data, timestamp=ts)


def _memory(ttl_s: float, max_holders: int) -> SpendMemory:
    m = SpendMemory(ttl_s=ttl_s, max_holders=max_holders, day_of=lambda ns: ns // 86_400 * 86_400)
    m.watching = True
    return m


def _read(m: SpendMemory, purse: int, spent: int, *, hold_expiry: int | None = None,
          as_of: int = 0) -> int:
    r = m.begin(1, purse, purse + 1)
    return m.finish(r, 0, spent, hold_expiry, as_of)


def test_spend_memory_read_racing_a_drop_is_not_stored() -> None:
    m = _memory(ttl_s=60, max_holders=10)
    assert m.lookup(1, 10, day=0) is None
    m.drop(1, 11)  # no record yet: nothing to forget
    assert _read(m, 10, 400) == 400
    assert m.lookup(1, 10, day=0) == 400
    m.drop(1, 10)
    assert m.lookup(1, 10, day=0) is None
    r = m.begin(1, 10, 11)
    m.drop(1, 11)  # e.g. a completion committed while the sum was being read
    assert m.finish(r, 0, 500, None, 0) == 500
    assert m.lookup(1, 10, day=0) is None
    assert _read(m, 10, 500) == 500
    assert m.lookup(1, 10, day=0) == 500
    m.committed(1, [_stored(1, 11, 25, ts=1)])  # the subsidy purse counts for the same holder
    m.committed(1, [_stored(1, 10, 7, ts=86_400)])  # another day: nothing remembered to add to
    m.committed(1, [_stored(1, 10, 9, ts=2, code=4)])  # not a spending code
    assert m.lookup(1, 10, day=0) == 525
    assert m.lookup(1, 10, day=86_400) is None
    m.drop(1, 99)  # an account of no holder
    assert m.lookup(1, 10, day=0) == 525


def test_spend_memory_counts_every_commit_once() -> None:
    m = _memory(ttl_s=60, max_holders=10)
    r = m.begin(1, 10, 11)
    # committed while the read was in flight: one the read saw (at or before its clock), one
    # it did not; each counts once
    m.committed(1, [_stored(1, 10, 100, ts=50), _stored(1, 11, 30, ts=70)])
    assert m.finish(r, 0, 100, None, 60) == 130
    m.committed(1, [_stored(1, 10, 40, ts=55)])  # reported late, in the read's sum already
    m.committed(1, [_stored(1, 10, 5, ts=80)])
    assert m.lookup(1, 10, day=0) == 135
    # a hold counts while it holds; its timeout ends what was remembered with it
    m.committed(1, [_stored(1, 10, 50, ts=81, flags=int(TransferFlags.PENDING), timeout_s=1)])
    assert m.lookup(1, 10, day=0) is None  # 81 ns + 1 s is long past
    assert _read(m, 10, 135, as_of=90) == 135
    m.committed(1, [_stored(1, 10, 50, ts=91, flags=int(TransferFlags.POST_PENDING))])
    assert m.lookup(1, 10, day=0) is None  # a hold settled: read again
    assert _read(m, 10, 135, as_of=95) == 135
    m.committed(99, [_stored(99, 10, 50, ts=96)])  # another ledger's account 10
    assert m.lookup(1, 10, day=0) == 135
    m.committed(1, [_stored(1, 77, 5, ts=97, code=7, credit=11)])  # a reversal into the purse
    assert m.lookup(1, 10, day=0) is None
    assert _read(m, 10, 130, as_of=97) == 130
    m.unknown(1)  # an outcome nobody reported: forget everything
    assert m.lookup(1, 10, day=0) is None


def test_spend_memory_ages_out_and_is_bounded() -> None:
    m = _memory(ttl_s=0, max_holders=2)
    _read(m, 10, 500)
    assert m.lookup(1, 10, day=0) is None  # a ttl of 0 remembers nothing
    m = _memory(ttl_s=60, max_holders=2)
    for purse in (10, 20, 30):
        _read(m, purse, purse)
    assert m.lookup(1, 30, day=0) == 30
    assert len(m._holders) == 4  # two holders, two keys each: the oldest went
    assert m.lookup(1, 10, day=0) is None
    # a hold's timeout in the past ends what was remembered with it
    _read(m, 20, 800, hold_expiry=1)
    assert m.lookup(1, 20, day=0) is None
    assert m.lookup(1, 30, day=0) == 30
    m.watching = False  # no batcher reports commits: nothing is remembered
    _read(m, 40, 5)
    assert m.lookup(1, 40, day=0) is None


# -- the daily-spending sum's plan -----------------------------------------------------------


async def test_daily_spending_is_summed_per_purse_never_over_the_ledger_day(
    admin_dsn: str,
) -> None:
    """A campus database whose transfers were never analyzed (a fresh ledger, a restore): the
    spending sum must still walk transfers_debit per purse (and transfers_credit for the
    reversal check). Given a timestamp range it could use, the planner took transfers_timestamp
    here and scanned the ledger's whole day for every limited payment."""
    async with scratch_database(admin_dsn, prefix="onecard_plan") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
            await conn.execute("ALTER TABLE transfers SET (autovacuum_enabled = false)")
            start, end = day_window_at(to_ns(datetime.now(UTC)), ZoneInfo("Asia/Shanghai"))
            await conn.execute(
                "INSERT INTO transfers (ledger, id, debit_account_id, credit_account_id, amount,"
                " code, flags, timestamp) SELECT 7, gen_random_uuid(), 1000 + g % 200, 5, 100,"
                " 1, 0, $1::bigint + g::bigint * 1000000 FROM generate_series(1, 30000) g",
                start,
            )
            plan = "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN " + SQL_CARD_STATES, 7, ["12345678"], [1001], [1002], [key()], [key()],
                [key()], [True], [start], [end]))
        finally:
            await conn.close()
    scans = {line.split(" on transfers ")[1].split()[0]: line
             for line in plan.splitlines() if " on transfers " in line}
    assert "using transfers_debit" in scans["t"], plan  # the day's spending
    assert "using transfers_credit" in scans["r"], plan  # and its reversals


# -- coalescer -------------------------------------------------------------------------------


async def test_a_batch_failure_reaches_the_payment_as_unavailable(w: World) -> None:
    await w.top_up(1_000)

    async def broken(conn: Connection, ledger: int, items: list[object]) -> list[object]:
        raise asyncpg.InterfaceError("connection lost")

    w.campus._s.reads._states._run = broken  # type: ignore[method-assign]
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=100, key=key())
    assert r.outcome is Outcome.UNAVAILABLE
    assert await w.balances() == (1_000, 0)


# -- per-holder locks ------------------------------------------------------------------------


async def test_keyed_locks_are_fifo_and_survive_cancellation() -> None:
    locks = KeyedLocks()
    order: list[int] = []
    gate = asyncio.Event()

    async def user(n: int, hold_s: float = 0.0) -> None:
        async with locks.hold("k"):
            order.append(n)
            if n == 0:
                await gate.wait()
            await asyncio.sleep(hold_s)

    first = asyncio.create_task(user(0))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(user(n)) for n in range(1, 5)]
    await asyncio.sleep(0)
    waiting[1].cancel()  # a queued waiter leaves: it is skipped
    gate.set()
    await asyncio.gather(first, waiting[0], waiting[2], waiting[3])
    assert order == [0, 1, 3, 4]
    assert len(locks) == 0  # nothing left behind
    # a waiter cancelled just as the key is handed to it passes the key on
    async with locks.hold("k"):
        late = asyncio.create_task(user(5))
        after = asyncio.create_task(user(6))
        await asyncio.sleep(0)
    late.cancel()  # the key was handed to `late` on exit; it has not run yet
    await asyncio.gather(late, after, return_exceptions=True)
    assert order[-1] == 6 and len(locks) == 0
    other = asyncio.create_task(user(7))  # other keys never wait
    async with locks.hold("j"):
        await other
    assert order[-1] == 7


async def test_a_retransmitted_limited_payment_is_not_counted_twice(w_limit: World) -> None:
    w = w_limit
    k = key()
    first = await w.campus.purchase(w.pos, card_no=w.card, amount=600, key=k)
    again = await w.campus.purchase(w.pos, card_no=w.card, amount=600, key=k)
    assert first.outcome is again.outcome is Outcome.APPROVED
    assert (await w.campus.purchase(w.pos, card_no=w.card, amount=400, key=key())).outcome \
        is Outcome.APPROVED  # 600 once + 400
    [st] = await w.post(Transfer(id=uuid.uuid4(), ledger=w.ledger, debit_account_id=w.bank,
                                 credit_account_id=w.purse, amount=1, code=4))
    assert st is TransferStatus.CREATED
    assert (await w.campus.purchase(w.pos, card_no=w.card, amount=1, key=key())).outcome \
        is Outcome.DAILY_LIMIT_EXCEEDED

"""Stateful property: the real store on PostgreSQL behaves exactly like the reference model.

A Hypothesis state machine runs random sequences of account batches, transfer batches (with
duplicates, conflicting duplicates, linked chains that fail, holds, partial posts, voids,
forced posts), pipelined pairs of prepared batches with the ledger changed behind them,
account freezes/closures and waits for hold expiry against both
``engine.store.Store`` and ``tests.ledger.model.Model``. After every step it requires the same
statuses and timestamps, and reads back from PostgreSQL: every account's four fields (the
accounts table and ``Store.get_account``), every stored transfer and hold state, double entry
per ledger, and that each account's live fields equal the sums of its transfers and holds.

Timestamps come from the engine's real clock. The model is evaluated at the batch's first
timestamp, recovered from the ledger's clock row right after the batch (only this test writes
to its ledgers, so ``last_timestamp - len(batch)`` is exact). The store expires only the holds
a batch loads (its ids and pending_ids) unless ``expire_due`` asks it to sweep the due ones;
the model is told the same scope.

Hypothesis drives a synchronous state machine, so the engine runs on an event loop owned by
this test in a thread of its own (the session loop is busy running pytest).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, ClassVar, Final, TypeVar
from uuid import UUID

import asyncpg
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from msgspec.structs import replace

from engine.service import Engine
from engine.store import SQL_SET_FLAGS, Store
from engine.writing import Prepared, Tip
from ledger.account import Account
from ledger.apply import BatchOutcome
from ledger.status import TransferStatus
from ledger.transfer import Transfer
from ledger.types import (
    AccountFlag,
    AccountFlags,
    AccountKind,
    TransferFlag,
    TransferFlags,
    TransferState,
    account_flag_names,
)
from tests.conftest import Ids
from tests.ledger.model import MAccount, Model
from tests.ledger.test_batch_equivalence import FLAG_SETS, TransferGen, chance

T = TypeVar("T")
NS: Final = 1_000_000_000
LOOP_CALL_TIMEOUT_S: Final = 60.0
MAX_SLEEPS_PER_RUN: Final = 1  # each costs up to HOLD_TIMEOUT_S of wall clock
HOLD_TIMEOUT_S: Final = 1
SLEEP_MARGIN_S: Final = 0.02
FUNDING: Final = 5_000

SQL_CLOCK = "SELECT last_timestamp FROM ledgers WHERE ledger = $1"
SQL_ACCOUNT_ROWS = """
SELECT id, ledger, flags, debits_posted, credits_posted, debits_pending, credits_pending
FROM accounts WHERE ledger = ANY($1::int[])
"""
SQL_TRANSFER_ROWS = """
SELECT id, ledger, debit_account_id, credit_account_id, amount, code, flags, pending_id,
       timeout_s, user_data, timestamp
FROM transfers WHERE ledger = $1
"""
SQL_HOLD_ROWS = "SELECT id, state, resolved_at FROM holds WHERE ledger = $1"
SQL_ZERO_SUM = """
SELECT coalesce(sum(debits_posted), 0) - coalesce(sum(credits_posted), 0) AS posted,
       coalesce(sum(debits_pending), 0) - coalesce(sum(credits_pending), 0) AS pending
FROM accounts WHERE ledger = $1
"""
# Live fields recomputed from the facts: posted from plain and post_pending transfers (a
# pending transfer posts nothing, a void moves nothing), pending from holds still pending.
SQL_FIELDS_FROM_FACTS = """
SELECT a.id,
       a.debits_posted - coalesce((SELECT sum(t.amount) FROM transfers t
            WHERE t.ledger = a.ledger AND t.debit_account_id = a.id AND t.flags & $2 = 0), 0)
         AS dp,
       a.credits_posted - coalesce((SELECT sum(t.amount) FROM transfers t
            WHERE t.ledger = a.ledger AND t.credit_account_id = a.id AND t.flags & $2 = 0), 0)
         AS cp,
       a.debits_pending - coalesce((SELECT sum(h.amount) FROM holds h
            WHERE h.ledger = a.ledger AND h.debit_account_id = a.id AND h.state = 'pending'), 0)
         AS dq,
       a.credits_pending - coalesce((SELECT sum(h.amount) FROM holds h
            WHERE h.ledger = a.ledger AND h.credit_account_id = a.id AND h.state = 'pending'), 0)
         AS cq
FROM accounts a WHERE a.ledger = $1
"""
_NOT_POSTING = int(TransferFlags.PENDING | TransferFlags.VOID_PENDING)


class LoopThread:
    """An event loop running in its own thread; ``run`` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(LOOP_CALL_TIMEOUT_S)

    def close(self) -> None:
        """Stop the loop and join the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class StoreVersusModel(RuleBasedStateMachine):
    """One run: two fresh ledgers, fresh accounts, fresh transfer ids."""

    # set by the test before running the machine
    engine: Engine
    runner: LoopThread
    ids: Ids
    seen: ClassVar[set[TransferStatus]] = set()  # over all runs: guards the generators

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.ledger = self.ids.ledger()
        self.other = self.ids.ledger()
        self.unknown = self.ids.account()  # never created
        self.sleeps = 0
        # transfer ids: a random prefix per run, the generator's counter in the low 32 bits
        self._uid_base = uuid.uuid4().int & ~0xFFFF_FFFF
        self.gen: TransferGen | None = None
        # the state the last batch left, and the one before (a stale base for a preparation)
        self.tip: Tip | None = None
        self.old_tip: Tip | None = None
        # flag changes made in SQL behind prepared batches, not yet told to the model
        self.flag_changes: list[tuple[int, int, bool]] = []

    @property
    def store(self) -> Store:
        return self.engine.store

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def _gen(self, data: st.DataObject) -> TransferGen:
        assert self.gen is not None
        self.gen.draw = data.draw
        return self.gen

    # -- steps ---------------------------------------------------------------------------------

    @initialize(data=st.data())
    def open_accounts(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(3, 5), label="accounts")
        mine = self.ids.accounts(n)
        batch = [Account(id=mine[0], ledger=self.ledger, kind=AccountKind.CLEARING, code=4)]
        for aid in mine[1:]:
            batch.append(Account(
                id=aid,
                ledger=self.ledger,
                kind=data.draw(st.sampled_from(list(AccountKind))),
                code=data.draw(st.integers(1, 3)),
                flags=data.draw(st.sampled_from(FLAG_SETS[:2] * 3 + FLAG_SETS)),
            ))
        foreign = self.ids.account()
        batch.append(Account(id=foreign, ledger=self.other, kind=AccountKind.MERCHANT, code=1))
        self._create(batch)
        base = self._uid_base
        self.gen = TransferGen(
            data.draw,
            mine,
            ledger=self.ledger,
            foreign=[foreign],
            other_ledger=self.other,
            uid=lambda k: UUID(int=base | k),
            timeouts=(HOLD_TIMEOUT_S, HOLD_TIMEOUT_S, 3600),
            mixed_ledgers=False,  # the batcher hands the store one ledger's transfers only
            unknown=self.unknown,
        )
        # top up every account from the clearing account, so that purses can spend
        funding = [
            Transfer(id=uuid.uuid4(), ledger=self.ledger, debit_account_id=mine[0],
                     credit_account_id=aid, amount=FUNDING, code=4)
            for aid in mine[1:]
        ]
        self._post(funding, [], sweep=False)

    def _create(self, batch: list[Account]) -> None:
        got = self.run(self.store.create_accounts(batch))
        want = self.model.create_accounts(batch)
        assert got == want, (batch, got, want)

    @rule(data=st.data())
    def create_accounts(self, data: st.DataObject) -> None:
        gen = self._gen(data)
        known = sorted(self.model.state.accounts.values(), key=lambda a: a.id)
        batch: list[Account] = []
        for _ in range(data.draw(st.integers(1, 4))):
            what = data.draw(st.sampled_from(["dup", "conflict", "new", "zero", "bad"]))
            a = data.draw(st.sampled_from(known))
            same = _as_account(a)
            if what == "dup":
                batch.append(replace(same, holder_id="metadata is not compared"))
            elif what == "conflict":
                field = data.draw(st.sampled_from(["kind", "ledger", "code", "flags"]))
                if field == "kind":
                    batch.append(replace(
                        same, kind=next(k for k in AccountKind if k != a.kind)))
                elif field == "ledger":
                    batch.append(replace(
                        same, ledger=self.other if a.ledger == self.ledger else self.ledger))
                elif field == "code":
                    batch.append(replace(same, code=a.code + 1))
                else:
                    batch.append(replace(same, flags=(*same.flags, AccountFlag.CLOSED)
                                                 if AccountFlag.CLOSED not in same.flags
                                                 else ()))
            elif what == "new":
                aid = self.ids.account()
                batch.append(Account(
                    id=aid, ledger=self.ledger, kind=AccountKind.PURSE, code=1,
                    flags=data.draw(st.sampled_from(FLAG_SETS)),
                ))
                gen.mine.append(aid)
            elif what == "zero":
                batch.append(Account(id=0, ledger=self.ledger, kind=AccountKind.PURSE))
            else:
                batch.append(data.draw(st.sampled_from([
                    Account(id=self.unknown, ledger=0, kind=AccountKind.PURSE),
                    Account(id=self.unknown, ledger=self.ledger, kind=AccountKind.PURSE, flags=(
                        AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,
                        AccountFlag.CREDITS_MUST_NOT_EXCEED_DEBITS,
                    )),
                ])))
        self._create(batch)

    @rule(data=st.data())
    def post_transfers(self, data: st.DataObject) -> None:
        gen = self._gen(data)
        n = data.draw(st.integers(1, 8), label="transfers")
        batch = gen.many(n)
        ends = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=3))) if n > 1 else []
        sweep = chance(data.draw, 25)
        self._post(batch, ends, sweep=sweep)

    @rule(data=st.data())
    def retry_a_whole_batch(self, data: st.DataObject) -> None:
        """A client retrying the transfers it sent last, as one request: what was recorded
        answers ``exists`` with its original timestamp, what failed is evaluated again."""
        gen = self._gen(data)
        if not gen.seen:
            return
        k = data.draw(st.integers(1, min(6, len(gen.seen))))
        batch = gen.seen[-k:]
        self._post(batch, [], sweep=False)

    @rule(data=st.data())
    def freeze_or_close(self, data: st.DataObject) -> None:
        """Report a card lost (freeze) or close an account, or undo it, as the campus does."""
        gen = self._gen(data)
        aid = data.draw(st.sampled_from(gen.mine))
        bit = AccountFlags.CLOSED if chance(data.draw, 25) else AccountFlags.FROZEN
        add = not chance(data.draw, 40)
        a = self.model.state.accounts[aid]
        flags = self.run(self.store.set_account_flags(
            self.ledger, aid, add=int(bit) if add else 0, remove=0 if add else int(bit)))
        a.flags = (a.flags | bit) if add else (a.flags & ~bit)
        assert flags == a.flags

    def _due_later(self) -> list[int]:
        now = time.time_ns()
        return [d for d in self.model.pending_deadlines() if d > now and d - now <= 2 * NS]

    @precondition(lambda self: self.sleeps < MAX_SLEEPS_PER_RUN and self._due_later())
    @rule(data=st.data())
    def wait_for_expiry(self, data: st.DataObject) -> None:
        """Sleep past the nearest hold deadline, then either run the expirer's sweep or go on
        (a later batch that loads the hold expires it first)."""
        due = self._due_later()
        self.sleeps += 1
        event("slept until a hold expired")
        time.sleep(max(0, min(due) - time.time_ns()) / NS + SLEEP_MARGIN_S)
        if data.draw(st.booleans(), label="sweep"):
            self._post([], [], sweep=True)
            assert min(due) not in self.model.pending_deadlines()
        else:
            # the terminal completes the hold too late: loading it expires it first
            late = next(h for h in self.model.state.holds.values()
                        if h.expires_at == min(due) and h.state is TransferState.PENDING)
            gen = self._gen(data)
            flag = TransferFlag.POST_PENDING if data.draw(st.booleans()) else (
                TransferFlag.VOID_PENDING)
            completion = Transfer(id=gen.uid(), ledger=self.ledger, flags=(flag,),
                                  pending_id=late.id)
            self._post([completion, *gen.many(data.draw(st.integers(0, 3)))], [], sweep=False)
            assert self.model.state.holds[late.id].state is TransferState.EXPIRED

    @rule(data=st.data())
    def post_two_prepared(self, data: st.DataObject) -> None:
        """The batcher's pipeline: the second batch is prepared on the state the first leaves
        before the first commits. Something may change the ledger before either commit:

        - a batch through the locked path moves the clock, so the prepared batch must be
          refused and go down the locked path after it;
        - a flag changed straight in SQL does not (flags change without the clock): the
          prepared batches read the flags before it, so they are ordered before it.

        Whatever happens, the answers are those of one batch after the other in that order.
        A preparation on an older tip (the ledger moved since) is given up at once."""
        gen = self._gen(data)
        b1 = gen.many(data.draw(st.integers(1, 6), label="first"))
        b2 = gen.many(data.draw(st.integers(1, 6), label="second"))
        stale = self.old_tip is not None and chance(data.draw, 15)
        tip = self.old_tip if stale else self.tip
        p1 = self.run(self.store.prepare(self.ledger, b1, tip=tip))
        if stale:
            # the reads show the clock past the tip: nothing is prepared on it
            assert p1 is None
            event("a preparation on a stale tip was given up")
            self._post(b1, [], sweep=False)
            self._post(b2, [], sweep=False)
            return
        assert p1 is not None, "the ledger has a clock and nothing moved it"
        p2 = self.run(self.store.prepare(self.ledger, b2, tip=p1.tip))
        assert p2 is not None
        where = data.draw(st.sampled_from(["nowhere", "before first", "between"]))
        moved = where == "before first" and self._interfere(data, b1)
        held = self.run(self.store.commit_prepared(p1))
        assert held == (not moved), where
        event(f"prepared first batch {'held' if held else 'missed'}")
        self._settle(p1, b1, held)
        moved2 = where == "between" and self._interfere(data, b2)
        # the batcher never commits a preparation whose base did not commit as prepared
        held2 = held and self.run(self.store.commit_prepared(p2))
        if held:
            assert held2 == (not moved2), where
        self._settle(p2, b2, held2)
        self._flags_changed()

    def _interfere(self, data: st.DataObject, batch: list[Transfer]) -> bool:
        """Change the ledger behind a prepared batch: freeze or unfreeze an account the batch
        debits straight in SQL (as an operator would), or post a batch on the locked path.
        Whether the clock moved."""
        gen = self._gen(data)
        mine = set(gen.mine)
        debited = [t.debit_account_id for t in batch if t.debit_account_id in mine]
        if debited and chance(data.draw, 60):
            aid = data.draw(st.sampled_from(debited))
            bit = int(AccountFlags.FROZEN)
            now = self.model.state.accounts[aid].flags  # as the database has them
            for aid2, bit2, add2 in self.flag_changes:
                if aid2 == aid:
                    now = (now | bit2) if add2 else (now & ~bit2)
            add = not now & bit
            flags = self.run(self.store.pool.fetchval(
                SQL_SET_FLAGS, self.ledger, aid, bit if add else 0, 0 if add else bit))
            assert flags == ((now | bit) if add else (now & ~bit))
            # ordered after the batches prepared before it, unless they go the locked path
            self.flag_changes.append((aid, bit, add))
            event("a flag changed in SQL behind a prepared batch")
            return False
        self._post(gen.many(data.draw(st.integers(1, 3))), [], sweep=False)
        event("a batch committed behind a prepared batch")
        return True

    def _flags_changed(self) -> None:
        """Apply to the model the flag changes made since the last batch it was told about."""
        for aid, bit, add in self.flag_changes:
            a = self.model.state.accounts[aid]
            a.flags = (a.flags | bit) if add else (a.flags & ~bit)
        self.flag_changes.clear()

    def _settle(self, p: Prepared, batch: list[Transfer], held: bool) -> None:
        """Check a prepared batch's answers if it held, else post it on the locked path."""
        if not held:
            self._post(batch, [], sweep=False)
            return
        self._check(batch, [], p.outcome, p.tip.last - len(batch), sweep=False)
        self.old_tip, self.tip = self.tip, p.tip

    def _post(self, batch: list[Transfer], ends: list[int], *, sweep: bool) -> None:
        self._flags_changed()  # the locked path reads the flags as they are now
        out, tip = self.run(self.store.post_locked(
            self.ledger, batch, request_ends=ends, expire_due=sweep))
        last = self.run(self.store.pool.fetchval(SQL_CLOCK, self.ledger))
        assert tip.last == last
        self.old_tip, self.tip = self.tip, tip
        self._check(batch, ends, out, last - len(batch), sweep=sweep)

    def _check(
        self, batch: list[Transfer], ends: list[int], out: BatchOutcome, first: int, *,
        sweep: bool,
    ) -> None:
        loaded = {t.id for t in batch} | {t.pending_id for t in batch if t.pending_id}
        want, stamps = self.model.apply_batch(
            batch, first, request_ends=ends, expire_only=None if sweep else loaded)
        assert out.statuses == want, (batch, ends, out.statuses, want)
        assert out.timestamps == stamps
        assert sorted(h.id for h in out.expired) == sorted(self.model.last_expired)
        assert not {TransferStatus.DAILY_LIMIT_EXCEEDED, TransferStatus.CARD_NOT_ACTIVE} & set(
            out.statuses)
        self.seen.update(out.statuses)
        for s in set(out.statuses):
            event(f"status {s}")
        if out.expired:
            event("holds expired" + (" by the sweep" if sweep else " on load"))

    # -- invariants: read back from PostgreSQL -------------------------------------------------

    @invariant()
    def database_matches_model(self) -> None:
        if self.gen is None:
            return
        self.run(self._check_database())

    async def _check_database(self) -> None:
        pool = self.store.pool
        rows = await pool.fetch(SQL_ACCOUNT_ROWS, [self.ledger, self.other])
        got = {r["id"]: _fields(r) for r in rows}
        want = {
            a.id: a.fields()
            for a in self.model.state.accounts.values()
            if a.ledger in (self.ledger, self.other)
        }
        assert got == want
        assert {r["id"]: r["flags"] for r in rows} == {
            a.id: a.flags for a in self.model.state.accounts.values()
            if a.ledger in (self.ledger, self.other)
        }
        for aid, fields in want.items():
            rec = await self.store.get_account(aid)
            assert rec is not None
            s = rec.state
            assert (s.debits_posted, s.credits_posted, s.debits_pending, s.credits_pending) == (
                fields
            )
        transfers = {
            r["id"]: (r["ledger"], r["debit_account_id"], r["credit_account_id"], r["amount"],
                      r["code"], r["flags"], r["pending_id"], r["timeout_s"], r["user_data"],
                      r["timestamp"])
            for r in await pool.fetch(SQL_TRANSFER_ROWS, self.ledger)
        }
        assert transfers == self.model.transfer_rows()
        holds = {
            r["id"]: (TransferState(r["state"]), r["resolved_at"])
            for r in await pool.fetch(SQL_HOLD_ROWS, self.ledger)
        }
        assert holds == self.model.hold_states()
        for ledger in (self.ledger, self.other):
            z = await pool.fetchrow(SQL_ZERO_SUM, ledger)
            assert z is not None
            assert (z["posted"], z["pending"]) == (0, 0), ledger
            assert self.model.zero_sum(ledger) == (0, 0)
            for r in await pool.fetch(SQL_FIELDS_FROM_FACTS, ledger, _NOT_POSTING):
                assert (r["dp"], r["cp"], r["dq"], r["cq"]) == (0, 0, 0, 0), r["id"]


def _fields(r: asyncpg.Record) -> tuple[int, int, int, int]:
    return (r["debits_posted"], r["credits_posted"], r["debits_pending"], r["credits_pending"])


def _as_account(a: MAccount) -> Account:
    return Account(id=a.id, ledger=a.ledger, kind=a.kind, code=a.code,
                   flags=account_flag_names(a.flags))


@pytest.fixture
def loop_engine(dsn: str) -> Iterator[tuple[LoopThread, Engine]]:
    """An engine started on a loop owned by this test (its expirer parked: the machine runs
    expiry itself, so nothing changes the ledger behind the model's back)."""
    runner = LoopThread()
    engine = Engine(dsn, expirer_interval_s=3600)
    runner.run(engine.start(run_migrations=False))
    runner.run(asyncio.sleep(0.1))  # let the expirer's first pass finish before any ledger
    try:
        yield runner, engine
    finally:
        runner.run(engine.stop())
        runner.close()


def test_store_matches_model(loop_engine: tuple[LoopThread, Engine], ids: Ids) -> None:
    runner, engine = loop_engine
    StoreVersusModel.runner = runner
    StoreVersusModel.engine = engine
    StoreVersusModel.ids = ids
    run_state_machine_as_test(
        StoreVersusModel,
        settings=settings(
            max_examples=40,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
    S = TransferStatus
    assert {S.CREATED, S.EXISTS, S.LINKED_EVENT_FAILED, S.PENDING_TRANSFER_NOT_FOUND} <= (
        StoreVersusModel.seen
    )

"""``onecard verify``: a ledger written by the engine verifies; every kind of tampering done
behind the engine's back through SQL (the append-only trigger disabled deliberately: that is
the point) is detected and the bad transfer or account is named. Each tamper is undone after,
and the ledger verifies again."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import asyncpg
import msgspec
import pytest

from engine import limits
from engine.finance.verify import verify
from engine.finance.verify_report import Rank, Report
from engine.service import Engine
from ledger.account import Account
from ledger.transfer import Transfer
from ledger.types import AccountFlag, AccountKind, TransferFlag
from tests.conftest import Ids

ROOT: Final = Path(__file__).resolve().parents[2]
CLI: Final = "import sys; from engine.cli import main; sys.exit(main())"
POLL_S: Final = 6.0


class Campus(msgspec.Struct, frozen=True):
    """A small ledger with every kind of transfer, written through the engine."""

    ledger: int
    bank: int
    purse: int
    canteen: int
    water: int
    top_up: uuid.UUID
    meal1: uuid.UUID
    meal2: uuid.UUID
    settled: uuid.UUID  # the hold that was posted
    post: uuid.UUID
    voided: uuid.UUID  # the hold that was voided
    void: uuid.UUID
    expired: uuid.UUID  # the hold that timed out
    open_hold: uuid.UUID
    multi: tuple[uuid.UUID, ...]  # one batch of three
    gap_batch: tuple[uuid.UUID, uuid.UUID]  # one batch with a failed transfer between them
    first_snapshot: int


def _t(ledger: int, d: int, c: int, amount: int, code: int, **kw: Any) -> Transfer:
    return Transfer(
        id=uuid.uuid4(), ledger=ledger, debit_account_id=d, credit_account_id=c, amount=amount,
        code=code, **kw,
    )


async def _one(engine: Engine, t: Transfer) -> uuid.UUID:
    (r,) = await engine.batcher.submit([t])
    assert str(r.status) == "created", r
    return t.id


@pytest.fixture(scope="module")
async def campus(engine: Engine) -> Campus:
    ids = Ids()
    ledger = 800_000 + ids.ledger()
    bank, purse, canteen, water = (7_000_000_000 + ledger * 10 + i for i in range(4))
    dmnec = (AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,)
    st = await engine.store.create_accounts([
        Account(id=bank, ledger=ledger, kind=AccountKind.CLEARING, code=1),
        Account(id=purse, ledger=ledger, kind=AccountKind.PURSE, code=1, flags=dmnec),
        Account(id=canteen, ledger=ledger, kind=AccountKind.MERCHANT, code=1),
        Account(id=water, ledger=ledger, kind=AccountKind.UTILITY, code=2),
    ])
    assert {str(s) for s in st} == {"created"}
    pend = (TransferFlag.PENDING,)
    top_up = await _one(engine, _t(ledger, bank, purse, 10_000, 4, user_data="wx-1"))
    meal1 = await _one(engine, _t(ledger, purse, canteen, 1_250, 1))
    first_snapshot, _ = await engine.store.snapshot(ledger)
    meal2 = await _one(engine, _t(ledger, purse, canteen, 700, 1))
    settled = await _one(engine, _t(ledger, purse, water, 500, 2, flags=pend, timeout_s=600))
    post = await _one(engine, Transfer(id=uuid.uuid4(), ledger=ledger, pending_id=settled,
                                       amount=320, flags=(TransferFlag.POST_PENDING,)))
    voided = await _one(engine, _t(ledger, purse, water, 200, 2, flags=pend))
    void = await _one(engine, Transfer(id=uuid.uuid4(), ledger=ledger, pending_id=voided,
                                       flags=(TransferFlag.VOID_PENDING,)))
    expired = await _one(engine, _t(ledger, purse, water, 100, 2, flags=pend, timeout_s=1))
    multi = [_t(ledger, purse, canteen, 100, 1), _t(ledger, purse, canteen, 200, 1),
             _t(ledger, canteen, purse, 50, 6)]
    assert {str(r.status) for r in await engine.batcher.submit(multi)} == {"created"}
    gap = [_t(ledger, purse, canteen, 10, 1), _t(ledger, purse, canteen, 10**9, 1),
           _t(ledger, purse, canteen, 20, 1)]
    res = await engine.batcher.submit(gap)
    assert [str(r.status) for r in res] == ["created", "exceeds_credits", "created"]
    open_hold = await _one(engine, _t(ledger, purse, water, 300, 2, flags=pend))
    async with asyncio.timeout(POLL_S):
        while await _hold_state(engine, ledger, expired) != "expired":  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    await engine.store.snapshot(ledger)
    return Campus(
        ledger=ledger, bank=bank, purse=purse, canteen=canteen, water=water, top_up=top_up,
        meal1=meal1, meal2=meal2, settled=settled, post=post, voided=voided, void=void,
        expired=expired, open_hold=open_hold, multi=tuple(t.id for t in multi),
        gap_batch=(gap[0].id, gap[2].id), first_snapshot=first_snapshot,
    )


async def _hold_state(engine: Engine, ledger: int, hold: uuid.UUID) -> str | None:
    async with engine.store.pool.acquire() as conn:
        s: str | None = await conn.fetchval(
            "SELECT state FROM holds WHERE ledger = $1 AND id = $2", ledger, hold
        )
    return s


@contextlib.asynccontextmanager
async def tampering(engine: Engine) -> AsyncIterator[asyncpg.Connection]:
    """A connection with triggers off: the append-only guard of transfers no longer fires."""
    async with engine.store.pool.acquire() as conn:
        await conn.execute("SET session_replication_role = replica")
        try:
            yield conn
        finally:
            await conn.execute("SET session_replication_role = DEFAULT")


async def _verify(engine: Engine, c: Campus) -> Report:
    return await verify(engine.store.pool, ledgers=[c.ledger])


async def _first(engine: Engine, c: Campus) -> tuple[Rank, str, str]:
    report = await _verify(engine, c)
    first = report.first()
    assert first is not None, "tampering went unnoticed"
    return first.rank, first.subject, first.detail


async def test_a_ledger_written_by_the_engine_verifies(engine: Engine, campus: Campus) -> None:
    report = await _verify(engine, campus)
    assert report.ok, [str(p) for p in report.ordered()]
    # 9 requests of one transfer, one of three, one of three with a failure; a snapshot
    # mid-way and one after the expiry
    assert (report.ledgers, report.transfers, report.snapshots, report.accounts) == (1, 14, 2, 4)
    assert report.expired_holds == 1
    assert report.batches == 11  # one audit batch per request


async def test_small_cursor_chunks_give_the_same_verdict(
    engine: Engine, campus: Campus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "STREAM_CHUNK_ROWS", 2)
    report = await _verify(engine, campus)
    assert report.ok and report.transfers == 14 and report.expired_holds == 1


async def test_a_changed_amount_names_the_transfer(engine: Engine, campus: Campus) -> None:
    async with tampering(engine) as conn:
        await conn.execute("UPDATE transfers SET amount = amount + 1 WHERE id = $1", campus.meal2)
        try:
            rank, subject, detail = await _first(engine, campus)
            report = await _verify(engine, campus)
        finally:
            await conn.execute("UPDATE transfers SET amount = amount - 1 WHERE id = $1",
                               campus.meal2)
    assert (rank, subject) == (Rank.CHAIN, f"transfer {campus.meal2}")
    assert "changed after commit" in detail
    # the replay now disagrees with both accounts' live fields, and the later snapshot
    named = {p.subject for p in report.problems}
    assert {f"account {campus.purse}", f"account {campus.canteen}"} <= named
    assert (await _verify(engine, campus)).ok


async def test_a_changed_row_in_a_batch_of_several_is_named(
    engine: Engine, campus: Campus
) -> None:
    target = campus.multi[1]
    async with tampering(engine) as conn:
        await conn.execute("UPDATE transfers SET amount = 201 WHERE id = $1", target)
        try:
            rank, subject, detail = await _first(engine, campus)
        finally:
            await conn.execute("UPDATE transfers SET amount = 200 WHERE id = $1", target)
        # a change that moves no money: the batch is named, with the row among the suspects
        await conn.execute("UPDATE transfers SET user_data = 'x' WHERE id = $1", target)
        try:
            rank2, subject2, detail2 = await _first(engine, campus)
        finally:
            await conn.execute("UPDATE transfers SET user_data = NULL WHERE id = $1", target)
    assert (rank, subject) == (Rank.CHAIN, f"transfer {target}")
    assert "changed after commit: amount 200 became 201" in detail
    assert rank2 is Rank.CHAIN and subject2.startswith("audit batch ")
    assert str(target) in detail2
    assert (await _verify(engine, campus)).ok


async def test_a_deleted_row_is_detected(engine: Engine, campus: Campus) -> None:
    async with tampering(engine) as conn:
        row = await conn.fetchrow("SELECT * FROM transfers WHERE id = $1", campus.meal1)
        assert row is not None
        await conn.execute("DELETE FROM transfers WHERE id = $1", campus.meal1)
        try:
            rank, subject, detail = await _first(engine, campus)
            report = await _verify(engine, campus)
        finally:
            cols = list(row.keys())
            await conn.execute(
                f"INSERT INTO transfers ({', '.join(cols)}) "
                f"VALUES ({', '.join(f'${i + 1}' for i in range(len(cols)))})",
                *row.values(),
            )
    assert rank is Rank.CHAIN
    assert subject.startswith(f"transfer at timestamp {row['timestamp']} ")
    assert "deleted" in detail
    assert f"account {campus.canteen}" in {p.subject for p in report.problems}
    assert (await _verify(engine, campus)).ok


async def test_an_inserted_row_is_named(engine: Engine, campus: Campus) -> None:
    new = uuid.uuid4()
    async with tampering(engine) as conn:
        last = await conn.fetchval(
            "SELECT last_timestamp FROM ledgers WHERE ledger = $1", campus.ledger
        )
        await conn.execute(
            "INSERT INTO transfers (ledger, id, debit_account_id, credit_account_id, amount, "
            "code, flags, timestamp) VALUES ($1, $2, $3, $4, 999, 1, 0, $5)",
            campus.ledger, new, campus.purse, campus.canteen, last + 1_000,
        )
        try:
            rank, subject, detail = await _first(engine, campus)
        finally:
            await conn.execute("DELETE FROM transfers WHERE id = $1", new)
    assert (rank, subject) == (Rank.CHAIN, f"transfer {new}")
    assert "no audit batch" in detail
    assert (await _verify(engine, campus)).ok


async def test_a_row_slipped_into_a_batch_is_named(engine: Engine, campus: Campus) -> None:
    new = uuid.uuid4()
    async with tampering(engine) as conn:
        a, b = [
            await conn.fetchval("SELECT timestamp FROM transfers WHERE id = $1", x)
            for x in campus.gap_batch
        ]
        assert b - a == 2  # the failed transfer's slot between them is free
        await conn.execute(
            "INSERT INTO transfers (ledger, id, debit_account_id, credit_account_id, amount, "
            "code, flags, timestamp) VALUES ($1, $2, $3, $4, 5, 1, 0, $5)",
            campus.ledger, new, campus.purse, campus.canteen, a + 1,
        )
        try:
            rank, subject, detail = await _first(engine, campus)
        finally:
            await conn.execute("DELETE FROM transfers WHERE id = $1", new)
    assert (rank, subject) == (Rank.CHAIN, f"transfer {new}")
    assert "inserted outside the engine" in detail
    assert (await _verify(engine, campus)).ok


async def test_a_changed_snapshot_names_the_account(engine: Engine, campus: Campus) -> None:
    sql = (
        "UPDATE balance_snapshots SET credits_posted = credits_posted + $4 "
        "WHERE ledger = $1 AND account_id = $2 AND timestamp = $3"
    )
    args = (campus.ledger, campus.purse, campus.first_snapshot)
    async with tampering(engine) as conn:
        assert await conn.execute(sql, *args, 5) == "UPDATE 1"
        try:
            rank, subject, detail = await _first(engine, campus)
        finally:
            await conn.execute(sql, *args, -5)
    assert (rank, subject) == (Rank.SNAPSHOT, f"account {campus.purse}")
    assert "snapshot" in detail and "credits_posted=10005" in detail
    assert (await _verify(engine, campus)).ok


async def test_a_changed_balance_names_the_account(engine: Engine, campus: Campus) -> None:
    sql = "UPDATE accounts SET credits_posted = credits_posted + $2 WHERE id = $1"
    async with tampering(engine) as conn:
        await conn.execute(sql, campus.canteen, 100)
        try:
            rank, subject, detail = await _first(engine, campus)
            report = await _verify(engine, campus)
        finally:
            await conn.execute(sql, campus.canteen, -100)
    assert (rank, subject) == (Rank.ACCOUNT, f"account {campus.canteen}")
    assert "live credits_posted" in detail
    assert any(p.rank is Rank.LEDGER and "double entry" in p.detail for p in report.problems)
    assert (await _verify(engine, campus)).ok


async def test_tampered_holds_are_named(engine: Engine, campus: Campus) -> None:
    sql = "UPDATE holds SET state = $2, resolved_at = $3 WHERE id = $1"
    async with tampering(engine) as conn:
        before = await conn.fetchrow(
            "SELECT state, resolved_at FROM holds WHERE id = $1", campus.voided
        )
        assert before is not None
        await conn.execute(sql, campus.voided, "pending", 0)
        try:
            rank, subject, detail = await _first(engine, campus)
        finally:
            await conn.execute(sql, campus.voided, before["state"], before["resolved_at"])
        await conn.execute("UPDATE holds SET amount = 301 WHERE id = $1", campus.open_hold)
        try:
            rank2, subject2, detail2 = await _first(engine, campus)
        finally:
            await conn.execute("UPDATE holds SET amount = 300 WHERE id = $1", campus.open_hold)
    assert (rank, subject) == (Rank.HOLD, f"transfer {campus.void}")
    assert f"hold {campus.voided} should be voided" in detail
    assert (rank2, subject2) == (Rank.HOLD, f"transfer {campus.open_hold}")
    assert "amount=301" in detail2
    assert (await _verify(engine, campus)).ok


def _cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLI, *args, "--dsn", dsn],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )


async def test_cli_exit_codes_and_first_problem(
    engine: Engine, campus: Campus, dsn: str
) -> None:
    ok = await asyncio.to_thread(_cli, dsn, "verify", "--ledger", str(campus.ledger))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK: 1 ledgers, 14 transfers in 11 audit batches")
    sql = "UPDATE accounts SET debits_posted = debits_posted + $2 WHERE id = $1"
    async with tampering(engine) as conn:
        await conn.execute(sql, campus.purse, 7)
        try:
            bad = await asyncio.to_thread(_cli, dsn, "verify", "--ledger", str(campus.ledger))
        finally:
            await conn.execute(sql, campus.purse, -7)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    first_line = bad.stdout.splitlines()[0]
    assert first_line.startswith(f"FAILED: ledger {campus.ledger}: account {campus.purse}: ")
    assert "live debits_posted" in first_line
    assert "Traceback" not in bad.stderr

"""The reads of a page load are shared by concurrent page loads (issue 13: coalesced like the
terminal path): a burst of home pages costs one session statement and one overview statement,
and the answers are each page's own. Counted in statements, never timed."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from engine import limits
from engine.campus import Campus, HolderKind, HolderResult
from engine.selfservice.holders import HolderReads
from engine.selfservice.statement import StatementReads
from engine.service import Engine
from engine.web import sessions
from engine.web.sessions import SessionKind, SessionReads
from ledger.account import Account
from ledger.status import AccountStatus, TransferStatus
from ledger.transfer import Transfer
from ledger.types import AccountKind, TransferCode
from tests.conftest import Ids

BURST = 64


async def test_session_reads_answer_as_find(engine: Engine) -> None:
    pool = engine.store.pool
    reads = SessionReads(lambda: pool)
    t0 = datetime(2040, 1, 1, tzinfo=UTC)
    sid, started = await sessions.start(pool, SessionKind.SELF, "c1", now=t0, replacing=None)
    idle = timedelta(seconds=limits.WEB_SESSION_IDLE_S)
    found = await reads.find(SessionKind.SELF, sid, now=t0 + idle - timedelta(seconds=1))
    assert found is not None and found.subject == "c1" and found.csrf == started.csrf
    later = t0 + 2 * idle - timedelta(seconds=2)  # that use was written
    assert await reads.find(SessionKind.SELF, sid, now=later) is not None
    assert await reads.find(SessionKind.SELF, sid, now=later + idle) is None
    assert await reads.find(SessionKind.CONSOLE, sid, now=t0) is None
    for bad in ("", "x" * 65, "not a session", "\udcff\x00", None):
        assert await reads.find(SessionKind.SELF, bad, now=t0) is None


async def test_a_burst_of_session_reads_is_one_statement(engine: Engine) -> None:
    pool = engine.store.pool
    reads = SessionReads(lambda: pool)
    t0 = datetime(2041, 1, 1, tzinfo=UTC)
    started = [await sessions.start(pool, SessionKind.SELF, f"b{i}", now=t0, replacing=None)
               for i in range(BURST)]
    before = reads.statements
    found = await asyncio.gather(*(reads.find(SessionKind.SELF, sid, now=t0)
                                   for sid, _ in started))
    assert [f.subject if f else None for f in found] == [f"b{i}" for i in range(BURST)]
    assert reads.statements - before <= 2  # not one per page load


@pytest.fixture
async def holders(engine: Engine, ids: Ids) -> list[str]:
    campus = Campus(engine)
    ledger = ids.ledger()
    out = []
    for i in range(BURST):
        r = await campus.create_holder(holder_id=f"H{ledger}x{i}", ledger=ledger, name="h",
                                       kind=HolderKind.STUDENT)
        assert isinstance(r, HolderResult)
        out.append(r.holder.id)
    return out


async def test_a_burst_of_home_pages_is_one_overview_statement(
    engine: Engine, holders: list[str]
) -> None:
    reads = HolderReads(lambda: engine.store.pool)
    refs = await asyncio.gather(*(reads.find_holder(h) for h in holders))
    assert all(r is not None for r in refs) and reads.statements <= 2
    assert await reads.find_holder(holders[0]) is refs[0]  # remembered: no statement
    before = reads.statements
    overviews = await asyncio.gather(*(reads.overview(r) for r in refs if r is not None))
    assert len(overviews) == BURST and all(o.total == 0 and o.card is None for o in overviews)
    assert reads.statements - before <= 2


async def test_a_burst_of_statement_pages_is_one_statement(
    engine: Engine, holders: list[str], ids: Ids
) -> None:
    reads = HolderReads(lambda: engine.store.pool)
    refs = [r for r in await asyncio.gather(*(reads.find_holder(h) for h in holders)) if r]
    ledger = refs[0].ledger
    bank = ids.account()
    [st] = await engine.store.create_accounts(
        [Account(id=bank, ledger=ledger, kind=AccountKind.CLEARING, code=1)])
    assert st is AccountStatus.CREATED
    results = await engine.batcher.submit([
        Transfer(id=uuid.uuid4(), ledger=ledger, debit_account_id=bank,
                 credit_account_id=ref.purse_id, amount=100 + n, code=TransferCode.TOP_UP)
        for n, ref in enumerate(refs) for _ in range(n % 25)])
    assert {r.status for r in results} == {TransferStatus.CREATED}
    pages = StatementReads(lambda: engine.store.pool)
    got = await asyncio.gather(*(pages.page(ref, before=None) for ref in refs))
    assert pages.statements <= 2
    for n, page in enumerate(got):
        assert [line.fen for line in page.lines] == [100 + n] * min(n % 25, 20)
        assert (page.next_before is not None) == (n % 25 > 20)

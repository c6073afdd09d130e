"""A worker stops: the ledgers on the other workers keep posting, through the batcher and
through the gateway (real TCP, ISO 8583), while the stopped worker's ledger gets no answer
that claims anything; once the worker is back, that ledger posts again and both ledgers'
balances are exactly what the answers say.

Stopping a worker needs the machine the cluster runs on: ``ONECARD_CITUS_NODE_CTL`` names a
command called as ``CMD stop|start HOST PORT`` (README, "Running distributed")."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from engine.campus import Campus, Card, HolderKind, HolderResult, RegistryStatus, TerminalKind
from engine.campus.accounts import holder_account_ids
from engine.finance.verify import verify
from engine.service import Engine
from ledger.account import Account
from ledger.status import AccountStatus, TransferStatus
from ledger.transfer import Transfer
from ledger.types import AccountKind, TransferCode, TransferFlag
from terminals.client import TerminalClient
from terminals.gateway import Gateway
from tests.citus.conftest import Node, ledgers_apart, worker_of
from tests.conftest import Ids

pytestmark = pytest.mark.citus

NODE_CTL_VAR = "ONECARD_CITUS_NODE_CTL"
BACK_WITHIN_S = 120.0
EXPIRY_WITHIN_S = 30.0
# by ledger and id: a read by account id alone visits every shard, and fails with one away
SQL_PENDING = "SELECT debits_pending FROM accounts WHERE ledger = $1 AND id = $2"


@pytest.fixture
def node_ctl() -> str:
    cmd = os.environ.get(NODE_CTL_VAR)
    if not cmd:
        pytest.skip(f"set {NODE_CTL_VAR} to a command that stops and starts a worker")
    return cmd


async def _ctl(cmd: str, action: str, node: Node) -> None:
    proc = await asyncio.create_subprocess_exec(
        cmd, action, node[0], str(node[1]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"{cmd} {action} {node}: {out.decode(errors='replace')}"


@contextlib.asynccontextmanager
async def stopped(cmd: str, node: Node) -> AsyncIterator[None]:
    """The worker stopped for the block, started again after it (also on failure)."""
    await _ctl(cmd, "stop", node)
    try:
        yield
    finally:
        await _ctl(cmd, "start", node)


class Campus1:
    """A ledger with a bank, a canteen, a holder with a card and a POS terminal."""

    def __init__(self, engine: Engine, campus: Campus, ids: Ids, ledger: int) -> None:
        self.engine, self.campus, self.ledger = engine, campus, ledger
        self.bank, self.canteen = ids.accounts(2)
        self.holder = "W" + secrets.token_hex(4)
        self.purse, _ = holder_account_ids(ledger, self.holder)
        self.card = "86" + "".join(secrets.choice("0123456789") for _ in range(14))
        self.terminal = "W" + secrets.token_hex(4)[:7].upper()
        self.key = secrets.token_bytes(32)
        self.paid = 0
        self.topped = 0

    async def setup(self) -> Campus1:
        st = await self.engine.store.create_accounts([
            Account(id=self.bank, ledger=self.ledger, kind=AccountKind.CLEARING, code=1),
            Account(id=self.canteen, ledger=self.ledger, kind=AccountKind.MERCHANT, code=1),
        ])
        assert st == [AccountStatus.CREATED] * 2
        h = await self.campus.create_holder(holder_id=self.holder, ledger=self.ledger,
                                            name="n", kind=HolderKind.STUDENT)
        assert isinstance(h, HolderResult)
        c = await self.campus.create_card(card_no=self.card, holder_id=self.holder,
                                          ledger=self.ledger)
        assert isinstance(c, Card)
        r = await self.campus.register_terminal(
            terminal_id=self.terminal, merchant_id="M" * 15, ledger=self.ledger,
            kind=TerminalKind.POS, account_id=self.canteen, mac_key=self.key)
        assert r is RegistryStatus.CREATED
        assert await self.top_up(100_000)
        return self

    async def top_up(self, amount: int, tid: uuid.UUID | None = None) -> bool:
        """Whether the top-up is in the ledger: ``created``, or ``exists`` when the request
        shared a batch with the stopped worker's ledger (its ledger's part committed, the
        batch failed, the retry of that part found it: the idempotent answer)."""
        [r] = await self.engine.batcher.submit([Transfer(
            id=tid or uuid.uuid4(), ledger=self.ledger, debit_account_id=self.bank,
            credit_account_id=self.purse, amount=amount, code=TransferCode.TOP_UP)])
        done = r.status in (TransferStatus.CREATED, TransferStatus.EXISTS)
        if done:
            self.topped += amount
        return done

    async def hold_expires(self) -> None:
        """A hold with a one-second timeout on the purse is released by the expirer."""
        [r] = await self.engine.batcher.submit([Transfer(
            id=uuid.uuid4(), ledger=self.ledger, debit_account_id=self.purse,
            credit_account_id=self.canteen, amount=50, code=TransferCode.MEAL,
            flags=(TransferFlag.PENDING,), timeout_s=1)])
        assert r.status in (TransferStatus.CREATED, TransferStatus.EXISTS)
        async with self.engine.store.pool.acquire() as conn, asyncio.timeout(EXPIRY_WITHIN_S):
            pending = 50
            while pending:
                await asyncio.sleep(0.2)
                pending = await conn.fetchval(SQL_PENDING, self.ledger, self.purse)

    async def balance(self) -> int:
        rec = await self.engine.store.get_account(self.purse)
        assert rec is not None
        return rec.state.credits_posted - rec.state.debits_posted


async def _pay(client: TerminalClient, c: Campus1, amount: int) -> str | None:
    """A purchase at the terminal over TCP; its response code."""
    answer = await client.request(client.purchase(c.card, amount))
    if answer.response_code == "00":
        c.paid += amount
    return answer.response_code


async def test_a_ledger_keeps_posting_while_another_ledgers_worker_is_down(
    engine: Engine, dsn: str, ids: Ids, node_ctl: str
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        ledger_a, ledger_b = await ledgers_apart(conn, ids.ledger, 2)
        worker_b = await worker_of(conn, ledger_b)
    finally:
        await conn.close()
    campus = Campus(engine)
    a = await Campus1(engine, campus, ids, ledger_a).setup()
    b = await Campus1(engine, campus, ids, ledger_b).setup()
    gateway = Gateway(engine, campus=campus)
    await gateway.start("127.0.0.1", 0)
    try:
        async with TerminalClient("127.0.0.1", gateway.port, terminal_id=a.terminal,
                                  merchant_id="M" * 15, mac_key=a.key) as pos:
            assert await _pay(pos, a, 100) == "00"
            async with stopped(node_ctl, worker_b):
                # the other ledger's traffic goes on beside it, and gets nowhere
                b_created: list[int] = []
                b_tried: list[uuid.UUID] = []
                b_tries = asyncio.create_task(_keep_trying(b, b_created, b_tried))
                try:
                    for i in range(10):
                        assert await a.top_up(10 + i)
                        assert await _pay(pos, a, 20 + i) == "00"
                    # and its holds still expire (the expirer asks the reachable shards)
                    await a.hold_expires()
                finally:
                    b_tries.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await b_tries
                assert b_created == []
            # back: ledger b posts again once the worker answers
            async with asyncio.timeout(BACK_WITHIN_S):
                while True:
                    with contextlib.suppress(Exception):
                        if await b.top_up(7):
                            break
                    await asyncio.sleep(1)
            assert await _pay(pos, a, 30) == "00"
            # what ledger b was sent while down is posted exactly once by sending it again (an
            # attempt whose caller gave up may have committed once the worker was back)
            for tid in b_tried:
                assert await b.top_up(1, tid)
    finally:
        await gateway.stop()
    for c in (a, b):
        assert await c.balance() == c.topped - c.paid, c.ledger
    report = await verify(engine.store.pool, ledgers=[ledger_a, ledger_b])
    assert report.ok, report.first()


async def _keep_trying(b: Campus1, created: list[int], tried: list[uuid.UUID]) -> None:
    """Top up ledger b over and over while its worker is down (noting every attempt, and any
    that succeeds)."""
    while True:
        tid = uuid.uuid4()
        tried.append(tid)
        with contextlib.suppress(Exception):
            if await b.top_up(1, tid):
                created.append(1)
        await asyncio.sleep(0.2)

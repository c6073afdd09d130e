"""Faults inside one engine process: what a lost database connection turns into at the HTTP
edge, and background work that must survive an error it did not expect."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import httpx
import pytest
from litestar import get
from litestar.params import FromPath

from engine.http.app import create_app
from engine.service import Engine
from ledger.account import Account
from ledger.transfer import Transfer
from ledger.types import AccountFlag, AccountKind, TransferFlag, TransferState
from tests.faults.harness import scratch_database, serve_app

# Every way asyncpg reports that the database went away while a request used it (all seen
# under pg_terminate_backend or a database restart).
DATABASE_AWAY = {
    "refused": ConnectionRefusedError(111, "Connect call failed"),
    "timeout": TimeoutError(),
    "lost": asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    "admin_shutdown": asyncpg.AdminShutdownError("terminating connection due to administrator"),
    "starting": asyncpg.CannotConnectNowError("the database system is starting up"),
    "crash": asyncpg.exceptions.CrashShutdownError("terminating connection"),
    "too_many": asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    "closed": asyncpg.InterfaceError("connection is closed"),
    "protocol": asyncpg.InternalClientError("cannot switch to state 15; another operation (2)"),
}


@get("/test/raise/{kind:str}")
async def _raise(kind: FromPath[str]) -> None:
    if kind == "bug":
        raise RuntimeError("a programming error with a secret-looking detail")
    raise DATABASE_AWAY[kind]


async def test_database_errors_answer_503_never_500(engine: Engine) -> None:
    app = create_app(engine, admin_token="a", read_token="r", extra_routes=[_raise])
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        for kind in DATABASE_AWAY:
            r = await c.get(f"/test/raise/{kind}")
            assert r.status_code == 503, (kind, r.text)
            assert r.headers["retry-after"]
            assert r.json()["error"] == "unavailable"
        # A genuine bug still answers 500, without its details.
        r = await c.get("/test/raise/bug")
        assert r.status_code == 500
        assert "secret" not in r.text


SQL_HIDE_HOLDS = "ALTER TABLE holds RENAME TO holds_hidden"
SQL_SHOW_HOLDS = "ALTER TABLE holds_hidden RENAME TO holds"


async def test_expirer_survives_an_unexpected_database_error(admin_dsn: str) -> None:
    """The expirer dies of an error it does not retry (here: its table vanished for a moment);
    once the table is back, holds must still expire by themselves."""
    async with scratch_database(admin_dsn) as dsn:
        engine = Engine(dsn, expirer_interval_s=0.05)
        await engine.start()
        try:
            purse, shop = 1, 2
            await engine.store.create_accounts(
                [
                    Account(
                        id=purse,
                        ledger=1,
                        kind=AccountKind.PURSE,
                        code=1,
                        flags=(AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,),
                    ),
                    Account(id=shop, ledger=1, kind=AccountKind.UTILITY, code=1),
                    Account(id=3, ledger=1, kind=AccountKind.CLEARING, code=1),
                ]
            )
            top_up = Transfer(
                id=uuid.uuid4(),
                ledger=1,
                debit_account_id=3,
                credit_account_id=purse,
                amount=1000,
                code=4,
            )
            hold = Transfer(
                id=uuid.uuid4(),
                ledger=1,
                debit_account_id=purse,
                credit_account_id=shop,
                amount=300,
                code=2,
                flags=(TransferFlag.PENDING,),
                timeout_s=1,
            )
            res = await engine.batcher.submit([top_up, hold])
            assert [r.status for r in res] == ["created", "created"]
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(SQL_HIDE_HOLDS)
                await asyncio.sleep(0.5)  # the expirer runs into the missing table
                await conn.execute(SQL_SHOW_HOLDS)
            finally:
                await conn.close()
            deadline = time.monotonic() + 8
            while True:
                rec = await engine.store.get_transfer(hold.id)
                assert rec is not None
                if rec.state == TransferState.EXPIRED:
                    break
                assert time.monotonic() < deadline, "the hold never expired: the expirer died"
                await asyncio.sleep(0.1)
        finally:
            await engine.stop()




@pytest.mark.parametrize("kind", list(DATABASE_AWAY))
def test_the_batcher_retries_every_connection_loss(kind: str) -> None:
    """A batch whose connection died must be retried, whatever asyncpg calls the death."""
    from engine.faults import RETRYABLE

    assert isinstance(DATABASE_AWAY[kind], RETRYABLE)

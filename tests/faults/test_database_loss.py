"""Database loss under load: connections killed with pg_terminate_backend, and the database
itself stopped and restarted (a private embedded PostgreSQL, never the shared server).

The engine must reconnect by itself; an in-flight batch is either committed or safely retried
(the retry answers ``exists``); while the database is away /healthz answers 503 and requests
fail fast with 503 and Retry-After instead of hanging; never a 500; nothing lost or doubled.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from engine.db.embedded import EmbeddedPostgres
from terminals.client import ClientError, TerminalClient
from tests.databases import database_name
from tests.faults.harness import (
    ADMIN,
    READ,
    Driver,
    ServerProcess,
    TerminalDriver,
    campus_problems,
    check_books,
    check_ledger,
    new_book,
    open_book,
    open_campus,
    plan_purchases,
    plan_requests,
    scratch_database,
    split_plans,
    terminate_backends,
    when,
)

pytestmark = pytest.mark.slow

CLIENTS = 8
TERMINATE_TRANSFERS = 6_000
TERMINATE_EVERY_S = 0.15
TERMINATE_MAX = 40
TERMINATE_TERMINALS = 8
TERMINATE_PURCHASES = 60  # per terminal
RESTART_TRANSFERS = 6_000
RESTART_TERMINALS = 8
RESTART_PURCHASES = 60  # per terminal
DOWN_FOR_S = 2.0
FAIL_FAST_S = 2.0  # a request while the database is away is answered within this
SQL_LISTEN_ADDRESSES = "SHOW listen_addresses"
SQL_STORED = "SELECT count(*) FROM transfers WHERE id = $1"


async def _reader(base_url: str, account: int, stop: asyncio.Event, seen: dict[int, int]) -> None:
    """Reads balances throughout; every answer must be 200 or 503."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as c:
        while not stop.is_set():
            try:
                r = await c.get(f"/v1/accounts/{account}/balance", headers=READ)
            except httpx.TransportError:
                seen[-1] = seen.get(-1, 0) + 1
            else:
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
            await asyncio.sleep(0.01)


async def test_terminated_connections_under_load(admin_dsn: str, tmp_path: Path) -> None:
    """Every database connection of the server (engine, campus, gateway) is killed with
    pg_terminate_backend every 150 ms while HTTP clients, POS terminals and a reader work."""
    async with scratch_database(admin_dsn) as dsn:
        server = ServerProcess(dsn, tmp_path / "server.log", iso=True)
        server.start()
        try:
            await server.wait_ready()
            book = new_book(ledger=1, first_id=1000)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as c:
                await open_book(c, book)
                campus = await open_campus(c, ledger=2, terminals=TERMINATE_TERMINALS, holders=16)
            plans = plan_requests(book, random.Random(11), TERMINATE_TRANSFERS)
            driver = Driver(server.base_url, split_plans(plans, CLIENTS), deadline_s=120)
            assert server.iso_port is not None
            terminals = TerminalDriver(
                server.iso_port,
                campus,
                plan_purchases(campus, random.Random(14), TERMINATE_PURCHASES),
                deadline_s=120,
            )
            stop = asyncio.Event()
            seen: dict[int, int] = {}
            reader = asyncio.create_task(_reader(server.base_url, book.purses[0], stop, seen))
            run = asyncio.gather(driver.run(), terminals.run())
            killed = rounds = 0
            while not run.done() and rounds < TERMINATE_MAX:
                await asyncio.sleep(TERMINATE_EVERY_S)
                killed += await terminate_backends(admin_dsn, database_name(dsn))
                rounds += 1
            await run
            stop.set()
            await reader
            problems, balances = await check_books(dsn, campus.ledger)
            # Reconnected by itself: ready again without any help.
            async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as c:
                t0 = time.monotonic()
                while (await c.get("/healthz")).status_code != 200:
                    assert time.monotonic() - t0 < 10, "never ready again"
                    await asyncio.sleep(0.1)
            rep = await check_ledger(dsn, book, plans, driver.answers, final=True)
        finally:
            await server.stop()
    s = driver.stats
    money = campus_problems(campus, terminals, balances)
    print(
        f"\npg_terminate_backend: {driver.total} transfers and {terminals.total} purchases, "
        f"{killed} connections killed in {rounds} rounds, {s.unavailable} answers 503, "
        f"{terminals.stats.system_errors} answers 96 ({terminals.stats.given_up} given up, "
        f"paid again), {s.retries} retries, "
        f"{terminals.stats.retransmissions} retransmissions; reads {seen}; lost "
        f"{len(rep.lost)}, doubled {len(s.doubled) + rep.duplicate_ids}, money errors {len(money)}"
    )
    assert not terminals.stats.wrong, terminals.stats.wrong[:5]
    assert not terminals.stats.different_resend
    assert not problems, problems
    assert not money, money[:5]
    assert killed > 0 and rounds >= 3, "no fault was injected while the load ran"
    assert not s.wrong, s.wrong[:5]
    assert not s.doubled
    assert not rep.problems(), rep.problems()
    assert set(seen) <= {200, 503}, seen
    assert "unhandled error" not in server.log_text(), server.log_tail()


async def test_database_restart_under_load(tmp_path: Path) -> None:
    """HTTP clients and POS terminals at work while the database is stopped for two seconds
    and started again. While it is away: /healthz 503, a write 503, a read 503, an inquiry 96
    (MACed) and a purchase unanswered (the line closed), each at once; afterwards everything
    is exact."""
    pg = EmbeddedPostgres(tmp_path / "pg")
    dsn = await asyncio.to_thread(pg.start)
    server = ServerProcess(dsn, tmp_path / "server.log", iso=True)
    try:
        conn = await asyncpg.connect(dsn)
        try:  # the private database listens on its unix socket only
            assert await conn.fetchval(SQL_LISTEN_ADDRESSES) == ""
        finally:
            await conn.close()
        server.start()
        await server.wait_ready()
        book = new_book(ledger=1, first_id=1000)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as c:
            await open_book(c, book)
            campus = await open_campus(c, ledger=2, terminals=RESTART_TERMINALS, holders=16)
        plans = plan_requests(book, random.Random(12), RESTART_TRANSFERS)
        driver = Driver(server.base_url, split_plans(plans, CLIENTS), deadline_s=120)
        assert server.iso_port is not None
        terminals = TerminalDriver(
            server.iso_port,
            campus,
            plan_purchases(campus, random.Random(13), RESTART_PURCHASES),
            deadline_s=120,
        )
        run = asyncio.gather(driver.run(), terminals.run())
        await when(lambda: driver.stats.acked_transfers >= driver.total * 0.3, timeout_s=60)
        await when(lambda: terminals.done >= 10, timeout_s=60)  # every terminal is known now
        in_flight = len(driver.in_flight) + terminals.in_flight
        pos = campus.terminals[0]
        probe_terminal = TerminalClient(
            "127.0.0.1",
            server.iso_port,
            terminal_id=pos.terminal_id,
            merchant_id=pos.merchant_id,
            mac_key=pos.key,
            timeout_s=10,
        )
        await probe_terminal.connect()
        probe = probe_terminal.purchase(campus.poor.card_no, 1, stan="999999")
        await asyncio.to_thread(pg.stop)
        down_at = time.monotonic()
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as c:
            # Not ready while the database is away, and said so at once.
            t0 = time.monotonic()
            r = await c.get("/healthz")
            health_s = time.monotonic() - t0
            assert r.status_code == 503 and r.headers.get("retry-after"), r.text
            # A write fails fast with 503 instead of hanging; so does a read.
            body = [
                {
                    "id": str(uuid.uuid4()),
                    "ledger": book.ledger,
                    "amount": 1,
                    "code": 1,
                    "debit_account_id": book.purses[0],
                    "credit_account_id": book.merchants[0],
                }
            ]
            t0 = time.monotonic()
            w = await c.post("/v1/transfers", json=body, headers=ADMIN)
            write_s = time.monotonic() - t0
            t0 = time.monotonic()
            rd = await c.get(f"/v1/accounts/{book.purses[0]}/balance", headers=READ)
            read_s = time.monotonic() - t0
            assert w.status_code == 503 and w.headers.get("retry-after"), w.text
            assert w.json()["error"] == "unavailable"
            assert rd.status_code == 503 and rd.headers.get("retry-after"), rd.text
            # An inquiry moves nothing: it gets 96 (with a valid MAC: request() checks it).
            t0 = time.monotonic()
            answer = await probe_terminal.request(probe_terminal.inquiry(campus.poor.card_no))
            inquiry_s = time.monotonic() - t0
            assert answer.response_code == "96", answer
            # A purchase gets no answer, at once (the line closes, no hang): without its answer
            # memory the gateway cannot tell whether an earlier attempt of the same message
            # moved money, and a 96 must be true (contract §5 v4).
            t0 = time.monotonic()
            with pytest.raises(ClientError):
                await probe_terminal.request(probe)
            terminal_s = time.monotonic() - t0
            await asyncio.sleep(max(0.0, DOWN_FOR_S - (time.monotonic() - down_at)))
            await asyncio.to_thread(pg.start)
            up_at = time.monotonic()
            while (await c.get("/healthz")).status_code != 200:
                assert time.monotonic() - up_at < 15, "not ready after the database came back"
                await asyncio.sleep(0.05)
            ready_s = time.monotonic() - up_at
        # Nothing was stored for it (it never ran): the same message, retransmitted, now gets
        # its real answer.
        assert (await terminals.exchange(probe_terminal, probe)).response_code == "51"
        await probe_terminal.close()
        await run
        rep = await check_ledger(dsn, book, [*plans], driver.answers, final=True)
        problems, balances = await check_books(dsn, campus.ledger)
        conn = await asyncpg.connect(dsn)
        try:  # the probe write answered 503: it must not have been stored
            stored = await conn.fetchval(SQL_STORED, uuid.UUID(body[0]["id"]))
        finally:
            await conn.close()
    finally:
        await server.stop()
        await asyncio.to_thread(pg.stop)
    s = driver.stats
    money = campus_problems(campus, terminals, balances)
    print(
        f"\ndatabase restart: {driver.total} transfers and {terminals.total} purchases, down "
        f"{DOWN_FOR_S}s with {in_flight} requests in flight; healthz {health_s:.2f}s, write 503 "
        f"in {write_s:.2f}s, read 503 in {read_s:.2f}s, inquiry 96 in {inquiry_s:.2f}s, "
        f"purchase line closed in {terminal_s:.2f}s, ready {ready_s:.1f}s after restart; "
        f"{s.unavailable} answers 503, {terminals.stats.system_errors} answers 96 "
        f"({terminals.stats.given_up} given up, paid again); lost {len(rep.lost)}, "
        f"doubled {len(s.doubled) + rep.duplicate_ids}, money errors {len(money)}"
    )
    assert max(health_s, write_s, read_s, inquiry_s, terminal_s) < FAIL_FAST_S
    assert stored == 0
    assert s.unavailable > 0
    assert not s.wrong, s.wrong[:5]
    assert not s.doubled
    assert not rep.problems(), rep.problems()
    assert not terminals.stats.wrong, terminals.stats.wrong[:5]
    assert not terminals.stats.different_resend
    assert not problems, problems
    assert not money, money[:5]
    assert "unhandled error" not in server.log_text(), server.log_tail()

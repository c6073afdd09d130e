"""Graceful shutdown: SIGTERM stops accepting, drains the queued transfers, answers them, exits 0.

Sixteen clients each have a 2,000-transfer request queued when SIGTERM arrives, while eight
more keep posting small requests. Every request the server had begun to read must be answered
(200, every transfer decided), a new connection must be refused while the queue drains, the
process must exit with 0, and nothing acknowledged may be missing from the tables.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.faults.harness import (
    ADMIN,
    OK,
    Planned,
    ServerProcess,
    TerminalDriver,
    campus_problems,
    check_books,
    check_ledger,
    merge_plans,
    new_book,
    open_book,
    open_campus,
    plan_purchases,
    plan_requests,
    scratch_database,
    when,
)

pytestmark = pytest.mark.slow

BIG_CLIENTS = 16
BIG_TRANSFERS = 2_000
SMALL_CLIENTS = 8
SQL_COUNT = "SELECT count(*) FROM transfers WHERE ledger = $1"


async def test_sigterm_drains_and_answers(admin_dsn: str, tmp_path: Path) -> None:
    async with scratch_database(admin_dsn) as dsn:
        server = ServerProcess(dsn, tmp_path / "server.log")
        server.start()
        try:
            await server.wait_ready()
            book = new_book(ledger=1, first_id=1)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as c:
                await open_book(c, book)
            rng = random.Random(7)
            big = [merge_plans(plan_requests(book, rng, BIG_TRANSFERS)) for _ in range(BIG_CLIENTS)]
            small: list[Planned] = []
            answers: dict[str, str] = {}
            warm = asyncio.Semaphore(0)
            go = asyncio.Event()

            async def big_client(p: Planned) -> httpx.Response:
                async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as c:
                    assert (await c.get("/healthz")).status_code == 200  # keep-alive connection
                    warm.release()
                    await go.wait()
                    return await c.post("/v1/transfers", json=p.body, headers=ADMIN)

            async def small_client(seed: int) -> int:
                r_ = random.Random(seed)
                sent = 0
                async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as c:
                    await go.wait()
                    while True:
                        p = merge_plans(plan_requests(book, r_, 10))
                        small.append(p)
                        try:
                            r = await c.post("/v1/transfers", json=p.body, headers=ADMIN)
                        except httpx.TransportError:
                            return sent
                        assert r.status_code in (200, 503), r.text
                        if r.status_code == 503:
                            return sent
                        answers.update((x["id"], x["status"]) for x in r.json())
                        sent += 1

            bigs = [asyncio.create_task(big_client(p)) for p in big]
            smalls = [asyncio.create_task(small_client(i)) for i in range(SMALL_CLIENTS)]
            for _ in big:
                await asyncio.wait_for(warm.acquire(), 10)
            go.set()
            conn = await asyncpg.connect(dsn)
            try:
                base = len(book.setup)
                t_end = time.monotonic() + 30
                while await conn.fetchval(SQL_COUNT, book.ledger) <= base + 500:
                    assert time.monotonic() < t_end, "no batch committed"
                    await asyncio.sleep(0.005)
                server.send_signal(signal.SIGTERM)
                stored_at_term = await conn.fetchval(SQL_COUNT, book.ledger)
            finally:
                await conn.close()
            # While the queue drains the listener is gone: a new connection is refused.
            await asyncio.sleep(0.2)
            alive_while_refused = server.running
            with pytest.raises(httpx.ConnectError):
                async with httpx.AsyncClient(base_url=server.base_url, timeout=2) as c:
                    await c.get("/healthz")
            t0 = time.monotonic()
            code = await server.wait_exit(timeout_s=30)
            drain_s = time.monotonic() - t0
            responses = await asyncio.gather(*bigs)
            small_sent = sum(await asyncio.gather(*smalls))
        finally:
            await server.stop()
        for p, r in zip(big, responses, strict=True):
            assert r.status_code == 200, r.text
            got = r.json()
            assert [x["id"] for x in got] == p.ids
            for x, ok, fail in zip(got, p.ok, p.fail_status, strict=True):
                assert x["status"] in OK if ok else x["status"] == fail, x
                answers[x["id"]] = x["status"]
        rep = await check_ledger(dsn, book, [*big, *small], answers, final=False)
    acked = sum(1 for st in answers.values() if st in OK) + len(book.setup)
    print(
        f"\nshutdown: {BIG_CLIENTS}x{BIG_TRANSFERS} queued + {small_sent} small requests; "
        f"{stored_at_term} stored at SIGTERM, {acked} acknowledged, drained "
        f"{acked - stored_at_term} in {drain_s:.1f}s; lost {len(rep.lost)}"
    )
    assert code == 0, server.log_tail()
    assert alive_while_refused, "the server exited before the refusal could be observed"
    assert acked > stored_at_term, "nothing was queued at SIGTERM: the drain went untested"
    assert not rep.problems(), rep.problems()
    log = server.log_text()
    assert "Traceback" not in log and "Cancel" not in log, log[-3000:]


async def test_sigterm_through_the_gateway(admin_dsn: str, tmp_path: Path) -> None:
    """Terminals paying when SIGTERM arrives: the gateway stops accepting at once, answers every
    frame it has read, and exits; a purchase is in the ledger if and only if it was approved."""
    async with scratch_database(admin_dsn) as dsn:
        server = ServerProcess(dsn, tmp_path / "server.log", iso=True)
        server.start()
        try:
            await server.wait_ready()
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as c:
                campus = await open_campus(c, ledger=3, terminals=16, holders=32)
            plans = plan_purchases(campus, random.Random(15), 1000)
            for txs in plans:
                for tx in txs:
                    tx.reverse, tx.resend = "", False
            assert server.iso_port is not None
            driver = TerminalDriver(server.iso_port, campus, plans, deadline_s=60, retry=False)
            run = asyncio.create_task(driver.run())
            await when(lambda: driver.done >= 300, timeout_s=60)
            server.send_signal(signal.SIGTERM)
            answered_at_term = driver.stats.answered
            await asyncio.sleep(0.05)
            refused = await _gateway_refuses(server.iso_port)
            code = await server.wait_exit(timeout_s=30)
            await run
            problems, balances = await check_books(dsn, campus.ledger)
        finally:
            await server.stop()
    money = campus_problems(campus, driver, balances)
    print(
        f"\nshutdown/gateway: {driver.done} purchases answered, "
        f"{driver.stats.answered - answered_at_term} of them after SIGTERM; "
        f"{driver.stats.unanswered} unread at the exit; money errors {len(money)}"
    )
    assert code == 0, server.log_tail()
    assert refused, "the gateway accepted a new terminal after SIGTERM"
    assert not problems, problems
    assert not money, money[:5]
    # Each terminal loses at most the one message the gateway never read; the ones it had
    # read when the signal came were still answered.
    assert driver.stats.unanswered <= len(campus.terminals)
    assert driver.stats.answered > answered_at_term, "nothing in flight was answered"
    assert "Traceback" not in server.log_text(), server.log_tail()


async def _gateway_refuses(port: int) -> bool:
    """True when a new connection is refused or closed without an answer to a sign-on."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    try:
        writer.write(b"\x00\x04" + b"0800")
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read() == b""
    except (OSError, TimeoutError):
        return True
    finally:
        writer.close()

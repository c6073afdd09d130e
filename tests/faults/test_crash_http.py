"""Crash safety over HTTP: SIGKILL the real server mid-run, restart it, lose and double nothing.

16 clients drive 20,000 transfers (meals, top-ups, linked splits, doomed linked chains,
overdrafts) and retry every unacknowledged request with the same ids. The server is killed
twice with SIGKILL while requests are in flight. While it is down the tables are checked for a
crash-consistent state; after the run, every acknowledged transfer must be stored exactly once
with the fields sent, nothing refused may be stored, and every balance must equal the plan.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.faults.harness import (
    ADMIN,
    Driver,
    ServerProcess,
    check_ledger,
    new_book,
    open_book,
    plan_requests,
    scratch_database,
    split_plans,
    when,
)

pytestmark = pytest.mark.slow

TRANSFERS = 20_000
CLIENTS = 16
KILL_AT = (0.25, 0.6)  # fractions of the workload acknowledged when SIGKILL strikes
RUN_DEADLINE_S = 240.0


async def test_sigkill_mid_run(admin_dsn: str, tmp_path: Path) -> None:
    async with scratch_database(admin_dsn) as dsn:
        server = ServerProcess(dsn, tmp_path / "server.log")
        server.start()
        try:
            await server.wait_ready()
            book = new_book(ledger=1, first_id=1)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as c:
                await open_book(c, book)
            plans = plan_requests(book, random.Random(20_000), TRANSFERS)
            driver = Driver(server.base_url, split_plans(plans, CLIENTS), deadline_s=RUN_DEADLINE_S)
            run = asyncio.create_task(driver.run())
            in_flight_at_kill: list[int] = []
            restart_s: list[float] = []
            for fraction in KILL_AT:
                await when(
                    lambda f=fraction: (
                        driver.stats.acked_transfers >= f * driver.total or run.done()
                    ),
                    timeout_s=RUN_DEADLINE_S,
                )
                assert not run.done(), run.exception() if run.done() else None
                in_flight_at_kill.append(len(driver.in_flight))
                server.send_signal(signal.SIGKILL)
                assert await server.wait_exit() == -signal.SIGKILL
                # Down: the tables must already be consistent, whatever was in flight.
                snapshot = dict(driver.answers)
                rep = await check_ledger(dsn, book, plans, snapshot, final=False)
                assert not rep.problems(), rep.problems()
                t0 = time.monotonic()
                server.start()
                await server.wait_ready()
                restart_s.append(time.monotonic() - t0)
            await run
            rep = await check_ledger(dsn, book, plans, driver.answers, final=True)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as c:
                r = await c.get(f"/v1/accounts/{book.bank}/balance", headers=ADMIN)
                assert r.status_code == 200
        finally:
            await server.stop()
    s = driver.stats
    print(
        f"\ncrash/http: {driver.total} transfers, {len(KILL_AT)} SIGKILLs with "
        f"{in_flight_at_kill} requests in flight, {s.retries} retries, {s.resends} resends, "
        f"restart {max(restart_s):.1f}s; stored {rep.stored}, lost {len(rep.lost)}, "
        f"doubled {len(s.doubled) + rep.duplicate_ids}, half chains {len(rep.half_chains)}"
    )
    assert not s.wrong, s.wrong[:5]
    assert not s.doubled, s.doubled[:5]
    assert not rep.problems(), rep.problems()
    assert rep.unacked == 0
    assert sum(in_flight_at_kill) > 0, "no request was in flight when the server was killed"
    assert s.transport_errors > 0, "the kills went unnoticed by the clients"

"""Crash safety through the terminal gateway: SIGKILL the real server while POS terminals pay,
retransmit and reverse over ISO 8583; restart it; every answer the terminals got must be what
the ledger holds, exactly once.

32 terminals make meals from 64 cards (many split between the subsidy and the cash purse, so a
meal is often two linked transfers), some from a penniless card (51), reverse some after the
approval and some before the original arrives, and retransmit some after their answer (the
answer must be identical, RRN included, even across the restart). Every unanswered message is
retransmitted with the same STAN and field 7 until it is answered; a purchase answered with a
stored 96 (given up: it moved nothing) is paid again under a new STAN, charged once.
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
    ServerProcess,
    TerminalDriver,
    campus_problems,
    check_books,
    open_campus,
    plan_purchases,
    scratch_database,
    when,
)

pytestmark = pytest.mark.slow

TERMINALS = 32
PER_TERMINAL = 75
KILL_AT = (0.3, 0.65)
RUN_DEADLINE_S = 240.0
RESEND_AFTER_RESTART = 40  # answers received before a kill, asked for again after the restart


async def test_sigkill_mid_run_through_the_gateway(admin_dsn: str, tmp_path: Path) -> None:
    async with scratch_database(admin_dsn) as dsn:
        server = ServerProcess(dsn, tmp_path / "server.log", iso=True)
        server.start()
        try:
            await server.wait_ready()
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as c:
                campus = await open_campus(c, ledger=7, terminals=TERMINALS)
            plans = plan_purchases(campus, random.Random(8583), PER_TERMINAL)
            assert server.iso_port is not None
            driver = TerminalDriver(server.iso_port, campus, plans, deadline_s=RUN_DEADLINE_S)
            run = asyncio.create_task(driver.run())
            in_flight: list[int] = []
            restart_s: list[float] = []
            same_after_restart = 0
            for fraction in KILL_AT:
                await when(
                    lambda f=fraction: driver.done >= f * driver.total or run.done(),
                    timeout_s=RUN_DEADLINE_S,
                )
                assert not run.done(), run.exception() if run.done() else None
                answered_before = list(driver.results)
                in_flight.append(driver.in_flight)
                server.send_signal(signal.SIGKILL)
                assert await server.wait_exit() == -signal.SIGKILL
                problems, _ = await check_books(dsn, campus.ledger)
                assert not problems, problems
                t0 = time.monotonic()
                server.start()
                await server.wait_ready()
                restart_s.append(time.monotonic() - t0)
                # Answers given before the crash are remembered across it, byte for byte.
                sample = random.Random(len(answered_before)).sample(
                    answered_before, min(RESEND_AFTER_RESTART, len(answered_before))
                )
                for r in sample:
                    client = driver.client(r.terminal)
                    again = await driver.exchange(client, r.request)
                    await client.close()
                    assert again == r.answer, (r.request, r.answer, again)
                    same_after_restart += 1
            await run
            problems, balances = await check_books(dsn, campus.ledger)
        finally:
            await server.stop()
    s = driver.stats
    money = campus_problems(campus, driver, balances)
    approved = sum(1 for r in driver.results if r.answer.response_code == "00")
    reversed_ = sum(1 for r in driver.results if r.tx.reverse)
    print(
        f"\ncrash/gateway: {driver.total} purchases ({approved} approved, {reversed_} reversed) "
        f"on {len(campus.terminals)} terminals, {len(KILL_AT)} SIGKILLs with {in_flight} in "
        f"flight, {s.retransmissions} retransmissions, {s.system_errors} answers 96 "
        f"({s.given_up} given up, paid again), "
        f"{same_after_restart} answers identical after restart, restart {max(restart_s):.1f}s; "
        f"money errors {len(money)}"
    )
    assert not s.wrong, s.wrong[:5]
    assert not s.different_resend, s.different_resend[:5]
    assert not problems, problems
    assert not money, money[:5]
    assert sum(in_flight) > 0, "nothing was in flight when the server was killed"
    assert s.retransmissions > 0

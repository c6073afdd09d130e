"""Four campuses at once on the cluster: ``onecard simulate`` drives four ledgers
concurrently (each its own engine, gateway and terminals over TCP), spread over both workers,
and every ledger's balances come out exactly as the answers say."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest
from rich.console import Console

from terminals.simulator import Op, Options, simulate
from tests.citus.conftest import ledgers_apart, worker_of
from tests.conftest import Ids

pytestmark = pytest.mark.citus

QUIET = Console(file=open(os.devnull, "w"), width=120)  # noqa: SIM115 - lives for the module


async def test_four_ledgers_driven_at_once_each_balance_exactly(dsn: str, ids: Ids) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        ledgers = [*await ledgers_apart(conn, ids.ledger, 2), ids.ledger(), ids.ledger()]
        spread = {await worker_of(conn, ledger) for ledger in ledgers}
    finally:
        await conn.close()
    assert len(spread) == 2
    reports = await asyncio.gather(*(
        simulate(dsn, Options(terminals=12, duration=6, rate=60, seed=seed, ledger=ledger,
                              progress=False, workers=0), console=QUIET)
        for seed, ledger in enumerate(ledgers)
    ))
    for ledger, report in zip(ledgers, reports, strict=True):
        assert report.ledger == ledger
        assert report.consistent, (ledger, report.problems)
        assert report.mismatched_accounts == 0 and report.accounts_checked > 2 * report.holders
        assert report.codes[str(Op.MEAL)].get("00", 0) > 10, report.codes
        assert report.unresolved == 0 and report.unexpected == 0

"""``onecard simulate`` end to end on the real engine: short runs that must come out consistent,
and proof that the consistency check notices a ledger that disagrees with the answers."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from engine.campus import Campus
from engine.service import Engine
from ledger.transfer import Transfer
from ledger.types import TransferCode
from terminals.gateway import Gateway
from terminals.simulator import Op, Options, World, show, simulate

QUIET = Console(file=open(os.devnull, "w"), width=120)  # noqa: SIM115 - lives for the module
ROOT = Path(__file__).resolve().parents[2]


async def test_short_run_is_consistent(dsn: str) -> None:
    report = await simulate(
        dsn, Options(terminals=20, duration=3, rate=300, seed=7, progress=False), console=QUIET
    )
    assert report.consistent, report.problems
    assert report.terminals == 20 and report.holders == 80
    assert report.answered > 200
    # every kind of traffic actually happened
    seen = set(report.codes)
    for op in (Op.SIGN_ON, Op.MEAL, Op.INQUIRY, Op.HOLD, Op.COMPLETION, Op.ELECTRICITY,
               Op.METER, Op.ADVICE):
        assert str(op) in seen, op
    assert report.codes[str(Op.MEAL)].get("00", 0) > 50
    assert report.accounts_checked > 2 * report.holders
    assert report.p50_ms > 0 and report.p99_ms >= report.p50_ms
    console = Console(record=True, width=140)
    show(report, console)
    text = console.export_text()
    assert "0200 purchase" in text and "consistent" in text and "INCONSISTENT" not in text


async def test_check_notices_money_the_answers_do_not_explain(dsn: str) -> None:
    async def tamper(engine: Engine, world: World) -> None:
        h = world.holders[0]
        [r] = await engine.batcher.submit([Transfer(
            id=uuid.uuid4(), ledger=world.ledger, debit_account_id=world.bank,
            credit_account_id=h.purse, amount=1, code=TransferCode.TOP_UP)])
        assert r.status.ok

    report = await simulate(
        dsn, Options(terminals=8, duration=1, rate=100, seed=3, progress=False),
        console=QUIET, before_check=tamper,
    )
    assert not report.consistent
    assert report.mismatched_accounts == 2  # the holder and the bank
    assert report.zero_sum  # the extra transfer itself balances
    assert any("SIM0000000" in p for p in report.problems)


async def test_drives_an_external_gateway(dsn: str, engine: Engine) -> None:
    gw = Gateway(engine, campus=Campus(engine))
    await gw.start("127.0.0.1", 0)
    try:
        report = await simulate(
            dsn,
            Options(terminals=8, duration=1.5, rate=150, seed=11, iso=("127.0.0.1", gw.port),
                    progress=False),
            console=QUIET,
        )
    finally:
        await gw.stop()
    assert report.consistent, report.problems
    assert report.answered > 50


async def test_rejects_too_few_terminals(dsn: str) -> None:
    with pytest.raises(ValueError, match="at least"):
        await simulate(dsn, Options(terminals=3, duration=1, progress=False), console=QUIET)


async def test_cli_short_run_exits_0(dsn: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from engine.cli import main; sys.exit(main())",
        "simulate", "--dsn", dsn, "--terminals", "20", "--duration", "3", "--rate", "200",
        "--seed", "5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
    )
    async with asyncio.timeout(120):
        out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "answers by message type and response code" in text
    assert "consistent" in text and "INCONSISTENT" not in text
    assert "p50" in text


@pytest.mark.parametrize("workers", [0, 2])
async def test_terminals_in_this_process_or_split_over_workers(dsn: str, workers: int) -> None:
    report = await simulate(
        dsn,
        Options(terminals=12, duration=2, rate=200, seed=13, workers=workers, progress=False),
        console=QUIET,
    )
    assert report.consistent, report.problems
    assert report.terminals == 12 and report.answered > 100
    assert report.codes[str(Op.SIGN_ON)] == {"00": 12}  # every terminal, once, in some worker
    assert report.codes[str(Op.MEAL)].get("00", 0) > 20


async def test_a_failing_worker_is_reported() -> None:
    from terminals.simulator.workers import _WORKER_CODE, _Worker

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WORKER_CODE, cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    proc.stdin.write(b"not a shard")
    proc.stdin.close()
    with pytest.raises(RuntimeError, match=r"worker 7 failed: .*Error"):
        async with asyncio.timeout(60):
            await _Worker(proc, "worker 7").result()
    assert proc.returncode == 1


async def test_worker_count_is_checked() -> None:
    with pytest.raises(ValueError, match="workers"):
        await simulate("postgresql://unused/x", Options(workers=-1, progress=False),
                       console=QUIET)

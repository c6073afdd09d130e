"""``onecard reconcile``: top-ups of a clearing account on a campus-local day against a
provider's statement; the day boundary in Asia/Shanghai on both sides, every result kind, and
malformed statements refused with a clear message (exit 2, never a traceback)."""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
import uuid
from datetime import date, datetime
from pathlib import Path
from typing import Final
from zoneinfo import ZoneInfo

import msgspec
import pytest

from bench.export_day import LoadAccount, LoadTransfer, load_ledger, transfer_rows
from engine.calendar import to_ns
from engine.finance.reconcile import (
    Line,
    ProviderFileError,
    ReconcileError,
    Result,
    StatementRow,
    TopUp,
    match,
    parse_time,
    read_statement,
    reconcile,
)
from engine.service import Engine
from ledger.types import AccountKind
from tests.conftest import Ids

SH: Final = ZoneInfo("Asia/Shanghai")
D: Final = date(2024, 3, 10)
ROOT: Final = Path(__file__).resolve().parents[2]
CLI: Final = "import sys; from engine.cli import main; sys.exit(main())"
HEADER: Final = "provider_ref,amount_fen,time\n"


def _at(day: int, h: int, m: int = 0, s: int = 0) -> int:
    return to_ns(datetime(2024, 3, day, h, m, s, tzinfo=SH))


# -- pure parts ----------------------------------------------------------------------------------


def test_parse_time() -> None:
    assert parse_time("2024-03-10T23:59:59+08:00") == _at(10, 23, 59, 59)
    assert parse_time("2024-03-10T15:59:59Z") == _at(10, 23, 59, 59)
    assert parse_time("2024-03-10T15:59:59.123456789z") == _at(10, 23, 59, 59) + 123_456_000
    assert parse_time("2024-03-10 15:59:59.5+00:00") == _at(10, 23, 59, 59) + 500_000_000
    for bad in ("2024-03-10T23:59:59", "2024-03-10", "yesterday", "2024-02-30T00:00:00Z",
                "2024-03-10T25:00:00Z", "1710086399"):
        with pytest.raises(ValueError):
            parse_time(bad)


def _top(ref: str, amount: int, n: int) -> TopUp:
    return TopUp(transfer_id=f"t{n}", amount=amount, provider_ref=ref, timestamp=n)


def _row(ref: str, amount: int, line: int) -> StatementRow:
    return StatementRow(provider_ref=ref, amount=amount, time=0, line=line)


def test_match_every_result_kind() -> None:
    lines = match(
        [_top("a", 100, 1), _top("b", 200, 2), _top("", 300, 3), _top("d", 400, 4),
         _top("d", 500, 5)],
        [_row("d", 400, 2), _row("a", 100, 3), _row("b", 250, 4), _row("x", 60, 5),
         _row("d", 500, 6), _row("d", 500, 7)],
    )
    assert lines == [
        Line("a", "t1", 100, 100, Result.MATCHED),
        Line("b", "t2", 200, 250, Result.AMOUNT_MISMATCH),
        Line("", "t3", 300, None, Result.MISSING_IN_STATEMENT),  # no user_data: no reference
        Line("d", "t4", 400, 400, Result.MATCHED),  # a repeated reference pairs in order
        Line("d", "t5", 500, 500, Result.MATCHED),
        Line("x", None, None, 60, Result.MISSING_IN_LEDGER),
        Line("d", None, None, 500, Result.MISSING_IN_LEDGER),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "line 1: missing header column(s) provider_ref, amount_fen, time"),
        ("ref,amount,time\nx,1,2024-03-10T00:00:00Z\n", "line 1: missing header column(s)"),
        ("wx-1,100,2024-03-10T00:00:00Z\n", "line 1: missing header"),
        (HEADER + "wx-1,12.50,2024-03-10T08:00:00+08:00\n", "line 2: bad amount_fen '12.50'"),
        (HEADER + "wx-1,100,2024-03-10T08:00:00+08:00\nwx-2,-5,2024-03-10T08:00:00+08:00\n",
         "line 3: bad amount_fen '-5'"),
        (HEADER + "wx-1,0,2024-03-10T08:00:00+08:00\n", "line 2: bad amount_fen '0'"),
        (HEADER + "wx-1,abc,2024-03-10T08:00:00+08:00\n", "line 2: bad amount_fen"),
        (HEADER + "wx-1,100,2024-03-10 08:00:00\n", "line 2: bad time"),
        (HEADER + "wx-1,100,tomorrow\n", "line 2: bad time"),
        (HEADER + "wx-1,100\n", "line 2: 2 fields, the header has 3"),
        (HEADER + ",100,2024-03-10T08:00:00+08:00\n", "line 2: empty provider_ref"),
        (HEADER + '"wx\n1",100,2024-03-10T08:00:00+08:00\nwx-2,x,2024-03-10T08:00:00Z\n',
         "line 4: bad amount_fen"),  # physical line numbers, even after a quoted newline
    ],
)
def test_bad_statements_are_refused_with_the_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "statement.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProviderFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_statement(path)


def test_statement_extras_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        "\ufefftime,channel,provider_ref,amount_fen\n"
        "2024-03-10T08:00:00+08:00,wechat,wx-1,100\n\n",
        encoding="utf-8",
    )
    assert read_statement(path) == [StatementRow("wx-1", 100, _at(10, 8), 2)]
    with pytest.raises(ProviderFileError, match="cannot read"):
        read_statement(tmp_path / "absent.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ProviderFileError):
        read_statement(tmp_path / "bin.csv")


# -- against the ledger -------------------------------------------------------------------------


class Channel(msgspec.Struct, frozen=True):
    ledger: int
    bank: int
    other_bank: int
    purse: int
    ids: dict[str, uuid.UUID]


@pytest.fixture(scope="module")
async def channel(engine: Engine) -> Channel:
    """Top-ups of one bank channel on 10 and 11 March 2024, at chosen instants."""
    ledger = 600_000 + Ids().ledger()
    bank, other_bank, purse, canteen = (5_000_000_000 + ledger * 10 + i for i in range(4))
    accounts = [
        LoadAccount(id=bank, kind=AccountKind.CLEARING, name="bank"),
        LoadAccount(id=other_bank, kind=AccountKind.CLEARING, name="alipay"),
        LoadAccount(id=purse, kind=AccountKind.PURSE),
        LoadAccount(id=canteen, kind=AccountKind.MERCHANT),
    ]
    plan = [  # name, debit, amount, code, when, user_data
        ("early", bank, 1_000, 4, _at(10, 0, 0, 1), "wx-1"),
        ("noon", bank, 2_000, 4, _at(10, 12), "wx-2"),
        ("nodata", bank, 300, 4, _at(10, 13), None),
        ("differs", bank, 4_000, 4, _at(10, 14), "wx-4"),
        ("alipay", other_bank, 5_000, 4, _at(10, 15), "ali-1"),  # another channel
        ("adjust", bank, 50, 8, _at(10, 16), "wx-adj"),  # not a top-up (code 8)
        ("late", bank, 6_000, 4, _at(10, 23, 59, 59), "wx-6"),
        ("next", bank, 7_000, 4, _at(11, 0, 0, 1), "wx-7"),
    ]
    transfers = [
        LoadTransfer(id=uuid.uuid4(), debit_account_id=d, credit_account_id=purse, amount=a,
                     code=code, timestamp=ts, user_data=ud)
        for _, d, a, code, ts, ud in plan
    ]
    async with engine.store.pool.acquire() as conn:
        await load_ledger(conn, ledger, accounts, transfer_rows(ledger, transfers),
                          created_at=_at(9, 12))
    return Channel(ledger=ledger, bank=bank, other_bank=other_bank, purse=purse,
                   ids={p[0]: t.id for p, t in zip(plan, transfers, strict=True)})


STATEMENT: Final = (
    HEADER
    + "wx-1,1000,2024-03-09T16:00:01Z\n"  # 00:00:01 on the 10th in Shanghai
    + "wx-2,2000,2024-03-10T12:00:03+08:00\n"
    + "wx-4,4100,2024-03-10T14:00:00+08:00\n"
    + "wx-5,800,2024-03-10T18:00:00+08:00\n"  # the ledger never got it
    + "wx-6,6000,2024-03-11T00:00:01+08:00\n"  # the provider booked it after midnight
    + "wx-7,7000,2024-03-11T00:00:02+08:00\n"
    + "wx-0,900,2024-03-09T23:59:59+08:00\n"  # the day before
)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


async def test_reconcile_a_day_across_the_midnight_boundary(
    engine: Engine, channel: Channel, tmp_path: Path
) -> None:
    statement = tmp_path / "statement.csv"
    statement.write_text(STATEMENT, encoding="utf-8")
    i = channel.ids
    rec = await reconcile(engine.store.pool, D, channel.bank, statement, out=tmp_path, tz=SH)
    assert not rec.ok and rec.ignored_rows == 3
    assert rec.path == tmp_path / "reconcile-2024-03-10.csv"
    assert _rows(rec.path) == [
        {"provider_ref": "wx-1", "transfer_id": str(i["early"]), "ledger_amount_fen": "1000",
         "statement_amount_fen": "1000", "result": "matched"},
        {"provider_ref": "wx-2", "transfer_id": str(i["noon"]), "ledger_amount_fen": "2000",
         "statement_amount_fen": "2000", "result": "matched"},
        {"provider_ref": "", "transfer_id": str(i["nodata"]), "ledger_amount_fen": "300",
         "statement_amount_fen": "", "result": "missing_in_statement"},
        {"provider_ref": "wx-4", "transfer_id": str(i["differs"]), "ledger_amount_fen": "4000",
         "statement_amount_fen": "4100", "result": "amount_mismatch"},
        {"provider_ref": "wx-6", "transfer_id": str(i["late"]), "ledger_amount_fen": "6000",
         "statement_amount_fen": "", "result": "missing_in_statement"},
        {"provider_ref": "wx-5", "transfer_id": "", "ledger_amount_fen": "",
         "statement_amount_fen": "800", "result": "missing_in_ledger"},
    ]
    nxt = await reconcile(engine.store.pool, date(2024, 3, 11), channel.bank, statement,
                          out=tmp_path, tz=SH)
    assert [(x.provider_ref, x.result) for x in nxt.lines] == [
        ("wx-7", Result.MATCHED), ("wx-6", Result.MISSING_IN_LEDGER),
    ]


async def test_all_matched(engine: Engine, channel: Channel, tmp_path: Path) -> None:
    statement = tmp_path / "alipay.csv"
    statement.write_text(HEADER + "ali-1,5000,2024-03-10T15:00:09+08:00\n", encoding="utf-8")
    rec = await reconcile(engine.store.pool, D, channel.other_bank, statement, tz=SH)
    assert rec.ok and rec.path is None
    assert rec.lines == [Line("ali-1", str(channel.ids["alipay"]), 5000, 5000, Result.MATCHED)]


async def test_the_account_must_be_a_clearing_account(
    engine: Engine, channel: Channel, tmp_path: Path
) -> None:
    statement = tmp_path / "s.csv"
    statement.write_text(HEADER, encoding="utf-8")
    with pytest.raises(ReconcileError, match="not clearing"):
        await reconcile(engine.store.pool, D, channel.purse, statement, tz=SH)
    with pytest.raises(ReconcileError, match="not found"):
        await reconcile(engine.store.pool, D, 1, statement, tz=SH)


def _cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ONECARD_TZ": "Asia/Shanghai"}
    return subprocess.run(
        [sys.executable, "-c", CLI, "reconcile", *args, "--dsn", dsn],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False, env=env,
    )


async def test_cli_exit_codes(channel: Channel, dsn: str, tmp_path: Path) -> None:
    statement = tmp_path / "statement.csv"
    statement.write_text(STATEMENT, encoding="utf-8")
    common = ["--date", str(D), "--out", str(tmp_path)]
    r = await asyncio.to_thread(
        _cli, dsn, *common, "--clearing", str(channel.bank), "--statement", str(statement)
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "missing_in_ledger" in r.stdout and "4 unmatched" in r.stdout
    assert len(_rows(tmp_path / "reconcile-2024-03-10.csv")) == 6
    good = tmp_path / "good.csv"
    good.write_text(HEADER + "ali-1,5000,2024-03-10T07:00:09Z\n", encoding="utf-8")
    r = await asyncio.to_thread(
        _cli, dsn, *common, "--clearing", str(channel.other_bank), "--statement", str(good)
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all matched" in r.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "ali-1,50.00,2024-03-10T07:00:09Z\n", encoding="utf-8")
    r = await asyncio.to_thread(
        _cli, dsn, *common, "--clearing", str(channel.other_bank), "--statement", str(bad)
    )
    assert r.returncode == 2
    assert "line 2: bad amount_fen '50.00'" in r.stderr and "Traceback" not in r.stderr
    r = await asyncio.to_thread(
        _cli, dsn, *common, "--clearing", str(channel.purse), "--statement", str(good)
    )
    assert r.returncode == 2 and "not clearing" in r.stderr

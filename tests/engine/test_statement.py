"""``onecard statement``: monthly electricity and hot-water statements per room and per holder,
on a ledger loaded with chosen instants around the March 2024 month boundary (Shanghai)."""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
import uuid
from datetime import date, datetime
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

import msgspec
import pytest

from bench.export_day import LoadAccount, LoadTransfer, load_ledger, transfer_rows
from engine.calendar import month_window, parse_month, to_ns
from engine.finance.statements import (
    MonthStatement,
    Subject,
    UnknownSubject,
    monthly_statement,
)
from engine.service import Engine
from ledger.types import AccountKind
from tests.conftest import Ids

SH: Final = ZoneInfo("Asia/Shanghai")
MARCH: Final = date(2024, 3, 1)
ROOT: Final = Path(__file__).resolve().parents[2]
CLI: Final = "import sys; from engine.cli import main; sys.exit(main())"


def _at(mo: int, d: int, h: int = 12, m: int = 0, s: int = 0) -> int:
    return to_ns(datetime(2024, mo, d, h, m, s, tzinfo=SH))


def test_parse_month_and_window() -> None:
    assert parse_month("2024-03") == MARCH
    for bad in ("2024-3", "2024-13", "202403", "March", "2024-03-01"):
        with pytest.raises(ValueError, match="YYYY-MM"):
            parse_month(bad)
    start, end = month_window(MARCH, SH)
    assert (start, end) == (_at(3, 1, 0), _at(4, 1, 0))
    dec = month_window(date(2024, 12, 1), SH)
    assert dec[1] == to_ns(datetime(2025, 1, 1, tzinfo=SH))


class Dorm(msgspec.Struct, frozen=True):
    ledger: int
    acc: dict[str, int]
    ids: dict[str, uuid.UUID]


@pytest.fixture(scope="module")
async def dorm(engine: Engine) -> Dorm:
    ledger = 500_000 + Ids().ledger()
    names = ["bank", "fund", "alice", "alice_sub", "bob", "bob_sub", "r101", "r102", "water",
             "power", "canteen"]
    acc = {n: 4_000_000_000 + ledger * 100 + i for i, n in enumerate(names)}
    kinds = {"bank": AccountKind.CLEARING, "fund": AccountKind.FUND,
             "alice": AccountKind.PURSE, "alice_sub": AccountKind.SUBSIDY,
             "bob": AccountKind.PURSE, "bob_sub": AccountKind.SUBSIDY,
             "r101": AccountKind.ROOM, "r102": AccountKind.ROOM,
             "water": AccountKind.UTILITY, "power": AccountKind.UTILITY,
             "canteen": AccountKind.MERCHANT}
    plan = [  # name, debit, credit, amount, code, when
        ("top", "bank", "alice", 10_000, 4, _at(2, 29, 23, 59, 59)),
        ("feb_power", "alice", "r101", 1_000, 3, _at(2, 29, 22)),
        ("shower1", "alice", "water", 300, 2, _at(3, 1, 0, 0, 1)),
        ("bob_top", "bank", "bob", 5_000, 4, _at(3, 2)),
        ("bob_power", "bob", "r102", 800, 3, _at(3, 3)),
        ("subsidy", "fund", "alice_sub", 2_000, 5, _at(3, 5, 9)),
        ("shower2", "alice_sub", "water", 150, 2, _at(3, 5, 21)),
        ("meal", "alice", "canteen", 500, 1, _at(3, 6)),
        ("buy", "alice", "r101", 2_000, 3, _at(3, 10)),
        ("use1", "r101", "power", 700, 3, _at(3, 11)),
        ("use1_back", "power", "r101", 100, 7, _at(3, 12)),
        ("own", "alice", "alice_sub", 100, 8, _at(3, 15)),
        ("shower1_back", "water", "alice", 300, 7, _at(3, 20)),
        ("bob_use", "r102", "power", 800, 3, _at(3, 25)),
        ("use2", "r101", "power", 400, 3, _at(3, 31, 23, 59, 59)),
        ("april", "r101", "power", 50, 3, _at(4, 1, 0, 0, 1)),
    ]
    plan.sort(key=lambda p: p[5])
    transfers = [
        LoadTransfer(id=uuid.uuid4(), debit_account_id=acc[d], credit_account_id=acc[c],
                     amount=a, code=code, timestamp=ts)
        for _, d, c, a, code, ts in plan
    ]
    async with engine.store.pool.acquire() as conn:
        await load_ledger(
            conn, ledger, [LoadAccount(id=acc[n], kind=kinds[n], name=n) for n in names],
            transfer_rows(ledger, transfers), created_at=_at(2, 1),
        )
        # the campus layer's rows for these accounts (what POST /v1/holders and /v1/rooms keep)
        await conn.executemany(
            "INSERT INTO holders (ledger, id, name, kind, purse_account_id, "
            "subsidy_account_id, created_at) VALUES ($1, $2, $3, 'student', $4, $5, 0)",
            [(ledger, "S-ALICE", "Alice", acc["alice"], acc["alice_sub"]),
             (ledger, "S-BOB", "Bob", acc["bob"], acc["bob_sub"])],
        )
        await conn.executemany(
            "INSERT INTO rooms (ledger, room_id, account_id, created_at) VALUES ($1, $2, $3, 0)",
            [(ledger, "101", acc["r101"]), (ledger, "102", acc["r102"])],
        )
    return Dorm(ledger=ledger, acc=acc,
                ids={p[0]: t.id for p, t in zip(plan, transfers, strict=True)})


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _lines(s: Subject) -> list[tuple[str, str, int, int | None]]:
    return [(i.item, i.transfer_id, i.amount, i.balance) for i in s.items]


async def _statement(engine: Engine, dorm: Dorm, **kw: Any) -> MonthStatement:
    return await monthly_statement(
        engine.store.pool, MARCH, ledger=dorm.ledger, tz=SH, **kw
    )


async def test_room_statement(engine: Engine, dorm: Dorm) -> None:
    st = await _statement(engine, dorm, room="101")
    assert st.holders == [] and st.ok
    (room,) = st.rooms
    i = {k: str(v) for k, v in dorm.ids.items()}
    assert (room.label, room.opening, room.closing) == ("room:101", 1_000, 2_000)
    assert _lines(room) == [
        ("purchase", i["buy"], 2_000, 3_000),
        ("consumption", i["use1"], -700, 2_300),
        ("reversal", i["use1_back"], 100, 2_400),
        ("consumption", i["use2"], -400, 2_000),  # 23:59:59 on the 31st; not April's
    ]


async def test_holder_statement(engine: Engine, dorm: Dorm) -> None:
    st = await _statement(engine, dorm, holder="S-ALICE")
    assert st.rooms == [] and st.ok
    (alice,) = st.holders
    i = {k: str(v) for k, v in dorm.ids.items()}
    # purse 10,000 - 1,000 (February's electricity); the 23:59:59 top-up is February's
    assert (alice.label, alice.opening, alice.closing) == ("holder:S-ALICE", 9_000, 8_350)
    assert _lines(alice) == [
        ("hot_water", i["shower1"], -300, None),  # 00:00:01 on the 1st: March's
        ("hot_water", i["shower2"], -150, None),  # from the subsidy purse
        ("electricity", i["buy"], -2_000, None),
        ("reversal", i["shower1_back"], 300, None),
    ]
    assert alice.other == 2_000 - 500  # the subsidy and the meal; purse-to-purse nets out


async def test_everyone_in_the_ledger_and_the_files(
    engine: Engine, dorm: Dorm, tmp_path: Path
) -> None:
    st = await _statement(engine, dorm, out=tmp_path)
    assert st.ok
    assert [s.label for s in st.rooms] == ["room:101", "room:102"]
    assert [s.label for s in st.holders] == ["holder:S-ALICE", "holder:S-BOB"]
    bob = st.holders[1]
    assert (bob.opening, bob.total("electricity"), bob.other, bob.closing) == (0, -800, 5_000,
                                                                               4_200)
    r102 = st.rooms[1]
    assert (r102.opening, r102.total("purchase"), r102.total("consumption"), r102.closing) == (
        0, 800, -800, 0)
    assert st.files == [tmp_path / "statement-rooms-2024-03.csv",
                        tmp_path / "statement-holders-2024-03.csv"]
    rows = _read(st.files[0])
    assert [(r["subject"], r["item"], r["amount_fen"], r["balance_fen"]) for r in rows] == [
        ("room:101", "opening", "", "1000"),
        ("room:101", "purchase", "2000", "3000"),
        ("room:101", "consumption", "-700", "2300"),
        ("room:101", "reversal", "100", "2400"),
        ("room:101", "consumption", "-400", "2000"),
        ("room:101", "closing", "", "2000"),
        ("room:102", "opening", "", "0"),
        ("room:102", "purchase", "800", "800"),
        ("room:102", "consumption", "-800", "0"),
        ("room:102", "closing", "", "0"),
    ]
    assert rows[4]["time"] == "2024-03-31T23:59:59.000000+08:00"
    hrows = _read(st.files[1])
    assert [(r["subject"], r["item"], r["amount_fen"]) for r in hrows if r["subject"].endswith(
        "BOB")] == [("holder:S-BOB", "opening", ""), ("holder:S-BOB", "electricity", "-800"),
                    ("holder:S-BOB", "other", "5000"), ("holder:S-BOB", "closing", "")]
    # a snapshot taken now (after the month) is used the other way round: same statements
    await engine.store.snapshot(dorm.ledger)
    again = await _statement(engine, dorm)
    assert [(s.opening, s.closing, s.items, s.other) for s in (*again.rooms, *again.holders)] == [
        (s.opening, s.closing, s.items, s.other) for s in (*st.rooms, *st.holders)
    ]


async def test_unknown_subjects(engine: Engine, dorm: Dorm) -> None:
    with pytest.raises(UnknownSubject, match="room '999' not found"):
        await _statement(engine, dorm, room="999")
    with pytest.raises(UnknownSubject, match="holder 'nobody' not found"):
        await _statement(engine, dorm, holder="nobody")


def _cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ONECARD_TZ": "Asia/Shanghai"}
    return subprocess.run(
        [sys.executable, "-c", CLI, "statement", *args, "--dsn", dsn],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False, env=env,
    )


async def test_cli_statement(dorm: Dorm, dsn: str, tmp_path: Path) -> None:
    r = await asyncio.to_thread(
        _cli, dsn, "--month", "2024-03", "--room", "101", "--ledger", str(dorm.ledger),
        "--out", str(tmp_path),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Electricity by room, 2024-03" in r.stdout and "20.00" in r.stdout
    assert os.listdir(tmp_path) == ["statement-rooms-2024-03.csv"]
    bad = await asyncio.to_thread(_cli, dsn, "--month", "2024-3")
    assert bad.returncode == 2 and "YYYY-MM" in bad.stderr
    both = await asyncio.to_thread(_cli, dsn, "--month", "2024-03", "--room", "1", "--holder",
                                   "2")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    gone = await asyncio.to_thread(_cli, dsn, "--month", "2024-03", "--holder", "nobody",
                                   "--ledger", str(dorm.ledger), "--out", str(tmp_path))
    assert gone.returncode == 2 and "holder 'nobody' not found" in gone.stderr
    assert "Traceback" not in bad.stderr + both.stderr + gone.stderr

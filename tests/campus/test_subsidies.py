"""Subsidies: the file format, idempotent crediting (library and the real ``onecard subsidy``
command in a subprocess), and the month-end clear-down, on a real PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from engine.campus import Campus, Card, HolderKind, HolderResult
from engine.campus.accounts import fund_account_id, holder_account_ids
from engine.campus.subsidies import (
    FileError,
    Grant,
    clear_down,
    grant_subsidies,
    grant_transfer_id,
    read_grants,
)
from engine.cli.campus import SUBSIDY
from engine.service import Engine
from ledger.account import Account
from ledger.status import TransferStatus
from ledger.transfer import Transfer
from ledger.types import AccountKind, TransferCode
from tests.conftest import Ids

ROOT = Path(__file__).resolve().parents[2]


async def _holders(engine: Engine, ledger: int, *hids: str) -> None:
    campus = Campus(engine)
    for hid in hids:
        r = await campus.create_holder(holder_id=hid, ledger=ledger, name=hid,
                                       kind=HolderKind.STUDENT)
        assert isinstance(r, HolderResult)


async def _available(engine: Engine, account: int) -> int:
    rec = await engine.store.get_account(account)
    assert rec is not None
    return rec.state.available


async def _subsidy(engine: Engine, ledger: int, hid: str) -> int:
    return await _available(engine, holder_account_ids(ledger, hid)[1])


# -- the file ------------------------------------------------------------------------------------


def test_read_grants() -> None:
    data = b"holder_id,name,amount_fen\nS1,Li,15000\n S2 ,Wang, 12000\n"
    batch, grants = read_grants(data, ledger=7, batch_id=None)
    assert batch.startswith("file-") and len(batch) == 21
    assert grants == [Grant(7, "S1", 15_000, batch), Grant(7, "S2", 12_000, batch)]
    assert read_grants(data, ledger=7, batch_id=None)[0] == batch  # derived from the content
    assert read_grants(data + b"S3,Z,1\n", ledger=7, batch_id=None)[0] != batch
    assert read_grants(data, ledger=7, batch_id="2026-05")[0] == "2026-05"
    per_row = b"\xef\xbb\xbfledger,holder_id,amount_fen\n8,S1,100\n,S1,200\n"  # BOM, blank cell
    _, grants = read_grants(per_row, ledger=9, batch_id="b")
    assert grants == [Grant(8, "S1", 100, "b"), Grant(9, "S1", 200, "b")]


@pytest.mark.parametrize(
    ("data", "ledger", "message"),
    [
        (b"holder,amount_fen\nS1,1\n", 1, "lacks holder_id"),
        (b"holder_id,amount_fen\nS1,1\n", None, "give --ledger"),
        (b"holder_id,amount_fen\nS1,0\n", 1, "line 2: amount_fen"),
        (b"holder_id,amount_fen\nS1,1.5\n", 1, "amount_fen"),
        (b"holder_id,amount_fen\nS1,-3\n", 1, "amount_fen"),
        (b"holder_id,amount_fen\n,3\n", 1, "holder_id"),
        (b"holder_id,amount_fen\nS1,1\nS2,1\nS1,2\n", 1, "line 4: holder 'S1' appears twice"),
        (b"holder_id,amount_fen,ledger\nS1,1,x\n", 1, "bad ledger"),
        (b"holder_id,amount_fen\nS1,1\n\xff\n", 1, "not UTF-8"),
    ],
)
def test_read_grants_refuses_bad_files(data: bytes, ledger: int | None, message: str) -> None:
    with pytest.raises(FileError, match=message):
        read_grants(data, ledger=ledger, batch_id=None)


@pytest.mark.parametrize(
    ("data", "batch_id", "message"),
    [
        # "\u00b2".isdigit() is True and int() refuses it: a traceback, not a FileError
        ("holder_id,amount_fen\nS1,\u00b2\n", None, "line 2: amount_fen"),
        # int() reads Arabic-Indic digits: this credited 100 fen
        ("holder_id,amount_fen\nS1,\u0661\u0660\u0660\n", None, "line 2: amount_fen"),
        ("holder_id,amount_fen,ledger\nS1,1,\u0667\n", None, "bad ledger"),
        # PostgreSQL text cannot hold U+0000: it would fail the batch the grants go to
        ("holder_id,amount_fen\nS\x001,1\n", None, "line 2: holder_id"),
        ("holder_id,amount_fen\nS1,1\n", "b\x00", "U\\+0000"),
        # "subsidy " + 63 four-byte characters is 260 bytes of user_data: more than 256
        ("holder_id,amount_fen\nS1,1\n", "\U0001f35a" * 63, "bytes"),
    ],
)
def test_read_grants_refuses_what_cannot_be_posted(
    data: str, batch_id: str | None, message: str
) -> None:
    with pytest.raises(FileError, match=message):
        read_grants(data.encode(), ledger=1, batch_id=batch_id)
    assert read_grants(b"holder_id,amount_fen\nS1,1\n", ledger=1,
                       batch_id="\U0001f35a" * 62)[1][0].amount == 1  # 256 bytes: fits


# -- crediting -----------------------------------------------------------------------------------


async def test_a_grant_that_cannot_be_posted_stops_everything_before_it_starts(
    engine: Engine, ids: Ids
) -> None:
    """Checked for every grant before any is submitted (or the fund account created): one
    batch id PostgreSQL refuses would fail the whole group-committed batch."""
    ledger = ids.ledger()
    await _holders(engine, ledger, "S1", "S2")
    grants = [Grant(ledger, "S1", 100, "ok"), Grant(ledger, "S2", 100, "bad\x00")]
    with pytest.raises(ValueError, match="grant 1"):
        await grant_subsidies(engine, grants)
    async with engine.store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM transfers WHERE ledger = $1", ledger) \
            == 0
        # the fund was created with the holders (never by a subsidy); the grant added nothing
        assert await conn.fetchval(
            "SELECT count(*) FROM accounts WHERE ledger = $1 AND kind = 'fund'", ledger) == 1


async def test_grants_credit_once(engine: Engine, ids: Ids) -> None:
    ledger = ids.ledger()
    await _holders(engine, ledger, "S1", "S2")
    grants = [Grant(ledger, "S1", 15_000, "may"), Grant(ledger, "S2", 9_000, "may"),
              Grant(ledger, "ghost", 1, "may")]
    seen: list[int] = []
    first = await grant_subsidies(engine, grants, on_progress=seen.append)
    assert [r.status for r in first] == ["created", "created", "holder_not_found"]
    assert seen == [3]
    again = await grant_subsidies(engine, grants)
    assert [r.status for r in again] == ["exists", "exists", "holder_not_found"]
    assert [r.id for r in again] == [grant_transfer_id(ledger, "may", h) for h in
                                     ("S1", "S2", "ghost")]
    assert await _subsidy(engine, ledger, "S1") == 15_000
    fund = await engine.store.get_account(fund_account_id(ledger))
    assert fund is not None and fund.state.kind is AccountKind.FUND
    assert fund.state.balance == 24_000  # debit-normal: what the fund has paid out
    rec = await engine.store.get_transfer(first[0].id)
    assert rec is not None and rec.transfer.code == TransferCode.SUBSIDY
    june = await grant_subsidies(engine, [Grant(ledger, "S1", 15_000, "june")])
    assert june[0].status == "created" and await _subsidy(engine, ledger, "S1") == 30_000


async def test_many_grants_go_in_chunks(engine: Engine, ids: Ids) -> None:
    ledger = ids.ledger()
    hids = [f"B{i:04d}" for i in range(1_100)]
    await _holders(engine, ledger, *hids[:3])  # the rest are unknown: exercised, not credited
    seen: list[int] = []
    results = await grant_subsidies(engine, [Grant(ledger, h, 10, "x") for h in hids],
                                    on_progress=seen.append)
    assert seen == [1_000, 100]
    assert sum(r.ok for r in results) == 3 and len(results) == 1_100


async def _onecard(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from engine.cli import main; sys.exit(main())",
        *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_run_twice_credits_once(engine: Engine, dsn: str, ids: Ids,
                                          tmp_path: Path) -> None:
    ledger = ids.ledger()
    await _holders(engine, ledger, "S1", "S2")
    f = tmp_path / "may.csv"
    f.write_text("holder_id,amount_fen\nS1,15000\nS2,12000\n")
    code, out, _ = await _onecard("subsidy", "--dsn", dsn, "--file", str(f), "--ledger",
                                  str(ledger))
    assert code == 0, out
    assert "created" in out and "27000" in out
    code, out, _ = await _onecard("subsidy", "--dsn", dsn, "--file", str(f), "--ledger",
                                  str(ledger))
    assert code == 0 and "exists" in out and "created" not in out
    assert await _subsidy(engine, ledger, "S1") == 15_000
    assert await _subsidy(engine, ledger, "S2") == 12_000

    f.write_text("holder_id,amount_fen\nS1,100\nnobody,100\n")
    code, out, _ = await _onecard("subsidy", "--dsn", dsn, "--file", str(f), "--ledger",
                                  str(ledger), "--batch-id", "bonus")
    assert code == 1 and "holder_not_found" in out
    assert await _subsidy(engine, ledger, "S1") == 15_100
    f.write_text("holder_id,amount_fen\nS1,abc\n")
    code, _, err = await _onecard("subsidy", "--dsn", dsn, "--file", str(f), "--ledger",
                                  str(ledger))
    assert code == 2 and "amount_fen" in err
    code, _, err = await _onecard("subsidy", "--dsn", dsn)
    assert code == 2 and "--file" in err


# -- clear-down ----------------------------------------------------------------------------------


def this_month() -> str:
    """The current campus-local month, YYYY-MM."""
    return datetime.now(UTC).astimezone(ZoneInfo("Asia/Shanghai")).strftime("%Y-%m")


async def test_clear_down_returns_unused_subsidy_once(engine: Engine, ids: Ids) -> None:
    ledger = ids.ledger()
    await _holders(engine, ledger, "S1", "S2", "S3", "S4")
    await grant_subsidies(engine, [Grant(ledger, h, 10_000, "m") for h in ("S1", "S2", "S3")])
    water = ids.account()
    assert (await engine.store.create_accounts(
        [Account(id=water, ledger=ledger, kind=AccountKind.UTILITY, code=2)]))[0] == "created"
    s1, s2 = holder_account_ids(ledger, "S1")[1], holder_account_ids(ledger, "S2")[1]
    st = await engine.batcher.submit([
        Transfer(id=uuid.uuid4(), ledger=ledger, debit_account_id=s1, credit_account_id=water,
                 amount=2_500, code=1),
        Transfer(id=uuid.uuid4(), ledger=ledger, debit_account_id=s2, credit_account_id=water,
                 amount=4_000, code=2, flags=("pending",), timeout_s=600),  # a hold: not free
    ])
    assert [r.status for r in st] == [TransferStatus.CREATED] * 2
    month = this_month()

    # last month ended before any of this was granted: nothing of it is unused subsidy
    y, m = map(int, month.split("-"))
    previous = f"{y - (m == 1)}-{(m - 2) % 12 + 1:02d}"
    assert await clear_down(engine, ledger, previous) == []

    results = await clear_down(engine, ledger, month)
    by_holder = {r.holder_id: (r.amount, r.status) for r in results}
    assert by_holder == {"S1": (7_500, "created"), "S2": (6_000, "created"),
                         "S3": (10_000, "created")}  # S4 has nothing: left out
    assert [await _subsidy(engine, ledger, h) for h in ("S1", "S2", "S3")] == [0, 0, 0]
    fund = await engine.store.get_account(fund_account_id(ledger))
    assert fund is not None and fund.state.balance == 30_000 - 23_500
    rec = await engine.store.get_transfer(results[0].id)
    assert rec is not None and rec.transfer.code == TransferCode.SUBSIDY

    # a second run for the month returns nothing twice, even after new subsidy arrived
    await grant_subsidies(engine, [Grant(ledger, "S1", 500, "late")])
    again = await clear_down(engine, ledger, month)
    assert sorted((r.holder_id, r.amount, r.status) for r in again) == [
        ("S1", 7_500, "exists"), ("S2", 6_000, "exists"), ("S3", 10_000, "exists")]
    assert await _subsidy(engine, ledger, "S1") == 500

    with pytest.raises(ValueError, match="has not begun"):
        await clear_down(engine, ledger, f"{y + 1}-{m:02d}")
    with pytest.raises(ValueError, match="YYYY-MM"):
        await clear_down(engine, ledger, "2026-13")


async def test_clear_down_command(engine: Engine, dsn: str, ids: Ids,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    ledger = ids.ledger()
    await _holders(engine, ledger, "S1", "S2")
    await grant_subsidies(engine, [Grant(ledger, h, 3_000, "m") for h in ("S1", "S2")])
    # a lost card's frozen purse cannot be debited: reported, and the command says so
    campus = Campus(engine)
    card = "6200" + uuid.uuid4().hex[:12].translate(str.maketrans("abcdef", "123456"))
    assert isinstance(await campus.create_card(card_no=card, holder_id="S2", ledger=ledger),
                      Card)
    assert isinstance(await campus.report_lost(card), Card)
    month = this_month()
    args = argparse.Namespace(file=None, clear_down=True, month=month, ledger=ledger,
                              batch_id=None, tz="Asia/Shanghai")
    assert await SUBSIDY.run(args, dsn) == 1
    out = capsys.readouterr().out
    assert "created" in out and "debit_account_frozen" in out
    assert await _subsidy(engine, ledger, "S1") == 0
    assert await _subsidy(engine, ledger, "S2") == 3_000
    bad = argparse.Namespace(file=None, clear_down=True, month=None, ledger=ledger,
                             batch_id=None, tz="Asia/Shanghai")
    assert await SUBSIDY.run(bad, dsn) == 2

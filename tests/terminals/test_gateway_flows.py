"""Every terminal flow over real TCP: TerminalClient -> Gateway -> the real Campus -> the real
batcher and PostgreSQL. Balances are always read back from the ledger."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import msgspec
import pytest

from engine.campus import (
    Campus,
    Card,
    HolderKind,
    HolderResult,
    Outcome,
    RegistryStatus,
    Room,
    TerminalKind,
)
from engine.campus.accounts import holder_account_ids
from engine.service import Engine
from ledger.account import Account
from ledger.status import AccountStatus, TransferStatus
from ledger.transfer import Transfer
from ledger.types import AccountKind, TransferCode
from terminals.client import ConnectionClosedError, TerminalClient
from terminals.gateway import Gateway
from terminals.iso8583 import (
    Message,
    decode_message,
    encode_message,
    parse_amounts,
)
from terminals.operations import message_key, response_code_for
from tests.conftest import Ids

SHANGHAI = ZoneInfo("Asia/Shanghai")


def blocks(ans: Message) -> dict[str, int]:
    """Field 54 as {account type: signed amount}; also checks the fixed parts of each block."""
    assert ans.additional_amounts is not None
    out: dict[str, int] = {}
    for b in parse_amounts(ans.additional_amounts):
        assert (b.amount_type, b.currency) == ("02", "156")
        out[b.account_type] = b.amount
    return out


def assert_local_now(ans: Message, zone: ZoneInfo) -> None:
    """Fields 13 + 12 of ``ans`` are the current wall time in ``zone`` (within seconds)."""
    assert ans.local_date is not None and ans.local_time is not None
    now = datetime.now(zone)
    stamp = datetime.strptime(f"{now.year}{ans.local_date}{ans.local_time}", "%Y%m%d%H%M%S")
    assert abs(stamp - now.replace(tzinfo=None)) < timedelta(seconds=5)


class Person(msgspec.Struct):
    holder: str
    card: str
    purse: int
    subsidy: int
    pin: str | None = None


class World:
    """A fresh ledger: bank, fund, canteen, water and power accounts, terminals of every kind."""

    def __init__(self, engine: Engine, campus: Campus, gateway: Gateway, ids: Ids) -> None:
        self.engine = engine
        self.campus = campus
        self.gateway = gateway
        self.ledger = ids.ledger()
        self.bank, self.fund, self.canteen, self.water_acc, self.power_acc = ids.accounts(5)
        self.key = secrets.token_bytes(32)
        self.clients: list[TerminalClient] = []

    async def setup(self) -> World:
        st = await self.engine.store.create_accounts([
            Account(id=self.bank, ledger=self.ledger, kind=AccountKind.CLEARING, code=1),
            Account(id=self.fund, ledger=self.ledger, kind=AccountKind.FUND, code=1),
            Account(id=self.canteen, ledger=self.ledger, kind=AccountKind.MERCHANT, code=1),
            Account(id=self.water_acc, ledger=self.ledger, kind=AccountKind.UTILITY, code=2),
            Account(id=self.power_acc, ledger=self.ledger, kind=AccountKind.UTILITY, code=3),
        ])
        assert st == [AccountStatus.CREATED] * 5
        self.pos = await self.terminal(TerminalKind.POS, self.canteen)
        self.water = await self.terminal(TerminalKind.WATER, self.water_acc)
        self.kiosk = await self.terminal(TerminalKind.KIOSK, self.power_acc)
        self.meter = await self.terminal(TerminalKind.METER, self.power_acc)
        return self

    async def terminal(self, kind: TerminalKind, account: int) -> TerminalClient:
        tid = "G" + secrets.token_hex(4)[:7].upper()
        mid = "M" + tid + "000000"
        st = await self.campus.register_terminal(
            terminal_id=tid, merchant_id=mid, ledger=self.ledger, kind=kind,
            account_id=account, mac_key=self.key,
        )
        assert st is RegistryStatus.CREATED
        return await self.client(tid, mid, self.key)

    async def client(self, tid: str, mid: str, key: bytes) -> TerminalClient:
        c = TerminalClient("127.0.0.1", self.gateway.port, terminal_id=tid, merchant_id=mid,
                           mac_key=key, timeout_s=10)
        await c.connect()
        self.clients.append(c)
        return c

    async def person(self, *, cash: int = 0, subsidy: int = 0, **card: int | str | None) -> Person:
        holder = "S" + secrets.token_hex(5)
        r = await self.campus.create_holder(holder_id=holder, ledger=self.ledger, name=holder,
                                            kind=HolderKind.STUDENT)
        assert isinstance(r, HolderResult)
        card_no = "66" + "".join(secrets.choice("0123456789") for _ in range(14))
        c = await self.campus.create_card(card_no=card_no, holder_id=holder, ledger=self.ledger,
                                          **card)  # type: ignore[arg-type]
        assert isinstance(c, Card)
        purse, sub = holder_account_ids(self.ledger, holder)
        if cash:
            await self.post(self.bank, purse, cash, TransferCode.TOP_UP)
        if subsidy:
            await self.post(self.fund, sub, subsidy, TransferCode.SUBSIDY)
        return Person(holder, card_no, purse, sub, card.get("pin"))  # type: ignore[arg-type]

    async def room(self, balance: int = 0) -> Room:
        room = await self.campus.create_room(room_id="R" + secrets.token_hex(5),
                                             ledger=self.ledger)
        assert isinstance(room, Room)
        if balance:
            await self.post(self.bank, room.account_id, balance, TransferCode.TOP_UP)
        return room

    async def post(self, debit: int, credit: int, amount: int, code: int) -> None:
        [r] = await self.engine.batcher.submit([Transfer(
            id=uuid.uuid4(), ledger=self.ledger, debit_account_id=debit,
            credit_account_id=credit, amount=amount, code=code)])
        assert r.status is TransferStatus.CREATED

    async def available(self, account: int) -> int:
        rec = await self.engine.store.get_account(account)
        assert rec is not None
        return rec.state.available

    async def balance(self, account: int) -> int:
        rec = await self.engine.store.get_account(account)
        assert rec is not None
        return rec.state.balance

    async def purses(self, p: Person) -> tuple[int, int]:
        """(cash available, subsidy available)."""
        return await self.available(p.purse), await self.available(p.subsidy)

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


@pytest.fixture(scope="module")
async def campus(engine: Engine) -> Campus:
    return Campus(engine)


@pytest.fixture(scope="module")
async def gateway(engine: Engine, campus: Campus) -> AsyncIterator[Gateway]:
    gw = Gateway(engine, campus=campus)
    await gw.start("127.0.0.1", 0)
    yield gw
    await gw.stop()


@pytest.fixture
async def w(engine: Engine, campus: Campus, gateway: Gateway, ids: Ids) -> AsyncIterator[World]:
    world = await World(engine, campus, gateway, ids).setup()
    yield world
    await world.close()


# ---------------------------------------------------------------------------------------


def test_every_outcome_has_a_response_code() -> None:
    expected = {
        Outcome.APPROVED: "00", Outcome.INSUFFICIENT_FUNDS: "51", Outcome.LOST_CARD: "41",
        Outcome.CARD_NOT_ACTIVE: "62", Outcome.INVALID_CARD: "14", Outcome.INCORRECT_PIN: "55",
        Outcome.PIN_TRIES_EXCEEDED: "75",
        Outcome.DAILY_LIMIT_EXCEEDED: "61", Outcome.INVALID_AMOUNT: "13",
        Outcome.ORIGINAL_NOT_FOUND: "25", Outcome.INVALID_TRANSACTION: "12",
        Outcome.DUPLICATE_DIFFERENT: "94", Outcome.OVERLOADED: "96", Outcome.UNAVAILABLE: "96",
    }
    assert {o: response_code_for(o) for o in Outcome} == expected


async def test_sign_on(w: World) -> None:
    for c in (w.pos, w.water, w.kiosk, w.meter):
        ans = await c.request(c.sign_on())
        assert ans.mti == "0810" and ans.response_code == "00"


async def test_purchase_approved(w: World) -> None:
    p = await w.person(cash=10_000)
    req = w.pos.purchase(p.card, 1_250)
    ans = await w.pos.request(req)
    assert ans.mti == "0210" and ans.response_code == "00"
    assert ans.rrn is not None and len(ans.rrn) == 12 and ans.rrn.isalnum()
    assert ans.auth_id is not None and len(ans.auth_id) == 6
    assert (ans.stan, ans.transmission_dt, ans.amount, ans.card_no) == (
        req.stan, req.transmission_dt, 1_250, p.card)
    assert blocks(ans) == {"00": 8_750, "10": 8_750, "20": 0}
    # fields 12/13 are campus-local (Shanghai) time of the posting
    assert_local_now(ans, SHANGHAI)
    assert await w.purses(p) == (8_750, 0)
    assert await w.balance(w.canteen) == 1_250


async def test_subsidy_first_split(w: World) -> None:
    p = await w.person(cash=1_000, subsidy=500)
    ans = await w.pos.request(w.pos.purchase(p.card, 800))
    assert ans.response_code == "00"
    assert blocks(ans) == {"00": 700, "10": 700, "20": 0}
    assert await w.purses(p) == (700, 0)
    # all from subsidy when it suffices
    await w.post(w.fund, p.subsidy, 1_000, TransferCode.SUBSIDY)
    ans = await w.pos.request(w.pos.purchase(p.card, 300))
    assert blocks(ans) == {"00": 1_400, "10": 700, "20": 700}
    assert await w.balance(w.canteen) == 1_100


async def test_insufficient_funds_moves_nothing(w: World) -> None:
    p = await w.person(cash=300, subsidy=200)
    ans = await w.pos.request(w.pos.purchase(p.card, 501))
    assert ans.response_code == "51" and ans.auth_id is None
    assert await w.purses(p) == (300, 200)
    assert await w.balance(w.canteen) == 0


async def test_balance_inquiry(w: World) -> None:
    p = await w.person(cash=4_200, subsidy=1_300)
    ans = await w.pos.request(w.pos.inquiry(p.card))
    assert ans.response_code == "00" and ans.processing_code == "310000"
    assert blocks(ans) == {"00": 5_500, "10": 4_200, "20": 1_300}
    assert await w.purses(p) == (4_200, 1_300)


async def test_unknown_card_is_14(w: World) -> None:
    ans = await w.pos.request(w.pos.purchase("6600000000000001", 100))
    assert ans.response_code == "14"


async def test_retransmission_gets_identical_answer_and_posts_once(
    w: World, engine: Engine, campus: Campus
) -> None:
    p = await w.person(cash=5_000)
    req = w.pos.purchase(p.card, 1_000)
    first = await w.pos.request(req)
    assert first.response_code == "00"
    await w.pos.request(w.pos.purchase(p.card, 500))  # balances move on meanwhile
    again = await w.pos.request(req)
    assert again == first  # same RRN, same field 54 (the balance *then*), same 12/13
    # from another connection too, and from a new gateway process after a restart
    other = await w.client(w.pos.terminal_id, w.pos.merchant_id, w.key)
    assert await other.request(req) == first
    gw2 = Gateway(engine, campus=Campus(engine))
    await gw2.start("127.0.0.1", 0)
    try:
        async with TerminalClient("127.0.0.1", gw2.port, terminal_id=w.pos.terminal_id,
                                  merchant_id=w.pos.merchant_id, mac_key=w.key) as c:
            assert await c.request(req) == first
    finally:
        await gw2.stop()
    assert await w.purses(p) == (3_500, 0)
    assert await w.balance(w.canteen) == 1_500


async def test_declined_answer_is_remembered_too(w: World) -> None:
    p = await w.person(cash=100)
    req = w.pos.purchase(p.card, 200)
    first = await w.pos.request(req)
    assert first.response_code == "51" and first.rrn is not None
    await w.post(w.bank, p.purse, 1_000, TransferCode.TOP_UP)  # now it would pass
    assert await w.pos.request(req) == first  # still the same 51: nothing posted
    assert await w.purses(p) == (1_100, 0)


async def test_same_key_different_content_is_94(w: World) -> None:
    p = await w.person(cash=5_000)
    req = w.pos.purchase(p.card, 1_000)
    first = await w.pos.request(req)
    assert first.response_code == "00"
    changed = msgspec.structs.replace(req, amount=2_000)
    ans = await w.pos.request(changed)
    assert ans.response_code == "94" and ans.rrn is None
    # also when the first answer was a decline (nothing posted under the key)
    q = await w.person(cash=100)
    req = w.pos.purchase(q.card, 200)
    assert (await w.pos.request(req)).response_code == "51"
    ans = await w.pos.request(msgspec.structs.replace(req, amount=50))
    assert ans.response_code == "94"
    assert await w.purses(p) == (4_000, 0)
    assert await w.purses(q) == (100, 0)
    assert await w.balance(w.canteen) == 1_000


async def test_concurrent_copies_post_once(w: World) -> None:
    p = await w.person(cash=5_000)
    req = w.pos.purchase(p.card, 700)
    clients = [await w.client(w.pos.terminal_id, w.pos.merchant_id, w.key) for _ in range(5)]
    answers = await asyncio.gather(*(c.request(req) for c in clients))
    assert all(a == answers[0] for a in answers) and answers[0].response_code == "00"
    assert await w.purses(p) == (4_300, 0)


async def test_reversal_after_original(w: World) -> None:
    p = await w.person(cash=5_000, subsidy=300)
    original = w.pos.purchase(p.card, 1_000)
    assert (await w.pos.request(original)).response_code == "00"
    assert await w.purses(p) == (4_300, 0)
    rev = w.pos.reversal(original)
    ans = await w.pos.request(rev)
    assert ans.mti == "0410" and ans.response_code == "00" and ans.rrn is not None
    assert ans.original_data == rev.original_data
    assert await w.purses(p) == (5_000, 300)
    assert await w.balance(w.canteen) == 0
    assert await w.pos.request(rev) == ans  # remembered
    again = await w.pos.request(w.pos.reversal(original))  # a second reversal: no more money
    assert again.response_code == "00"
    assert await w.purses(p) == (5_000, 300)


async def test_reversal_before_original(w: World) -> None:
    p = await w.person(cash=5_000)
    original = w.pos.purchase(p.card, 1_000)
    rev = w.pos.reversal(original)
    assert (await w.pos.request(rev)).response_code == "00"
    ans = await w.pos.request(original)  # the original arrives late
    assert ans.response_code == "00"
    assert await w.purses(p) == (5_000, 0)
    assert await w.balance(w.canteen) == 0


async def test_reversal_racing_original(w: World) -> None:
    p = await w.person(cash=50_000)
    other = await w.client(w.pos.terminal_id, w.pos.merchant_id, w.key)
    for _ in range(10):
        original = w.pos.purchase(p.card, 100)
        a, b = await asyncio.gather(w.pos.request(original),
                                    other.request(w.pos.reversal(original)))
        assert (a.response_code, b.response_code) == ("00", "00")
    assert await w.purses(p) == (50_000, 0)
    assert await w.balance(w.canteen) == 0


async def test_reversal_of_unknown_original_is_00(w: World) -> None:
    ghost = w.pos.purchase("6600000000000002", 100)
    assert (await w.pos.request(w.pos.reversal(ghost))).response_code == "00"


async def test_offline_advice_posts_past_overdraft(w: World) -> None:
    p = await w.person(cash=300, subsidy=100)
    ans = await w.pos.request(w.pos.offline_advice(p.card, 1_000))
    assert ans.mti == "0230" and ans.response_code == "00"
    assert blocks(ans) == {"00": -600, "10": -600, "20": 0}
    assert "D" in (ans.additional_amounts or "")
    assert await w.purses(p) == (-600, 0)
    assert await w.balance(w.canteen) == 1_000
    # an advice can be reversed like a purchase
    adv = w.pos.offline_advice(p.card, 200)
    assert (await w.pos.request(adv)).response_code == "00"
    assert (await w.pos.request(w.pos.reversal(adv))).response_code == "00"
    assert await w.purses(p) == (-600, 0)


async def test_offline_advice_of_a_lost_card_is_41(w: World) -> None:
    p = await w.person(cash=1_000)
    assert isinstance(await w.campus.report_lost(p.card), Card)
    ans = await w.pos.request(w.pos.offline_advice(p.card, 300))
    assert ans.response_code == "41"
    assert await w.balance(p.purse) == 1_000


async def test_hold_then_completion(w: World) -> None:
    p = await w.person(cash=2_000, subsidy=100)
    hold = w.water.hold(p.card, 500)
    ans = await w.water.request(hold)
    assert ans.mti == "0110" and ans.response_code == "00" and ans.auth_id is not None
    assert blocks(ans) == {"00": 1_600, "10": 1_600, "20": 0}
    too_much = await w.water.request(w.water.completion(hold, 501))
    assert too_much.mti == "0230" and too_much.response_code == "13"
    done = w.water.completion(hold, 320, card_no=p.card)
    ans = await w.water.request(done)
    assert ans.response_code == "00"
    assert blocks(ans) == {"00": 1_780, "10": 1_780, "20": 0}
    assert await w.purses(p) == (1_780, 0)
    assert await w.balance(w.water_acc) == 320
    assert await w.water.request(done) == ans  # retransmitted completion: identical, once
    assert await w.balance(w.water_acc) == 320


async def test_completion_of_unknown_hold_is_25(w: World) -> None:
    ghost = w.water.hold("6600000000000003", 500)
    ans = await w.water.request(w.water.completion(ghost, 100))
    assert ans.response_code == "25"


async def test_hold_expires(engine: Engine, ids: Ids) -> None:
    campus = Campus(engine, hold_timeout_s=1)
    gw = Gateway(engine, campus=campus)
    await gw.start("127.0.0.1", 0)
    w = await World(engine, campus, gw, ids).setup()
    try:
        p = await w.person(cash=1_000)
        hold = w.water.hold(p.card, 400)
        assert (await w.water.request(hold)).response_code == "00"
        assert await w.purses(p) == (600, 0)
        deadline = time.monotonic() + 10
        while await w.available(p.purse) != 1_000:
            assert time.monotonic() < deadline, "hold never expired"
            await asyncio.sleep(0.2)
        ans = await w.water.request(w.water.completion(hold, 100))
        assert ans.response_code == "25"
        assert await w.balance(p.purse) == 1_000
        assert await w.balance(w.water_acc) == 0
    finally:
        await w.close()
        await gw.stop()


async def test_electricity_purchase(w: World) -> None:
    p = await w.person(cash=3_000, subsidy=5_000)
    room = await w.room()
    req = w.kiosk.electricity_purchase(p.card, 1_200, room.room_id)
    ans = await w.kiosk.request(req)
    assert ans.response_code == "00" and ans.room_id == room.room_id
    assert blocks(ans) == {"10": 1_800, "30": 1_200}  # cash purse only, subsidy untouched
    assert await w.purses(p) == (1_800, 5_000)
    assert await w.balance(room.account_id) == 1_200
    ans = await w.kiosk.request(w.kiosk.electricity_purchase(p.card, 1_801, room.room_id))
    assert ans.response_code == "51"
    assert await w.balance(room.account_id) == 1_200


async def test_room_meter(w: World) -> None:
    room = await w.room(balance=500)
    ans = await w.meter.request(w.meter.meter_advice(room.room_id, 300))
    assert ans.mti == "0230" and ans.response_code == "00"
    assert blocks(ans) == {"30": 200}
    ans = await w.meter.request(w.meter.meter_advice(room.room_id, 200))
    assert ans.response_code == "51" and blocks(ans) == {"30": 0}
    ans = await w.meter.request(w.meter.meter_advice(room.room_id, 50))
    assert ans.response_code == "51" and blocks(ans) == {"30": -50}  # posted anyway (force)
    assert await w.balance(room.account_id) == -50
    assert await w.balance(w.power_acc) == 550


async def test_mac_failure_moves_nothing(w: World) -> None:
    p = await w.person(cash=1_000)
    req = w.pos.purchase(p.card, 400)
    raw = await w.pos.send_raw(encode_message(req, bytes(32)))
    assert raw is not None
    d = decode_message(raw)
    assert d.message.response_code == "63" and d.verify(w.key)
    assert await w.purses(p) == (1_000, 0)
    # the refusal is not remembered: the genuine message still goes through
    assert (await w.pos.request(req)).response_code == "00"
    assert await w.purses(p) == (600, 0)


async def test_unknown_terminal_is_63_without_mac(w: World) -> None:
    p = await w.person(cash=1_000)
    stranger = await w.client("ZZZZZZZZ", "M" * 15, w.key)
    raw = await stranger.send_raw(encode_message(stranger.purchase(p.card, 100), w.key))
    assert raw is not None
    d = decode_message(raw)
    assert d.message.response_code == "63" and d.mac is None
    assert await w.purses(p) == (1_000, 0)


async def test_wrong_merchant_is_03(w: World) -> None:
    p = await w.person(cash=1_000)
    liar = await w.client(w.pos.terminal_id, "X" * 15, w.key)
    ans = await liar.request(liar.purchase(p.card, 100))
    assert ans.response_code == "03"
    assert await w.purses(p) == (1_000, 0)


async def test_lost_replaced_and_closed_cards(w: World) -> None:
    p = await w.person(cash=2_000)
    assert isinstance(await w.campus.report_lost(p.card), Card)
    assert (await w.pos.request(w.pos.purchase(p.card, 100))).response_code == "41"
    new_card = "66" + "".join(secrets.choice("0123456789") for _ in range(14))
    await w.campus.replace_card(p.card, new_card)
    assert (await w.pos.request(w.pos.purchase(p.card, 100))).response_code == "62"
    ans = await w.pos.request(w.pos.purchase(new_card, 100))
    assert ans.response_code == "00" and blocks(ans)["10"] == 1_900
    await w.campus.close_card(new_card)
    assert (await w.pos.request(w.pos.purchase(new_card, 100))).response_code == "62"
    assert await w.balance(p.purse) == 1_900


async def test_daily_limit(w: World) -> None:
    p = await w.person(cash=10_000, daily_limit=1_500)
    assert (await w.pos.request(w.pos.purchase(p.card, 1_000))).response_code == "00"
    assert (await w.pos.request(w.pos.purchase(p.card, 600))).response_code == "61"
    assert (await w.pos.request(w.pos.purchase(p.card, 500))).response_code == "00"
    assert await w.balance(p.purse) == 8_500


async def test_pin(w: World) -> None:
    p = await w.person(cash=10_000, pin="4321", pin_threshold=2_000)
    assert (await w.pos.request(w.pos.purchase(p.card, 2_000))).response_code == "00"
    assert (await w.pos.request(w.pos.purchase(p.card, 2_001))).response_code == "55"
    assert (await w.pos.request(w.pos.purchase(p.card, 2_001, pin="1234"))).response_code == "55"
    assert (await w.pos.request(w.pos.purchase(p.card, 2_001, pin="4321"))).response_code == "00"
    assert await w.balance(p.purse) == 10_000 - 4_001


async def test_invalid_transactions_are_12(w: World) -> None:
    p = await w.person(cash=1_000)
    assert (await w.pos.request(w.pos.hold(p.card, 100))).response_code == "12"  # POS hold
    room = await w.room(balance=100)
    assert (await w.pos.request(w.pos.meter_advice(room.room_id, 10))).response_code == "12"
    odd = msgspec.structs.replace(w.pos.purchase(p.card, 100), processing_code="200000")
    assert (await w.pos.request(odd)).response_code == "12"
    assert await w.balance(p.purse) == 1_000
    assert await w.balance(room.account_id) == 100


async def test_zero_amount_is_13(w: World) -> None:
    p = await w.person(cash=1_000)
    assert (await w.pos.request(w.pos.purchase(p.card, 0))).response_code == "13"


async def test_overloaded_engine_answers_96_fast_and_is_not_remembered(
    w: World, engine: Engine
) -> None:
    p = await w.person(cash=1_000)
    req = w.pos.purchase(p.card, 100)
    saved = engine.batcher.max_queued
    engine.batcher.max_queued = 0
    try:
        t0 = time.perf_counter()
        ans = await w.pos.request(req)
        elapsed = time.perf_counter() - t0
    finally:
        engine.batcher.max_queued = saved
    assert ans.response_code == "96" and elapsed < 0.05
    assert await w.purses(p) == (1_000, 0)
    assert (await w.pos.request(req)).response_code == "00"  # the retry is served
    assert await w.purses(p) == (900, 0)


async def test_batcher_overloaded_inside_the_campus_is_96(w: World, engine: Engine) -> None:
    """The queue has room for one transfer, a split meal needs two: the batcher itself
    refuses (batcher.Overloaded inside the campus), past the gateway's own early check."""
    p = await w.person(cash=1_000, subsidy=100)
    req = w.pos.purchase(p.card, 300)
    saved = engine.batcher.max_queued
    engine.batcher.max_queued = 1
    try:
        t0 = time.perf_counter()
        ans = await w.pos.request(req)
        elapsed = time.perf_counter() - t0
    finally:
        engine.batcher.max_queued = saved
    assert ans.response_code == "96" and ans.rrn is None
    assert elapsed < 0.5  # no queueing, no timeout: refused at once
    assert await w.purses(p) == (1_000, 100)
    ans = await w.pos.request(req)
    assert ans.response_code == "00" and blocks(ans) == {"00": 800, "10": 800, "20": 0}


async def test_answer_memory_down_is_no_answer_and_moves_nothing(
    w: World, engine: Engine, campus: Campus
) -> None:
    """Without its answer memory the gateway cannot tell whether an earlier attempt of the
    purchase moved money and was answered: no answer rather than a 96 that may be false
    (contract §5 v4: a 96 means no money moved). An inquiry moves nothing: its 96 stays."""
    p = await w.person(cash=1_000)
    req = w.pos.purchase(p.card, 100)
    gw = Gateway(engine, campus=campus)
    await gw.start("127.0.0.1", 0)
    try:
        assert gw._pool is not None
        await gw._pool.close()  # the gateway's database connections are gone
        async with TerminalClient("127.0.0.1", gw.port, terminal_id=w.pos.terminal_id,
                                  merchant_id=w.pos.merchant_id, mac_key=w.key) as c:
            assert (await c.request(c.inquiry(p.card))).response_code == "96"
            with pytest.raises(ConnectionClosedError):
                await c.request(req)
        assert await w.purses(p) == (1_000, 0)
    finally:
        gw._pool = None
        await gw.stop()
    assert (await w.pos.request(req)).response_code == "00"  # served once it is back
    assert await w.purses(p) == (900, 0)


async def test_message_key_matches_campus_reversal_memory(w: World) -> None:
    """The campus remembers reversals under the key the gateway derives for the original."""
    p = await w.person(cash=1_000)
    original = w.pos.purchase(p.card, 100)
    assert (await w.pos.request(w.pos.reversal(original))).response_code == "00"
    assert original.stan is not None and original.transmission_dt is not None
    key = message_key(w.pos.terminal_id, original.stan, original.transmission_dt)
    async with w.engine.store.pool.acquire() as conn:
        n = await conn.fetchval(
            "SELECT count(*) FROM reversals WHERE ledger = $1 AND original_key = $2",
            w.ledger, key)
    assert n == 1


@pytest.mark.slow
async def test_200_concurrent_terminals_exact_balances(w: World) -> None:
    people = list(await asyncio.gather(*(w.person(cash=3_000, subsidy=500) for _ in range(50))))
    terms = list(await asyncio.gather(*(w.terminal(TerminalKind.POS, w.canteen)
                                        for _ in range(200))))
    rounds = 5

    async def run(i: int, c: TerminalClient) -> list[tuple[int, int, str]]:
        out = []
        for r in range(rounds):
            person = (i + r) % len(people)
            amount = 100 + (i * 7 + r * 13) % 400
            ans = await c.request(c.purchase(people[person].card, amount))
            out.append((person, amount, ans.response_code or ""))
        return out

    t0 = time.monotonic()
    results = await asyncio.gather(*(run(i, c) for i, c in enumerate(terms)))
    elapsed = time.monotonic() - t0
    spent = [0] * len(people)
    for person, amount, code in (x for r in results for x in r):
        assert code in ("00", "51")
        if code == "00":
            spent[person] += amount
    for person, s in zip(people, spent, strict=True):
        cash, subsidy = await w.purses(person)
        assert cash + subsidy == 3_500 - s
        assert cash >= 0 and subsidy >= 0
        assert subsidy == max(0, 500 - s)  # subsidy first, every time
    assert await w.balance(w.canteen) == sum(spent)
    assert elapsed < 60


async def test_fields_12_13_follow_the_configured_zone(
    engine: Engine, campus: Campus, ids: Ids
) -> None:
    gw = Gateway(engine, campus=campus, tz="America/New_York")
    await gw.start("127.0.0.1", 0)
    w = await World(engine, campus, gw, ids).setup()
    try:
        assert_local_now(await w.pos.request(w.pos.sign_on()), ZoneInfo("America/New_York"))
        p = await w.person(cash=1_000)
        assert_local_now(await w.pos.request(w.pos.purchase(p.card, 100)),
                         ZoneInfo("America/New_York"))
    finally:
        await w.close()
        await gw.stop()

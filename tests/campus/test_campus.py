"""engine.campus on a real PostgreSQL through the real batcher: card payments, holds,
electricity, reversals and the card registry (no mocks)."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import msgspec
import pytest

from engine.batcher import Batcher
from engine.calendar import day_window_at, to_ns
from engine.campus import (
    Campus,
    Card,
    CardStatus,
    HolderKind,
    HolderResult,
    Outcome,
    Refusal,
    Refused,
    RegistryStatus,
    Room,
    Terminal,
    TerminalKind,
)
from engine.campus.accounts import derived_account_id, holder_account_ids, part_id
from engine.campus.posting import split_subsidy_first
from engine.service import Engine
from ledger.account import Account
from ledger.status import AccountStatus, TransferStatus
from ledger.transfer import Transfer
from ledger.types import AccountFlags, AccountKind, TransferCode, TransferFlags, TransferState
from terminals.mac import pin_block
from tests.conftest import Ids

SHANGHAI = ZoneInfo("Asia/Shanghai")


class Clock:
    """An injectable clock: real time until set."""

    def __init__(self) -> None:
        self.at: datetime | None = None

    def __call__(self) -> datetime:
        return self.at or datetime.now(UTC)


def card_number() -> str:
    """A fresh 16-digit card number."""
    return "88" + "".join(secrets.choice("0123456789") for _ in range(14))


def terminal_id() -> str:
    """A fresh 8-character terminal id."""
    return "T" + secrets.token_hex(4)[:7].upper()


class World:
    """One fresh ledger with a holder, a card, a bank, a fund and a terminal of every kind."""

    def __init__(self, engine: Engine, campus: Campus, ids: Ids) -> None:
        self.engine = engine
        self.campus = campus
        self.ids = ids
        self.ledger = ids.ledger()
        self.bank, self.fund, self.canteen, self.water_acc, self.power_acc = ids.accounts(5)
        self.holder = "S" + secrets.token_hex(4)
        self.purse, self.subsidy = holder_account_ids(self.ledger, self.holder)
        self.card = card_number()
        self.key_hex = secrets.token_hex(32)

    async def setup(self, **card: int | str | None) -> World:
        st = await self.engine.store.create_accounts([
            Account(id=self.bank, ledger=self.ledger, kind=AccountKind.CLEARING, code=1),
            Account(id=self.fund, ledger=self.ledger, kind=AccountKind.FUND, code=1),
            Account(id=self.canteen, ledger=self.ledger, kind=AccountKind.MERCHANT, code=1),
            Account(id=self.water_acc, ledger=self.ledger, kind=AccountKind.UTILITY, code=2),
            Account(id=self.power_acc, ledger=self.ledger, kind=AccountKind.UTILITY, code=3),
        ])
        assert st == [AccountStatus.CREATED] * 5
        r = await self.campus.create_holder(
            holder_id=self.holder, ledger=self.ledger, name="Li Lei", kind=HolderKind.STUDENT
        )
        assert isinstance(r, HolderResult) and r.status is RegistryStatus.CREATED
        c = await self.campus.create_card(card_no=self.card, holder_id=self.holder,
                                          ledger=self.ledger, **card)  # type: ignore[arg-type]
        assert isinstance(c, Card) and c.status is CardStatus.ACTIVE
        self.pos = await self.terminal(TerminalKind.POS, self.canteen)
        self.water = await self.terminal(TerminalKind.WATER, self.water_acc)
        self.kiosk = await self.terminal(TerminalKind.KIOSK, self.power_acc)
        self.meter = await self.terminal(TerminalKind.METER, self.power_acc)
        return self

    async def terminal(self, kind: TerminalKind, account: int) -> Terminal:
        tid = terminal_id()
        st = await self.campus.register_terminal(
            terminal_id=tid, merchant_id="M" + tid + "000000", ledger=self.ledger, kind=kind,
            account_id=account, mac_key=bytes.fromhex(self.key_hex),
        )
        assert st is RegistryStatus.CREATED
        term = await self.campus.terminal(tid)
        assert term is not None
        return term

    async def post(self, *transfers: Transfer) -> list[TransferStatus]:
        return [r.status for r in await self.engine.batcher.submit(list(transfers))]

    async def top_up(self, amount: int, account: int | None = None) -> None:
        st = await self.post(Transfer(
            id=uuid.uuid4(), ledger=self.ledger, debit_account_id=self.bank,
            credit_account_id=account or self.purse, amount=amount, code=4))
        assert st == [TransferStatus.CREATED]

    async def grant(self, amount: int) -> None:
        st = await self.post(Transfer(
            id=uuid.uuid4(), ledger=self.ledger, debit_account_id=self.fund,
            credit_account_id=self.subsidy, amount=amount, code=5))
        assert st == [TransferStatus.CREATED]

    async def available(self, account: int) -> int:
        rec = await self.engine.store.get_account(account)
        assert rec is not None
        return rec.state.available

    async def balances(self) -> tuple[int, int]:
        """(cash available, subsidy available)."""
        return await self.available(self.purse), await self.available(self.subsidy)

    def pin(self, pin: str, card: str | None = None) -> bytes:
        return pin_block(bytes.fromhex(self.key_hex), card or self.card, pin)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def campus(engine: Engine, clock: Clock) -> Campus:
    return Campus(engine, clock=clock)


async def make_world(engine: Engine, campus: Campus, ids: Ids, **card: int | str | None) -> World:
    """A set-up world (helper shared with the other campus test modules)."""
    return await World(engine, campus, ids).setup(**card)


@pytest.fixture
async def w(engine: Engine, campus: Campus, ids: Ids) -> World:
    return await make_world(engine, campus, ids)


def key() -> uuid.UUID:
    return uuid.uuid4()


# -- pure helpers --------------------------------------------------------------------------------


def test_derived_ids_are_positive_deterministic_and_distinct() -> None:
    a = derived_account_id(7, "S1", AccountKind.PURSE)
    assert a == derived_account_id(7, "S1", AccountKind.PURSE)
    assert 0 < a < 2**63
    others = {
        derived_account_id(8, "S1", AccountKind.PURSE),
        derived_account_id(7, "S2", AccountKind.PURSE),
        derived_account_id(7, "S1", AccountKind.SUBSIDY),
        derived_account_id(7, "S1", AccountKind.ROOM),
    }
    assert a not in others and len(others) == 4


def test_split_subsidy_first() -> None:
    assert split_subsidy_first(500, 300) == (300, 200)
    assert split_subsidy_first(500, 800) == (500, 0)
    assert split_subsidy_first(500, 0) == (0, 500)
    assert split_subsidy_first(500, -40) == (0, 500)  # a forced advice left it negative


def test_local_day_is_the_shanghai_day() -> None:
    # 15:59:59Z is 23:59:59 in Shanghai; 16:00:00Z is already the next local day
    before = datetime(2026, 3, 1, 15, 59, 59, tzinfo=UTC)
    after = datetime(2026, 3, 1, 16, 0, 0, tzinfo=UTC)
    start, end = day_window_at(to_ns(before), SHANGHAI)
    assert start == int(datetime(2026, 2, 28, 16, tzinfo=UTC).timestamp()) * 10**9
    assert end == int(after.timestamp()) * 10**9
    assert day_window_at(to_ns(after), SHANGHAI)[0] == end
    # in UTC both instants are on the same day
    utc = ZoneInfo("UTC")
    assert day_window_at(to_ns(before), utc) == day_window_at(to_ns(after), utc)


# -- registry ------------------------------------------------------------------------------------


async def test_holder_creates_purses_idempotently(w: World) -> None:
    for aid, kind in ((w.purse, AccountKind.PURSE), (w.subsidy, AccountKind.SUBSIDY)):
        rec = await w.engine.store.get_account(aid)
        assert rec is not None
        assert rec.state.kind is kind and rec.state.ledger == w.ledger
        assert rec.state.flags == AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
        assert rec.holder_id == w.holder
    again = await w.campus.create_holder(holder_id=w.holder, ledger=w.ledger, name="Li Lei",
                                         kind=HolderKind.STUDENT)
    assert isinstance(again, HolderResult) and again.status is RegistryStatus.EXISTS
    assert (again.holder.purse_account_id, again.holder.subsidy_account_id) == (w.purse, w.subsidy)
    other = await w.campus.create_holder(holder_id=w.holder, ledger=w.ledger, name="Han Meimei",
                                         kind=HolderKind.STUDENT)
    assert isinstance(other, HolderResult)
    assert other.status is RegistryStatus.EXISTS_WITH_DIFFERENT_FIELDS
    assert other.holder.name == "Li Lei"  # the stored holder is unchanged


async def test_concurrent_holder_creation_creates_once(campus: Campus, ids: Ids) -> None:
    ledger = ids.ledger()
    results = await asyncio.gather(*(
        campus.create_holder(holder_id="H1", ledger=ledger, name="x", kind=HolderKind.STAFF)
        for _ in range(5)
    ))
    statuses = sorted(r.status for r in results if isinstance(r, HolderResult))
    assert statuses == ["created"] + ["exists"] * 4


async def test_one_active_card_per_holder_and_unique_numbers(w: World) -> None:
    second = await w.campus.create_card(card_no=card_number(), holder_id=w.holder,
                                        ledger=w.ledger)
    assert isinstance(second, Refused) and second.reason is Refusal.HOLDER_HAS_ACTIVE_CARD
    same = await w.campus.create_card(card_no=w.card, holder_id=w.holder)  # ledger looked up
    assert isinstance(same, Card) and same.status is CardStatus.ACTIVE
    r = await w.campus.create_holder(holder_id="other", ledger=w.ledger, name="o",
                                     kind=HolderKind.STAFF)
    assert isinstance(r, HolderResult)
    taken = await w.campus.create_card(card_no=w.card, holder_id="other", ledger=w.ledger)
    assert isinstance(taken, Refused) and taken.reason is Refusal.CARD_NUMBER_TAKEN
    missing = await w.campus.create_card(card_no=card_number(), holder_id="nobody",
                                         ledger=w.ledger)
    assert isinstance(missing, Refused) and missing.reason is Refusal.HOLDER_NOT_FOUND


async def test_terminal_registry(w: World) -> None:
    t = w.pos
    assert (t.ledger, t.kind, t.account_id) == (w.ledger, TerminalKind.POS, w.canteen)
    assert await w.campus.terminal("NOPE0000") is None
    again = await w.campus.register_terminal(
        terminal_id=t.terminal_id, merchant_id=t.merchant_id, ledger=t.ledger, kind=t.kind,
        account_id=t.account_id, mac_key=t.mac_key)
    assert again is RegistryStatus.EXISTS
    moved = await w.campus.register_terminal(
        terminal_id=t.terminal_id, merchant_id=t.merchant_id, ledger=t.ledger, kind=t.kind,
        account_id=w.water_acc, mac_key=t.mac_key)
    assert moved is RegistryStatus.EXISTS_WITH_DIFFERENT_FIELDS
    purse = await w.campus.register_terminal(
        terminal_id=terminal_id(), merchant_id="M" * 15, ledger=w.ledger, kind=TerminalKind.POS,
        account_id=w.purse, mac_key=t.mac_key)
    assert isinstance(purse, Refused) and purse.reason is Refusal.ACCOUNT_NOT_CREDITABLE
    foreign = await w.campus.register_terminal(
        terminal_id=terminal_id(), merchant_id="M" * 15, ledger=w.ledger + 10_000,
        kind=TerminalKind.POS, account_id=w.canteen, mac_key=t.mac_key)
    assert isinstance(foreign, Refused) and foreign.reason is Refusal.ACCOUNT_NOT_FOUND


# -- purchases -----------------------------------------------------------------------------------


async def test_meal_spends_subsidy_first_as_linked_transfers(w: World) -> None:
    await w.top_up(1_000)
    await w.grant(300)
    k = key()
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=500, key=k)
    assert r.outcome is Outcome.APPROVED
    assert r.purses is not None and (r.purses.cash, r.purses.subsidy) == (800, 0)
    assert r.purses.total == 800
    assert await w.balances() == (800, 0)
    assert await w.available(w.canteen) == 500
    sub = await w.engine.store.get_transfer(part_id(k, "subsidy"))
    cash = await w.engine.store.get_transfer(part_id(k, "cash"))
    assert sub is not None and cash is not None
    assert (sub.transfer.amount, sub.transfer.debit_account_id) == (300, w.subsidy)
    assert (cash.transfer.amount, cash.transfer.debit_account_id) == (200, w.purse)
    assert sub.transfer.flags & TransferFlags.LINKED
    assert not cash.transfer.flags & TransferFlags.LINKED
    assert sub.transfer.code == cash.transfer.code == TransferCode.MEAL
    assert r.timestamp == sub.transfer.timestamp


async def test_meal_from_one_purse_is_one_transfer(w: World) -> None:
    await w.top_up(1_000)
    await w.grant(600)
    k = key()
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=450, key=k)
    assert r.outcome is Outcome.APPROVED and await w.balances() == (1_000, 150)
    assert await w.engine.store.get_transfer(part_id(k, "cash")) is None
    k2 = key()
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=150, key=k2)
    assert r.outcome is Outcome.APPROVED and await w.balances() == (1_000, 0)
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=999, key=key())
    assert r.outcome is Outcome.APPROVED and await w.balances() == (1, 0)


async def test_insufficient_funds_moves_nothing(w: World) -> None:
    await w.top_up(200)
    await w.grant(100)
    k = key()
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=301, key=k)
    assert r.outcome is Outcome.INSUFFICIENT_FUNDS
    assert r.purses is not None and r.purses.total == 300
    assert await w.balances() == (200, 100)
    assert await w.engine.store.get_transfer(part_id(k, "subsidy")) is None  # chain rolled back
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=300, key=key())
    assert r.outcome is Outcome.APPROVED and await w.balances() == (0, 0)


async def test_retried_key_posts_once(w: World) -> None:
    await w.top_up(1_000)
    await w.grant(300)
    k = key()
    first = await w.campus.purchase(w.pos, card_no=w.card, amount=500, key=k)
    await w.grant(1_000)  # the split would differ now; the retry must still match
    again = await w.campus.purchase(w.pos, card_no=w.card, amount=500, key=k)
    assert first.outcome is again.outcome is Outcome.APPROVED
    assert first.timestamp == again.timestamp
    assert await w.balances() == (800, 1_000)
    assert await w.available(w.canteen) == 500
    other = await w.campus.purchase(w.pos, card_no=w.card, amount=501, key=k)
    assert other.outcome is Outcome.DUPLICATE_DIFFERENT
    assert await w.balances() == (800, 1_000)


async def test_concurrent_retransmissions_post_once(w: World) -> None:
    await w.top_up(10_000)
    await w.grant(250)
    k = key()
    rs = await asyncio.gather(*(
        w.campus.purchase(w.pos, card_no=w.card, amount=700, key=k) for _ in range(8)
    ))
    assert {r.outcome for r in rs} == {Outcome.APPROVED}
    assert await w.balances() == (9_550, 0)


async def test_unknown_card_and_wrong_ledger_card(w: World, engine: Engine, campus: Campus,
                                                   ids: Ids) -> None:
    r = await w.campus.purchase(w.pos, card_no=card_number(), amount=100, key=key())
    assert r.outcome is Outcome.INVALID_CARD
    other = await make_world(engine, campus, ids)
    r = await w.campus.purchase(w.pos, card_no=other.card, amount=100, key=key())
    assert r.outcome is Outcome.INVALID_CARD
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=0, key=key())
    assert r.outcome is Outcome.INVALID_AMOUNT


async def test_terminal_kinds_are_enforced(w: World) -> None:
    await w.top_up(1_000)
    r = await w.campus.purchase(w.meter, card_no=w.card, amount=100, key=key())
    assert r.outcome is Outcome.INVALID_TRANSACTION
    r = await w.campus.hold(w.pos, card_no=w.card, amount=100, key=key())
    assert r.outcome is Outcome.INVALID_TRANSACTION
    r = await w.campus.meter_usage(w.pos, room_id="A101", amount=100, key=key())
    assert r.outcome is Outcome.INVALID_TRANSACTION
    assert await w.balances() == (1_000, 0)


# -- card states ---------------------------------------------------------------------------------


async def test_lost_card_freezes_purses_at_the_ledger(w: World) -> None:
    await w.top_up(1_000)
    await w.grant(100)
    lost = await w.campus.report_lost(w.card)
    assert isinstance(lost, Card) and lost.status is CardStatus.LOST
    for aid in (w.purse, w.subsidy):
        rec = await w.engine.store.get_account(aid)
        assert rec is not None and rec.state.flags & AccountFlags.FROZEN
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=100, key=key())
    assert r.outcome is Outcome.LOST_CARD
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=100, key=key(), force=True)
    assert r.outcome is Outcome.LOST_CARD  # offline advices of a lost card are refused too
    # the ledger itself refuses debits, whoever submits them (here: straight to the batcher)
    st = await w.post(Transfer(id=uuid.uuid4(), ledger=w.ledger, debit_account_id=w.purse,
                               credit_account_id=w.canteen, amount=1, code=1))
    assert st == [TransferStatus.DEBIT_ACCOUNT_FROZEN]
    await w.top_up(50)  # credits still arrive
    assert await w.balances() == (1_050, 100)
    again = await w.campus.report_lost(w.card)
    assert isinstance(again, Card) and again.status is CardStatus.LOST
    found = await w.campus.card_found(w.card)
    assert isinstance(found, Card) and found.status is CardStatus.ACTIVE
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=150, key=key())
    assert r.outcome is Outcome.APPROVED and await w.balances() == (1_000, 0)


async def test_found_card_with_another_active_card_stays_lost(w: World) -> None:
    assert isinstance(await w.campus.report_lost(w.card), Card)
    spare = card_number()
    c = await w.campus.create_card(card_no=spare, holder_id=w.holder, ledger=w.ledger)
    assert isinstance(c, Card) and c.status is CardStatus.ACTIVE  # unfreezes the purses
    rec = await w.engine.store.get_account(w.purse)
    assert rec is not None and not rec.state.flags & AccountFlags.FROZEN
    found = await w.campus.card_found(w.card)
    assert isinstance(found, Refused) and found.reason is Refusal.HOLDER_HAS_ACTIVE_CARD
    closed = await w.campus.close_card(w.card)
    assert isinstance(closed, Card) and closed.status is CardStatus.CLOSED


async def test_card_changes_racing_payments(w: World) -> None:
    await w.top_up(100_000)
    await w.grant(1_000)

    async def toggle() -> None:
        for _ in range(4):
            assert isinstance(await w.campus.report_lost(w.card), Card)
            assert isinstance(await w.campus.card_found(w.card), Card)

    pays = [w.campus.purchase(w.pos, card_no=w.card, amount=100 + i, key=key())
            for i in range(30)]
    results = await asyncio.gather(toggle(), toggle(), *pays)
    outcomes = [r for r in results if r is not None]
    assert {r.outcome for r in outcomes} <= {Outcome.APPROVED, Outcome.LOST_CARD}
    spent = sum(100 + i for i, r in enumerate(outcomes) if r.outcome is Outcome.APPROVED)
    cash, subsidy = await w.balances()
    assert cash + subsidy == 101_000 - spent
    assert await w.available(w.canteen) == spent


async def test_replacement_keeps_purses_and_balance(w: World) -> None:
    await w.top_up(1_000)
    await w.grant(200)
    assert isinstance(await w.campus.report_lost(w.card), Card)
    new = card_number()
    rep = await w.campus.replace_card(w.card, new)
    assert not isinstance(rep, Refused)
    assert (rep.old.status, rep.old.replaced_by, rep.new.status) == (
        CardStatus.REPLACED, new, CardStatus.ACTIVE)
    assert rep.new.holder_id == w.holder
    assert await w.balances() == (1_000, 200)  # no money moved
    rec = await w.engine.store.get_account(w.purse)
    assert rec is not None and not rec.state.flags & AccountFlags.FROZEN
    r = await w.campus.purchase(w.pos, card_no=new, amount=300, key=key())
    assert r.outcome is Outcome.APPROVED and await w.balances() == (900, 0)
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=100, key=key())
    assert r.outcome is Outcome.CARD_NOT_ACTIVE
    again = await w.campus.replace_card(w.card, new)  # the same replacement, repeated
    assert not isinstance(again, Refused) and again.new.card_no == new
    bad = await w.campus.replace_card(w.card, card_number())
    assert isinstance(bad, Refused) and bad.reason is Refusal.INVALID_TRANSITION
    taken = await w.campus.replace_card(new, new)
    assert isinstance(taken, Refused) and taken.reason is Refusal.CARD_NUMBER_TAKEN


async def test_closed_card_is_not_active(w: World) -> None:
    await w.top_up(1_000)
    closed = await w.campus.close_card(w.card)
    assert isinstance(closed, Card) and closed.status is CardStatus.CLOSED
    for op in (
        w.campus.purchase(w.pos, card_no=w.card, amount=100, key=key()),
        w.campus.balance(w.pos, card_no=w.card),
        w.campus.hold(w.water, card_no=w.card, amount=100, key=key()),
        w.campus.buy_electricity(w.kiosk, card_no=w.card, room_id="A1", amount=100, key=key()),
    ):
        assert (await op).outcome is Outcome.CARD_NOT_ACTIVE
    lost = await w.campus.report_lost(w.card)
    assert isinstance(lost, Refused) and lost.reason is Refusal.INVALID_TRANSITION
    assert isinstance(await w.campus.report_lost(card_number()), Refused)
    # the holder may get a new card: the closed one does not count as active
    c = await w.campus.create_card(card_no=card_number(), holder_id=w.holder, ledger=w.ledger)
    assert isinstance(c, Card) and c.status is CardStatus.ACTIVE


async def test_card_balance(w: World) -> None:
    await w.top_up(700)
    await w.grant(50)
    b = await w.campus.card_balance(w.card)
    assert b is not None and b.card.holder_id == w.holder and b.total_available == 750
    assert [(p.account_id, p.kind, p.balance) for p in b.purses] == [
        (w.purse, AccountKind.PURSE, 700), (w.subsidy, AccountKind.SUBSIDY, 50)]
    r = await w.campus.balance(w.pos, card_no=w.card)
    assert r.outcome is Outcome.APPROVED and r.purses is not None
    assert (r.purses.cash, r.purses.subsidy) == (700, 50)
    assert await w.campus.card_balance(card_number()) is None


# -- daily limit and PIN -------------------------------------------------------------------------


async def test_daily_limit(engine: Engine, campus: Campus, ids: Ids) -> None:
    w = await make_world(engine, campus, ids, daily_limit=1_000)
    await w.top_up(5_000)
    await w.grant(100)
    assert (await w.campus.purchase(w.pos, card_no=w.card, amount=600, key=key())).outcome \
        is Outcome.APPROVED
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=401, key=key())
    assert r.outcome is Outcome.DAILY_LIMIT_EXCEEDED and await w.balances() == (4_500, 0)
    # a hold counts while it holds, hot water and electricity count too
    h = key()
    assert (await w.campus.hold(w.water, card_no=w.card, amount=200, key=h)).outcome \
        is Outcome.APPROVED
    r = await w.campus.buy_electricity(w.kiosk, card_no=w.card, room_id="R1", amount=201,
                                       key=key())
    assert r.outcome is Outcome.DAILY_LIMIT_EXCEEDED
    assert (await w.campus.complete(w.water, hold_key=h, amount=50, key=key())).outcome \
        is Outcome.APPROVED  # only 50 is spent now
    room = await w.campus.create_room(room_id="R1", ledger=w.ledger)
    assert isinstance(room, Room)
    r = await w.campus.buy_electricity(w.kiosk, card_no=w.card, room_id="R1", amount=350,
                                       key=key())
    assert r.outcome is Outcome.APPROVED  # 600 + 50 + 350 = 1000, exactly the limit
    big = key()
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=1, key=big)
    assert r.outcome is Outcome.DAILY_LIMIT_EXCEEDED
    # an offline advice is not refused: the food was served
    adv = key()
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=100, key=adv, force=True)
    assert r.outcome is Outcome.APPROVED
    # reversed spending does not count
    assert (await w.campus.reverse(w.pos, original_key=adv, key=key())).outcome \
        is Outcome.APPROVED
    assert (await w.campus.purchase(w.pos, card_no=w.card, amount=1, key=key())).outcome \
        is Outcome.DAILY_LIMIT_EXCEEDED
    assert await w.balances() == (5_000 - 500 - 50 - 350, 0)


async def test_daily_limit_holds_under_concurrent_payments(engine: Engine, campus: Campus,
                                                           ids: Ids) -> None:
    w = await make_world(engine, campus, ids, daily_limit=1_000)
    await w.top_up(10_000)
    await campus.create_room(room_id="L1", ledger=w.ledger)
    ops = [campus.purchase(w.pos, card_no=w.card, amount=300, key=key()) for _ in range(6)]
    ops += [campus.buy_electricity(w.kiosk, card_no=w.card, room_id="L1", amount=300, key=key())
            for _ in range(3)]
    ops += [campus.hold(w.water, card_no=w.card, amount=300, key=key()) for _ in range(3)]
    results = await asyncio.gather(*ops)
    assert sum(r.outcome is Outcome.APPROVED for r in results) == 3
    assert {r.outcome for r in results} == {Outcome.APPROVED, Outcome.DAILY_LIMIT_EXCEEDED}
    assert await w.balances() == (9_100, 0)


async def test_daily_limit_counts_the_campus_local_day(engine: Engine, ids: Ids) -> None:
    clock = Clock()
    campus = Campus(engine, clock=clock)
    utc_campus = Campus(engine, tz="UTC", clock=clock)
    w = await make_world(engine, campus, ids, daily_limit=1_000)
    await w.top_up(5_000)
    r = await campus.purchase(w.pos, card_no=w.card, amount=800, key=key())
    assert r.outcome is Outcome.APPROVED and r.timestamp is not None
    spent_at = datetime.fromtimestamp(r.timestamp / 1e9, UTC)
    _, midnight_ns = day_window_at(to_ns(spent_at), SHANGHAI)
    midnight = datetime.fromtimestamp(midnight_ns // 10**9, UTC)  # next Shanghai midnight
    assert midnight.astimezone(SHANGHAI).hour == 0 and midnight.hour == 16

    async def allowed(c: Campus, at: datetime) -> bool:
        clock.at = at
        k = key()
        r = await c.purchase(w.pos, card_no=w.card, amount=300, key=k)
        assert r.outcome in (Outcome.APPROVED, Outcome.DAILY_LIMIT_EXCEEDED)
        if r.outcome is Outcome.APPROVED:  # reversed spending does not count: start equal again
            await c.reverse(w.pos, original_key=k, key=key())
        return r.outcome is Outcome.APPROVED

    assert not await allowed(campus, midnight - timedelta(microseconds=1))  # same local day
    assert await allowed(campus, midnight)  # 00:00 in Shanghai: a new day
    # The UTC day boundary falls elsewhere: find an instant where the two zones disagree.
    utc_midnight = datetime.combine(spent_at.date() + timedelta(days=1), datetime.min.time(),
                                    tzinfo=UTC)
    if midnight < utc_midnight:  # spent before 16:00Z: Shanghai's day ends first
        assert await allowed(campus, midnight) and not await allowed(utc_campus, midnight)
    else:  # spent after 16:00Z: the UTC day ends first
        assert not await allowed(campus, utc_midnight)
        assert await allowed(utc_campus, utc_midnight)


async def test_pin_over_threshold(engine: Engine, campus: Campus, ids: Ids) -> None:
    w = await make_world(engine, campus, ids, pin="2468", pin_threshold=500)
    await w.top_up(5_000)
    ok = await w.campus.purchase(w.pos, card_no=w.card, amount=500, key=key())
    assert ok.outcome is Outcome.APPROVED  # at the threshold: no PIN needed
    for block in (None, w.pin("1357"), w.pin("2468", card=card_number()), b"\0" * 8):
        r = await w.campus.purchase(w.pos, card_no=w.card, amount=501, key=key(),
                                    pin_block=block)
        assert r.outcome is Outcome.INCORRECT_PIN
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=501, key=key(),
                                pin_block=w.pin("2468"))
    assert r.outcome is Outcome.APPROVED
    r = await w.campus.hold(w.water, card_no=w.card, amount=900, key=key())
    assert r.outcome is Outcome.INCORRECT_PIN
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=900, key=key(), force=True)
    assert r.outcome is Outcome.APPROVED  # an offline advice carries no PIN
    r = await w.campus.balance(w.pos, card_no=w.card, pin_block=w.pin("0000"))
    assert r.outcome is Outcome.INCORRECT_PIN
    assert (await w.campus.balance(w.pos, card_no=w.card)).outcome is Outcome.APPROVED
    assert await w.balances() == (5_000 - 500 - 501 - 900, 0)


# -- offline advice ------------------------------------------------------------------------------


async def test_offline_advice_posts_past_the_balance(w: World) -> None:
    await w.top_up(100)
    await w.grant(50)
    k = key()
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=400, key=k, force=True)
    assert r.outcome is Outcome.APPROVED
    assert r.purses is not None and (r.purses.cash, r.purses.subsidy) == (-250, 0)
    t = await w.engine.store.get_transfer(part_id(k, "cash"))
    assert t is not None and t.transfer.flags & TransferFlags.FORCE
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=400, key=k)  # same key, no force
    assert r.outcome is Outcome.DUPLICATE_DIFFERENT


# -- hot water -----------------------------------------------------------------------------------


async def test_hold_complete_and_release(w: World) -> None:
    await w.top_up(1_000)
    await w.grant(200)
    h = key()
    r = await w.campus.hold(w.water, card_no=w.card, amount=500, key=h)
    assert r.outcome is Outcome.APPROVED
    assert r.purses is not None and (r.purses.cash, r.purses.subsidy) == (700, 0)
    for part in ("subsidy", "cash"):
        rec = await w.engine.store.get_transfer(part_id(h, part))
        assert rec is not None and rec.state is TransferState.PENDING
        assert rec.transfer.timeout_s == 1800
    over = await w.campus.complete(w.water, hold_key=h, amount=501, key=key())
    assert over.outcome is Outcome.INVALID_AMOUNT
    c = key()
    r = await w.campus.complete(w.water, hold_key=h, amount=300, key=c, card_no=w.card)
    assert r.outcome is Outcome.APPROVED
    assert r.purses is not None and (r.purses.cash, r.purses.subsidy) == (900, 0)
    assert await w.available(w.water_acc) == 300
    assert await w.campus.complete(w.water, hold_key=h, amount=300, key=c) == r  # retry
    assert await w.available(w.water_acc) == 300
    again = await w.campus.complete(w.water, hold_key=h, amount=300, key=key())
    assert again.outcome is Outcome.INVALID_TRANSACTION  # already settled by another message
    missing = await w.campus.complete(w.water, hold_key=key(), amount=1, key=key())
    assert missing.outcome is Outcome.ORIGINAL_NOT_FOUND
    # nothing used: amount 0 releases everything
    h2 = key()
    assert (await w.campus.hold(w.water, card_no=w.card, amount=400, key=h2)).outcome \
        is Outcome.APPROVED
    assert await w.balances() == (500, 0)
    r = await w.campus.complete(w.water, hold_key=h2, amount=0, key=key())
    assert r.outcome is Outcome.APPROVED and await w.balances() == (900, 0)
    for part in ("subsidy", "cash"):
        rec = await w.engine.store.get_transfer(part_id(h2, part))
        assert rec is None or rec.state is TransferState.VOIDED
    # only the subsidy part used: the cash part is voided, not posted for 0 (= "all")
    await w.grant(300)
    h3 = key()
    assert (await w.campus.hold(w.water, card_no=w.card, amount=500, key=h3)).outcome \
        is Outcome.APPROVED
    r = await w.campus.complete(w.water, hold_key=h3, amount=250, key=key())
    assert r.outcome is Outcome.APPROVED and await w.balances() == (900, 50)


async def test_hold_needs_funds_and_expires(engine: Engine, ids: Ids) -> None:
    campus = Campus(engine, hold_timeout_s=1)
    w = await make_world(engine, campus, ids)
    await w.top_up(300)
    r = await campus.hold(w.water, card_no=w.card, amount=301, key=key())
    assert r.outcome is Outcome.INSUFFICIENT_FUNDS
    h = key()
    assert (await campus.hold(w.water, card_no=w.card, amount=300, key=h)).outcome \
        is Outcome.APPROVED
    assert await w.balances() == (0, 0)
    for _ in range(50):  # the engine's expirer runs every 0.2 s in tests
        await asyncio.sleep(0.1)
        if await w.balances() == (300, 0):
            break
    assert await w.balances() == (300, 0)
    r = await campus.complete(w.water, hold_key=h, amount=100, key=key())
    assert r.outcome is Outcome.ORIGINAL_NOT_FOUND


async def test_completion_of_another_terminals_hold(w: World) -> None:
    await w.top_up(1_000)
    h = key()
    assert (await w.campus.hold(w.water, card_no=w.card, amount=100, key=h)).outcome \
        is Outcome.APPROVED
    other = await w.terminal(TerminalKind.WATER, w.power_acc)
    r = await w.campus.complete(other, hold_key=h, amount=50, key=key())
    assert r.outcome is Outcome.ORIGINAL_NOT_FOUND


# -- electricity ---------------------------------------------------------------------------------


async def test_electricity_and_meter_usage(w: World) -> None:
    await w.top_up(1_000)
    await w.grant(500)  # electricity is paid from the cash purse only
    room = await w.campus.create_room(room_id="B-204", ledger=w.ledger)
    assert isinstance(room, Room)
    again = await w.campus.create_room(room_id="B-204", ledger=w.ledger)
    assert again == room
    k = key()
    r = await w.campus.buy_electricity(w.kiosk, card_no=w.card, room_id="B-204", amount=600,
                                       key=k)
    assert r.outcome is Outcome.APPROVED and r.room_balance == 600
    assert r.purses is not None and (r.purses.cash, r.purses.subsidy) == (400, 500)
    t = await w.engine.store.get_transfer(part_id(k, "cash"))
    assert t is not None and t.transfer.code == TransferCode.ELECTRICITY
    assert (t.transfer.debit_account_id, t.transfer.credit_account_id) == (w.purse,
                                                                           room.account_id)
    r = await w.campus.buy_electricity(w.kiosk, card_no=w.card, room_id="B-204", amount=401,
                                       key=key())
    assert r.outcome is Outcome.INSUFFICIENT_FUNDS
    r = await w.campus.buy_electricity(w.kiosk, card_no=w.card, room_id="nowhere", amount=1,
                                       key=key())
    assert r.outcome is Outcome.INVALID_TRANSACTION

    use = key()
    r = await w.campus.meter_usage(w.meter, room_id="B-204", amount=250, key=use)
    assert (r.outcome, r.room_balance) == (Outcome.APPROVED, 350)
    assert await w.campus.meter_usage(w.meter, room_id="B-204", amount=250, key=use) == r
    r = await w.campus.meter_usage(w.meter, room_id="B-204", amount=350, key=key())
    assert (r.outcome, r.room_balance) == (Outcome.INSUFFICIENT_FUNDS, 0)  # cut the power
    r = await w.campus.meter_usage(w.meter, room_id="B-204", amount=40, key=key())
    assert (r.outcome, r.room_balance) == (Outcome.INSUFFICIENT_FUNDS, -40)  # forced
    assert await w.available(w.power_acc) == 640
    r = await w.campus.meter_usage(w.meter, room_id="nowhere", amount=40, key=key())
    assert r.outcome is Outcome.INVALID_TRANSACTION
    r = await w.campus.buy_electricity(w.kiosk, card_no=w.card, room_id="B-204", amount=100,
                                       key=key())
    assert (r.outcome, r.room_balance) == (Outcome.APPROVED, 60)
    r = await w.campus.meter_usage(w.meter, room_id="B-204", amount=10, key=key())
    assert (r.outcome, r.room_balance) == (Outcome.APPROVED, 50)  # power back on


# -- reversals -----------------------------------------------------------------------------------


async def test_reversal_gives_the_money_back_once(w: World) -> None:
    await w.top_up(1_000)
    await w.grant(300)
    k = key()
    assert (await w.campus.purchase(w.pos, card_no=w.card, amount=500, key=k)).outcome \
        is Outcome.APPROVED
    r1 = await w.campus.reverse(w.pos, original_key=k, key=key())
    r2 = await w.campus.reverse(w.pos, original_key=k, key=key())  # a second, different reversal
    assert r1.outcome is r2.outcome is Outcome.APPROVED
    assert await w.balances() == (1_000, 300) and await w.available(w.canteen) == 0
    for part in ("subsidy", "cash"):
        orig = await w.engine.store.get_transfer(part_id(k, part))
        assert orig is not None
        rev = await w.engine.store.account_transfers(w.ledger, orig.transfer.debit_account_id,
                                                     before=2**63 - 1, limit=1)
        t = rev[0][0].transfer
        assert t.code == TransferCode.REVERSAL and t.user_data == str(orig.transfer.id)
        assert (t.debit_account_id, t.amount) == (w.canteen, orig.transfer.amount)
    # the original retransmitted after its reversal: same answer, no money
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=500, key=k)
    assert r.outcome is Outcome.APPROVED and await w.balances() == (1_000, 300)


async def test_reversal_before_original(w: World) -> None:
    await w.top_up(1_000)
    k = key()
    r = await w.campus.reverse(w.pos, original_key=k, key=key())
    assert r.outcome is Outcome.APPROVED
    r = await w.campus.purchase(w.pos, card_no=w.card, amount=400, key=k)
    assert r.outcome is Outcome.APPROVED
    assert r.purses is not None and r.purses.cash == 1_000
    assert await w.balances() == (1_000, 0) and await w.available(w.canteen) == 0
    h = key()
    await w.campus.reverse(w.water, original_key=h, key=key())
    assert (await w.campus.hold(w.water, card_no=w.card, amount=300, key=h)).outcome \
        is Outcome.APPROVED
    assert await w.balances() == (1_000, 0)
    assert (await w.campus.complete(w.water, hold_key=h, amount=100, key=key())).outcome \
        is Outcome.APPROVED
    assert await w.balances() == (1_000, 0)


async def test_reversal_of_a_hold_voids_it(w: World) -> None:
    await w.top_up(1_000)
    h = key()
    assert (await w.campus.hold(w.water, card_no=w.card, amount=300, key=h)).outcome \
        is Outcome.APPROVED
    assert (await w.campus.reverse(w.water, original_key=h, key=key())).outcome \
        is Outcome.APPROVED
    rec = await w.engine.store.get_transfer(part_id(h, "cash"))
    assert rec is not None and rec.state is TransferState.VOIDED
    assert await w.balances() == (1_000, 0)
    r = await w.campus.complete(w.water, hold_key=h, amount=100, key=key())
    assert r.outcome is Outcome.INVALID_TRANSACTION


async def test_concurrent_original_and_reversal_net_to_zero(w: World) -> None:
    await w.top_up(100_000)
    await w.grant(5_000)
    await w.campus.create_room(room_id="C1", ledger=w.ledger)
    ops = []
    for i in range(24):
        k = key()
        amount = 100 + i
        if i % 3 == 0:
            orig = w.campus.purchase(w.pos, card_no=w.card, amount=amount, key=k)
            term = w.pos
        elif i % 3 == 1:
            orig = w.campus.buy_electricity(w.kiosk, card_no=w.card, room_id="C1",
                                            amount=amount, key=k)
            term = w.kiosk
        else:
            orig = w.campus.hold(w.water, card_no=w.card, amount=amount, key=k)
            term = w.water
        rev = w.campus.reverse(term, original_key=k, key=key())
        ops.extend([orig, rev] if i % 2 else [rev, orig])
    results = await asyncio.gather(*ops)
    assert {r.outcome for r in results} == {Outcome.APPROVED}
    assert await w.balances() == (100_000, 5_000)
    for acc in (w.canteen, w.water_acc):
        assert await w.available(acc) == 0
    rec = await w.engine.store.get_account(w.water_acc)
    assert rec is not None and rec.state.credits_pending == 0


class _EngineView:
    """The real store with a differently configured real batcher."""

    def __init__(self, engine: Engine, batcher: object) -> None:
        self.store = engine.store
        self.batcher = batcher


class _ReversalInTheWindow:
    """The real batcher, except that just before an original's transfers are submitted, that
    original's reversal runs to completion: the reversal finds nothing posted yet, the
    original posts after it. The original must notice and undo itself."""

    def __init__(self, engine: Engine) -> None:
        self.real = engine.batcher
        self.campus: Campus | None = None
        self.pending: dict[uuid.UUID, tuple[Terminal, uuid.UUID]] = {}
        self.raced: set[uuid.UUID] = set()
        self.max_queued = self.real.max_queued

    @property
    def queued(self) -> int:
        return self.real.queued

    async def submit(self, transfers: list[Transfer]) -> list[object]:
        assert self.campus is not None
        for t in transfers:
            hit = self.pending.get(t.id)
            if hit is not None and hit[1] not in self.raced:
                term, original = hit
                self.raced.add(original)
                r = await self.campus.reverse(term, original_key=original, key=key())
                assert r.outcome is Outcome.APPROVED
        return await self.real.submit(transfers)  # type: ignore[return-value]


async def test_reversal_racing_its_original_nets_to_zero(w: World, engine: Engine) -> None:
    await w.top_up(10_000)
    await w.grant(300)
    await w.campus.create_room(room_id="D9", ledger=w.ledger)
    racing = _ReversalInTheWindow(engine)
    campus = Campus(_EngineView(engine, racing))  # type: ignore[arg-type]
    racing.campus = campus
    k1, k2, k3 = key(), key(), key()
    for k, term in ((k1, w.pos), (k2, w.water), (k3, w.kiosk)):
        for part in ("subsidy", "cash"):
            racing.pending[part_id(k, part)] = (term, k)
    r = await campus.purchase(w.pos, card_no=w.card, amount=500, key=k1)
    assert r.outcome is Outcome.APPROVED
    assert r.purses is not None and r.purses.total == 10_300  # undone before answering
    r = await campus.hold(w.water, card_no=w.card, amount=700, key=k2)
    assert r.outcome is Outcome.APPROVED and await w.balances() == (10_000, 300)
    r = await campus.buy_electricity(w.kiosk, card_no=w.card, room_id="D9", amount=900, key=k3)
    assert r.outcome is Outcome.APPROVED and r.room_balance == 0
    assert racing.raced == {k1, k2, k3}  # every race was staged
    assert await w.balances() == (10_000, 300)
    for acc in (w.canteen, w.water_acc):
        rec = await w.engine.store.get_account(acc)
        assert rec is not None and rec.state.balance == rec.state.credits_pending == 0


# -- infrastructure ------------------------------------------------------------------------------


async def test_overloaded_and_unavailable(w: World, engine: Engine) -> None:
    await w.top_up(1_000)
    await w.grant(100)
    tiny = Batcher(engine.store, max_queued=1)
    tiny.start()
    try:
        busy = Campus(_EngineView(engine, tiny))  # type: ignore[arg-type]
        r = await busy.purchase(w.pos, card_no=w.card, amount=500, key=key())  # 2 transfers
        assert r.outcome is Outcome.OVERLOADED
    finally:
        await tiny.stop()
    stopped = Campus(_EngineView(engine, tiny))  # type: ignore[arg-type]
    r = await stopped.purchase(w.pos, card_no=w.card, amount=50, key=key())
    assert r.outcome is Outcome.UNAVAILABLE
    assert await w.balances() == (1_000, 100)


def test_results_are_plain_structs() -> None:
    # the gateway may log or cache them: they must encode
    from engine.campus import PaymentResult, PurseBalances

    r = PaymentResult(Outcome.APPROVED, purses=PurseBalances(1, 2), timestamp=3)
    assert msgspec.json.decode(msgspec.json.encode(r), type=PaymentResult) == r

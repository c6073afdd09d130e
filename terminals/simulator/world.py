"""The campus a simulation builds in a ledger of its own, through the Campus API: the fixed
accounts (bank, subsidy fund, hot water, electricity, canteen windows), card holders and their
cards (some with a PIN or a daily limit, a few lost or replaced), dorm rooms with meters,
terminals of every kind, and the money (top-ups and subsidies, written in the books)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from collections.abc import Awaitable, Iterable
from typing import Final, NamedTuple

import msgspec

from engine import limits
from engine.campus import (
    Campus,
    Card,
    HolderKind,
    HolderResult,
    RegistryStatus,
    Replacement,
    Room,
    TerminalKind,
)
from engine.campus.accounts import derived_account_id
from engine.service import Engine
from ledger.account import Account
from ledger.status import AccountStatus
from ledger.transfer import Transfer
from ledger.types import AccountKind, TransferCode
from terminals.client import TerminalClient
from terminals.iso8583 import Message
from terminals.simulator.books import Books
from terminals.simulator.options import Options

# -- the holders ----------------------------------------------------------------------------------
PIN_P: Final = 0.10  # holders whose card asks for a PIN above PIN_THRESHOLD
LIMIT_P: Final = 0.10  # ... and, apart from those, holders whose card has a daily limit
POOR_P: Final = 0.1  # holders topped up with almost nothing (51s)
PIN: Final = "2468"
PIN_THRESHOLD: Final = 1_500
DAILY_LIMIT: Final = 4_000

_BASE36: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class SimHolder:
    """A card holder as the simulator sees it; ``total`` is its expected cash + subsidy."""

    __slots__ = ("card", "holder_id", "index", "limit", "lost", "old_card", "pin", "purse",
                 "subsidy", "total")

    def __init__(self, index: int, holder_id: str, card: str, purse: int, subsidy: int) -> None:
        self.index = index
        self.holder_id = holder_id
        self.card = card
        self.purse = purse
        self.subsidy = subsidy
        self.total = 0
        self.pin: str | None = None
        self.limit: int | None = None
        self.lost = False
        self.old_card: str | None = None  # a replaced card of this holder (answers 62)


class SimRoom(msgspec.Struct, frozen=True):
    """A dorm room and its electricity purse."""

    room_id: str
    account_id: int


class SimTerminal:
    """One terminal: its registration, its client (one connection) and its random stream."""

    def __init__(self, index: int, kind: TerminalKind, client: TerminalClient, account: int,
                 seed: int) -> None:
        self.index = index
        self.kind = kind
        self.client = client  # builds every message: its STAN counter outlives reconnects
        self.account = account
        self.rng = random.Random(seed)
        self.connected = False
        self.last: tuple[Message, Message] | None = None  # what a retransmission repeats
        self.reversible: tuple[Message, SimHolder, int, bool] | None = None
        self.room: SimRoom | None = None  # a meter's room
        self.offline: list[tuple[Message, SimHolder]] = []
        self.outage = False
        self.hold: tuple[Message, SimHolder, int] | None = None  # an open shower

    @property
    def tid(self) -> str:
        """The terminal id (field 41)."""
        return self.client.terminal_id


class World(msgspec.Struct):
    """Everything built for one run."""

    ledger: int
    bank: int
    fund: int
    water: int
    power: int
    merchants: list[int]
    holders: list[SimHolder]
    rooms: list[SimRoom]
    terminals: list[SimTerminal]
    mac_key: bytes = b""


class Sizes(NamedTuple):
    """How many of each a run builds."""

    pos: int
    water: int
    kiosk: int
    meter: int
    merchants: int
    holders: int

    @classmethod
    def of(cls, o: Options) -> Sizes:
        """A tenth of the terminals are meters, a tenth water valves, a twentieth kiosks, the
        rest canteen tills, five to a window; 4 holders per terminal unless told."""
        meter = max(1, o.terminals // 10)
        water = max(1, o.terminals // 10)
        kiosk = max(1, o.terminals // 20)
        pos = o.terminals - meter - water - kiosk
        holders = o.holders or max(50, 4 * o.terminals)
        return cls(pos, water, kiosk, meter, merchants=max(1, pos // 5), holders=holders)

    def kinds(self) -> list[TerminalKind]:
        """The kind of every terminal, by index."""
        return ([TerminalKind.POS] * self.pos + [TerminalKind.WATER] * self.water
                + [TerminalKind.KIOSK] * self.kiosk + [TerminalKind.METER] * self.meter)


def terminal_id(ledger: int, index: int) -> str:
    """A terminal id for (ledger, index): "S" + 7 base-36 characters of a hash, because
    terminal ids are unique across ledgers and a run must not meet an earlier run's ids."""
    n = int.from_bytes(hashlib.sha256(f"{ledger}/{index}".encode()).digest()[:8], "big")
    chars = []
    for _ in range(7):
        n, r = divmod(n, 36)
        chars.append(_BASE36[r])
    return "S" + "".join(chars)


async def bounded(jobs: Iterable[Awaitable[None]], limit: int) -> None:
    """Await ``jobs`` (coroutines not yet started) with at most ``limit`` running at once."""
    sem = asyncio.Semaphore(limit)

    async def one(job: Awaitable[None]) -> None:
        async with sem:
            await job

    await asyncio.gather(*(one(j) for j in jobs))


async def build_campus(
    engine: Engine, campus: Campus, o: Options, host: str, port: int
) -> tuple[World, Books]:
    """Create the simulation's ledger: accounts, holders and cards with money, rooms, and
    terminals of every kind (clients pointed at ``host:port``). RuntimeError on a refusal."""
    rng = random.Random(o.seed)
    ledger = o.ledger or random.SystemRandom().randrange(1_000_000, 2**31 - 1)
    sizes = Sizes.of(o)
    world = await _open_ledger(engine, ledger, sizes.merchants)
    books = Books({world.bank, world.fund})
    profiles = [rng.random() for _ in range(sizes.holders)]
    world.holders = await _create_holders(campus, ledger, profiles)
    await _lose_and_replace(campus, ledger, world.holders, rng)
    world.rooms = await _create_rooms(campus, ledger, sizes.meter)
    await _fund(engine, world, books, rng)
    world.mac_key = hashlib.sha256(b"onecard-simulator" + ledger.to_bytes(8, "big")).digest()
    world.terminals = await _register_terminals(campus, world, sizes, o.seed, host, port)
    return world, books


def _account(ledger: int, name: str, kind: AccountKind) -> Account:
    return Account(id=derived_account_id(ledger, f"simulator/{name}", kind), ledger=ledger,
                   kind=kind, code=1, name=name)


async def _open_ledger(engine: Engine, ledger: int, merchants: int) -> World:
    """The fixed accounts, in a ledger that must be fresh; the world around them, still empty."""
    fixed = [
        _account(ledger, "bank", AccountKind.CLEARING),
        _account(ledger, "subsidy fund", AccountKind.FUND),
        _account(ledger, "hot water", AccountKind.UTILITY),
        _account(ledger, "electricity", AccountKind.UTILITY),
        *(_account(ledger, f"canteen window {i}", AccountKind.MERCHANT)
          for i in range(merchants)),
    ]
    statuses = await engine.store.create_accounts(fixed)
    if any(s is not AccountStatus.CREATED for s in statuses):
        raise RuntimeError(f"ledger {ledger} is not fresh: {statuses[0]} (try another --ledger)")
    bank, fund, water, power = (a.id for a in fixed[:4])
    return World(ledger, bank, fund, water, power, [a.id for a in fixed[4:]], [], [], [])


async def _create_holders(campus: Campus, ledger: int, profiles: list[float]) -> list[SimHolder]:
    """One holder and card per profile draw (which says whether the card has a PIN or a
    daily limit), in index order."""
    holders: list[SimHolder] = []

    async def make_holder(i: int) -> None:
        hid = f"SIM{i:07d}"
        r = await campus.create_holder(holder_id=hid, ledger=ledger, name=f"Student {i}",
                                       kind=HolderKind.STUDENT)
        if not isinstance(r, HolderResult) or r.status is not RegistryStatus.CREATED:
            raise RuntimeError(f"holder {hid}: {r}")
        h = SimHolder(i, hid, f"9{ledger:010d}{i:07d}", r.holder.purse_account_id,
                      r.holder.subsidy_account_id)
        if profiles[i] < PIN_P:
            h.pin = PIN
        elif profiles[i] < PIN_P + LIMIT_P:
            h.limit = DAILY_LIMIT
        card = await campus.create_card(card_no=h.card, holder_id=hid, ledger=ledger,
                                        daily_limit=h.limit, pin=h.pin,
                                        pin_threshold=PIN_THRESHOLD if h.pin else None)
        if not isinstance(card, Card):
            raise RuntimeError(f"card {h.card}: {card}")
        holders.append(h)

    jobs = (make_holder(i) for i in range(len(profiles)))
    await bounded(jobs, limits.SIMULATOR_SETUP_CONCURRENCY)
    holders.sort(key=lambda h: h.index)
    return holders


async def _lose_and_replace(
    campus: Campus, ledger: int, holders: list[SimHolder], rng: random.Random
) -> None:
    """A few lost cards, a few replaced ones (their old numbers still get shown at the tills)."""
    for n, h in enumerate(rng.sample(holders, k=max(2, len(holders) // 50))):
        if n % 2 == 0:
            if not isinstance(await campus.report_lost(h.card), Card):
                raise RuntimeError(f"cannot report {h.card} lost")
            h.lost = True
        else:
            new = f"8{ledger:010d}{h.index:07d}"
            if not isinstance(await campus.replace_card(h.card, new), Replacement):
                raise RuntimeError(f"cannot replace {h.card}")
            h.old_card, h.card = h.card, new


async def _create_rooms(campus: Campus, ledger: int, count: int) -> list[SimRoom]:
    rooms: list[SimRoom] = []
    for i in range(count):
        room = await campus.create_room(room_id=f"D{ledger}-{i:04d}", ledger=ledger)
        if not isinstance(room, Room):
            raise RuntimeError(f"room: {room}")
        rooms.append(SimRoom(room.room_id, room.account_id))
    return rooms


async def _fund(engine: Engine, world: World, books: Books, rng: random.Random) -> None:
    """Top-ups from the bank and subsidies from the fund; rooms get electricity money."""
    transfers: list[Transfer] = []

    def add(debit: int, credit: int, amount: int, code: TransferCode) -> None:
        transfers.append(Transfer(id=uuid.uuid4(), ledger=world.ledger, debit_account_id=debit,
                                  credit_account_id=credit, amount=amount, code=code,
                                  user_data="simulator"))
        books.move(debit, credit, amount)

    for h in world.holders:
        cash = rng.randrange(0, 600) if rng.random() < POOR_P else rng.randrange(2_000, 30_000)
        subsidy = rng.choice((0, 0, 1_000, 3_000, 5_000))
        if cash:
            add(world.bank, h.purse, cash, TransferCode.TOP_UP)
        if subsidy:
            add(world.fund, h.subsidy, subsidy, TransferCode.SUBSIDY)
        h.total = cash + subsidy
    for room in world.rooms:
        add(world.bank, room.account_id, rng.randrange(200, 3_000), TransferCode.TOP_UP)
    for i in range(0, len(transfers), limits.SIMULATOR_FUNDING_CHUNK):
        chunk = transfers[i : i + limits.SIMULATOR_FUNDING_CHUNK]
        results = await engine.batcher.submit(chunk)
        bad = [r for r in results if not r.status.ok]
        if bad:
            raise RuntimeError(f"funding failed: {bad[0]}")


def _acceptor(world: World, index: int, kind: TerminalKind) -> tuple[int, str]:
    """The account a terminal credits and its merchant id (field 42)."""
    if kind is TerminalKind.POS:
        n = len(world.merchants)
        return world.merchants[index % n], f"CANTEEN{index % n:08d}"
    if kind is TerminalKind.WATER:
        return world.water, "HOTWATER0000001"
    return world.power, "ELECTRIC0000001"


async def _register_terminals(
    campus: Campus, world: World, sizes: Sizes, seed: int, host: str, port: int
) -> list[SimTerminal]:
    """Every terminal registered under the world's MAC key, its client pointed at
    ``host:port``; meters share the rooms round robin. In index order."""
    terminals: list[SimTerminal] = []
    first_meter = sizes.pos + sizes.water + sizes.kiosk

    async def make_terminal(i: int, kind: TerminalKind) -> None:
        tid = terminal_id(world.ledger, i)
        account, mid = _acceptor(world, i, kind)
        st = await campus.register_terminal(terminal_id=tid, merchant_id=mid,
                                            ledger=world.ledger, kind=kind, account_id=account,
                                            mac_key=world.mac_key)
        if st is not RegistryStatus.CREATED:
            raise RuntimeError(f"terminal {tid}: {st} (try another --ledger)")
        client = TerminalClient(host, port, terminal_id=tid, merchant_id=mid,
                                mac_key=world.mac_key,
                                timeout_s=limits.SIMULATOR_CLIENT_TIMEOUT_S)
        t = SimTerminal(i, kind, client, account, seed * 1_000_003 + i)
        if kind is TerminalKind.METER:
            t.room = world.rooms[(i - first_meter) % len(world.rooms)]
        terminals.append(t)

    jobs = (make_terminal(i, k) for i, k in enumerate(sizes.kinds()))
    await bounded(jobs, limits.SIMULATOR_SETUP_CONCURRENCY)
    terminals.sort(key=lambda t: t.index)
    return terminals

"""``onecard simulate``: a canteen lunch rush of ISO 8583 terminals, then a consistency check.

The simulator builds a fresh campus in its own ledger through the Campus API (holders, cards,
canteen merchants, POS terminals, water valves, kiosks, dorm rooms with meters, top-ups and
subsidies), starts an in-process Gateway (or drives one already running, ``--iso``), and lets
every terminal talk to it over real TCP with :class:`terminals.client.TerminalClient`:
meals most of the time, balance inquiries, hot-water holds and their completions, electricity
purchases and meter readings, ~2 % retransmissions (whose answers must be identical), ~0.5 %
reversals, and a burst of offline advices from the tills cut off by a simulated outage.

The terminals run in ``--workers`` separate processes (default 1; 0 runs them in this one),
each driving its share of the terminals over its own connections: a load generator must not
eat the CPU of the gateway it measures. Each worker reports the money its answers moved and
the parent adds it up.

It keeps its own books from the answers alone (an approval moved the money, anything else did
not) and at the end compares every account of the ledger with them, checks that nothing is
left pending and that debits equal credits. Any difference, any unexpected response code, any
retransmission answered differently, or any request left without a definitive answer makes
the exit code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

import asyncpg
import msgspec
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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
from terminals.client import ClientError, TerminalClient
from terminals.gateway import Gateway
from terminals.iso8583 import AccountType, Message, parse_amounts

__all__ = ["Options", "Report", "World", "show", "simulate"]

log = logging.getLogger(__name__)

# -- limits of this module --------------------------------------------------------------------
MIN_TERMINALS: Final = 4  # one of each kind
SETUP_CONCURRENCY: Final = 16  # registry calls in flight while building the campus
SIGN_ON_CONCURRENCY: Final = 64  # terminals connecting and signing on at once
FUNDING_CHUNK: Final = 4096  # top-up transfers per batcher request
CLIENT_TIMEOUT_S: Final = 10.0
MAX_ATTEMPTS: Final = 12  # a request answered 96, or not at all, is retransmitted this often
RETRY_BACKOFF_S: Final = 0.05  # doubled per attempt up to RETRY_BACKOFF_MAX_S
RETRY_BACKOFF_MAX_S: Final = 1.0
PROGRESS_INTERVAL_S: Final = 0.25
MAX_PROBLEMS: Final = 50  # problems kept for the report
DEFAULT_WORKERS: Final = 1  # processes driving the terminals (0: this process)
MAX_WORKERS: Final = 64

# -- the traffic mix ----------------------------------------------------------------------------
RETRANSMIT_P: Final = 0.02
REVERSAL_P: Final = 0.005
POS_INQUIRY_P: Final = 0.08
KIOSK_INQUIRY_P: Final = 0.35
OVER_COMPLETION_P: Final = 0.02  # a valve asks for more than it held (13), then corrects
NOTHING_USED_P: Final = 0.1  # a shower that ran dry: completion of 0 releases the hold
OUTAGE_START: Final = 0.4  # of the duration
OUTAGE_LENGTH: Final = 0.2
OUTAGE_SHARE: Final = 0.2  # of the POS terminals
LOST_CARD_P: Final = 0.01  # a till is shown a card reported lost (41)
OLD_CARD_P: Final = 0.01  # ... or a card that was replaced (62)
WRONG_PIN_P: Final = 0.03
POOR_P: Final = 0.1  # holders topped up with almost nothing (51s)
PIN: Final = "2468"
PIN_THRESHOLD: Final = 1_500
DAILY_LIMIT: Final = 4_000
MEAL_PRICES: Final = (450, 800, 1_050, 1_200, 1_500, 1_800, 2_200, 2_600)

_BASE36: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Options(msgspec.Struct, frozen=True, kw_only=True):
    """What to simulate."""

    terminals: int = 500
    duration: float = 60.0
    rate: float = 2000.0
    seed: int = 0
    holders: int | None = None
    ledger: int | None = None
    iso: tuple[str, int] | None = None
    progress: bool = True
    workers: int = DEFAULT_WORKERS


class Op(enum.StrEnum):
    """Message types as the report names them."""

    SIGN_ON = "0800 sign-on"
    MEAL = "0200 purchase"
    INQUIRY = "0200 inquiry"
    ELECTRICITY = "0200 electricity"
    ADVICE = "0220 offline advice"
    HOLD = "0100 hot-water hold"
    COMPLETION = "0220 completion"
    METER = "0220 room meter"
    REVERSAL = "0400 reversal"
    RETRANSMISSION = "retransmission"


# ---------------------------------------------------------------------------------------------
# The campus the simulation builds


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


class Books:
    """Expected balances kept from the answers: each non-holder account's balance on its
    normal side (clearing and fund are debit-normal); holders keep theirs in SimHolder."""

    def __init__(self, debit_normal: set[int]) -> None:
        self.debit_normal = debit_normal
        self.balance: Counter[int] = Counter()

    def move(self, debit: int, credit: int, amount: int) -> None:
        """``amount`` went from ``debit`` to ``credit``."""
        self.balance[debit] += amount if debit in self.debit_normal else -amount
        self.balance[credit] += -amount if credit in self.debit_normal else amount


def terminal_id(ledger: int, index: int) -> str:
    """A terminal id for (ledger, index): "S" + 7 base-36 characters of a hash, because
    terminal ids are unique across ledgers and a run must not meet an earlier run's ids."""
    n = int.from_bytes(hashlib.sha256(f"{ledger}/{index}".encode()).digest()[:8], "big")
    chars = []
    for _ in range(7):
        n, r = divmod(n, 36)
        chars.append(_BASE36[r])
    return "S" + "".join(chars)


def _account(ledger: int, name: str, kind: AccountKind) -> Account:
    return Account(id=derived_account_id(ledger, f"simulator/{name}", kind), ledger=ledger,
                   kind=kind, code=1, name=name)


async def _bounded(jobs: Iterable[Awaitable[None]], limit: int) -> None:
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
    n_meter = max(1, o.terminals // 10)
    n_water = max(1, o.terminals // 10)
    n_kiosk = max(1, o.terminals // 20)
    n_pos = o.terminals - n_meter - n_water - n_kiosk
    n_merchants = max(1, n_pos // 5)
    fixed = [
        _account(ledger, "bank", AccountKind.CLEARING),
        _account(ledger, "subsidy fund", AccountKind.FUND),
        _account(ledger, "hot water", AccountKind.UTILITY),
        _account(ledger, "electricity", AccountKind.UTILITY),
        *(_account(ledger, f"canteen window {i}", AccountKind.MERCHANT)
          for i in range(n_merchants)),
    ]
    statuses = await engine.store.create_accounts(fixed)
    if any(s is not AccountStatus.CREATED for s in statuses):
        raise RuntimeError(f"ledger {ledger} is not fresh: {statuses[0]} (try another --ledger)")
    bank, fund, water, power = (a.id for a in fixed[:4])
    merchants = [a.id for a in fixed[4:]]
    books = Books({bank, fund})

    n_holders = o.holders or max(50, 4 * o.terminals)
    holders: list[SimHolder] = []
    profiles = [rng.random() for _ in range(n_holders)]

    async def make_holder(i: int) -> None:
        hid = f"SIM{i:07d}"
        r = await campus.create_holder(holder_id=hid, ledger=ledger, name=f"Student {i}",
                                       kind=HolderKind.STUDENT)
        if not isinstance(r, HolderResult) or r.status is not RegistryStatus.CREATED:
            raise RuntimeError(f"holder {hid}: {r}")
        h = SimHolder(i, hid, f"9{ledger:010d}{i:07d}", r.holder.purse_account_id,
                      r.holder.subsidy_account_id)
        if profiles[i] < 0.10:
            h.pin = PIN
        elif profiles[i] < 0.20:
            h.limit = DAILY_LIMIT
        card = await campus.create_card(card_no=h.card, holder_id=hid, ledger=ledger,
                                        daily_limit=h.limit, pin=h.pin,
                                        pin_threshold=PIN_THRESHOLD if h.pin else None)
        if not isinstance(card, Card):
            raise RuntimeError(f"card {h.card}: {card}")
        holders.append(h)

    await _bounded((make_holder(i) for i in range(n_holders)), SETUP_CONCURRENCY)
    holders.sort(key=lambda h: h.index)

    # a few lost cards, a few replaced ones (their old numbers still get shown at the tills)
    for n, h in enumerate(rng.sample(holders, k=max(2, n_holders // 50))):
        if n % 2 == 0:
            if not isinstance(await campus.report_lost(h.card), Card):
                raise RuntimeError(f"cannot report {h.card} lost")
            h.lost = True
        else:
            new = f"8{ledger:010d}{h.index:07d}"
            if not isinstance(await campus.replace_card(h.card, new), Replacement):
                raise RuntimeError(f"cannot replace {h.card}")
            h.old_card, h.card = h.card, new

    rooms: list[SimRoom] = []
    for i in range(n_meter):
        room = await campus.create_room(room_id=f"D{ledger}-{i:04d}", ledger=ledger)
        if not isinstance(room, Room):
            raise RuntimeError(f"room: {room}")
        rooms.append(SimRoom(room.room_id, room.account_id))

    world = World(ledger, bank, fund, water, power, merchants, holders, rooms, [])
    await _fund(engine, world, books, rng)

    kinds = ([TerminalKind.POS] * n_pos + [TerminalKind.WATER] * n_water
             + [TerminalKind.KIOSK] * n_kiosk + [TerminalKind.METER] * n_meter)
    key = hashlib.sha256(b"onecard-simulator" + ledger.to_bytes(8, "big")).digest()
    world.mac_key = key

    async def make_terminal(i: int, kind: TerminalKind) -> None:
        tid = terminal_id(ledger, i)
        if kind is TerminalKind.POS:
            account, mid = merchants[i % n_merchants], f"CANTEEN{i % n_merchants:08d}"
        elif kind is TerminalKind.WATER:
            account, mid = water, "HOTWATER0000001"
        else:
            account, mid = power, "ELECTRIC0000001"
        st = await campus.register_terminal(terminal_id=tid, merchant_id=mid, ledger=ledger,
                                            kind=kind, account_id=account, mac_key=key)
        if st is not RegistryStatus.CREATED:
            raise RuntimeError(f"terminal {tid}: {st} (try another --ledger)")
        client = TerminalClient(host, port, terminal_id=tid, merchant_id=mid, mac_key=key,
                                timeout_s=CLIENT_TIMEOUT_S)
        t = SimTerminal(i, kind, client, account, o.seed * 1_000_003 + i)
        if kind is TerminalKind.METER:
            t.room = rooms[(i - n_pos - n_water - n_kiosk) % len(rooms)]
        world.terminals.append(t)

    await _bounded((make_terminal(i, k) for i, k in enumerate(kinds)), SETUP_CONCURRENCY)
    world.terminals.sort(key=lambda t: t.index)
    return world, books


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
    for i in range(0, len(transfers), FUNDING_CHUNK):
        results = await engine.batcher.submit(transfers[i : i + FUNDING_CHUNK])
        bad = [r for r in results if not r.status.ok]
        if bad:
            raise RuntimeError(f"funding failed: {bad[0]}")


# ---------------------------------------------------------------------------------------------
# Traffic


class Stats:
    """Answer counts, latencies and everything that went wrong."""

    def __init__(self) -> None:
        self.codes: Counter[tuple[Op, str]] = Counter()
        self.latencies: list[float] = []
        self.problems: list[str] = []
        self.unresolved = 0
        self.retransmit_mismatch = 0
        self.unexpected = 0

    @property
    def answered(self) -> int:
        """Answers received (every attempt)."""
        return sum(self.codes.values())

    def problem(self, text: str) -> None:
        """Record a problem for the report (the first MAX_PROBLEMS)."""
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)


def outage_cut(terminals: list[SimTerminal], seed: int) -> set[int]:
    """Indexes of the POS terminals the simulated outage cuts off."""
    pos = [t for t in terminals if t.kind is TerminalKind.POS]
    return {t.index for t in random.Random(seed).sample(pos, k=int(len(pos) * OUTAGE_SHARE))}


class Driver:
    """Runs every terminal's loop against the gateway and keeps the books from the answers."""

    def __init__(
        self,
        world: World,
        books: Books,
        stats: Stats,
        o: Options,
        *,
        terminals_total: int | None = None,
        cut: set[int] | None = None,
    ) -> None:
        """``world.terminals`` may be a worker's share of ``terminals_total`` terminals (the
        rate is per run, not per share); ``cut`` are the indexes of the POS terminals the
        outage cuts off (default: drawn from the seed, as every share must agree on it)."""
        self.world = world
        self.books = books
        self.stats = stats
        self.o = o
        self.per_terminal_rate = o.rate / (terminals_total or len(world.terminals))
        self.cut = cut if cut is not None else outage_cut(world.terminals, o.seed)
        self.active = [h for h in world.holders if not h.lost]
        self.lost = [h for h in world.holders if h.lost]
        self.replaced = [h for h in world.holders if h.old_card is not None]

    # -- exchanges -------------------------------------------------------------------------

    async def exchange(self, t: SimTerminal, op: Op, msg: Message) -> Message | None:
        """Send ``msg`` until a definitive answer (not 96, not lost); None if none came."""
        delay = RETRY_BACKOFF_S
        for _ in range(MAX_ATTEMPTS):
            t0 = time.perf_counter()
            try:
                if not t.connected:
                    await t.client.connect()
                    t.connected = True
                ans = await t.client.request(msg)
            except (ClientError, OSError) as e:
                # the client closed the connection; the same message goes out again
                log.debug("%s: %s; retransmitting", t.tid, e)
                t.connected = False
            else:
                self.stats.latencies.append(time.perf_counter() - t0)
                code = ans.response_code or ""
                self.stats.codes[(op, code)] += 1
                if code != "96":
                    return ans
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_BACKOFF_MAX_S)
        self.stats.unresolved += 1
        self.stats.problem(f"{t.tid} {op}: no definitive answer in {MAX_ATTEMPTS} attempts")
        return None

    async def send(self, t: SimTerminal, op: Op, msg: Message, allowed: set[str]) -> str:
        """Exchange ``msg``, remember it for a retransmission, check the code; the code, or
        "" when nothing definitive came back."""
        ans = await self.exchange(t, op, msg)
        if ans is None:
            return ""
        t.last = (msg, ans)
        code = ans.response_code or ""
        if code not in allowed:
            self.stats.unexpected += 1
            self.stats.problem(f"{t.tid} {op}: answered {code}, expected {sorted(allowed)}")
        if op is Op.METER:
            self._check_room_block(t, ans, code)
        return code

    def _check_room_block(self, t: SimTerminal, ans: Message, code: str) -> None:
        blocks = parse_amounts(ans.additional_amounts) if ans.additional_amounts else []
        room = [b.amount for b in blocks if b.account_type == AccountType.ROOM]
        if len(room) != 1 or (code == "00") != (room[0] > 0):
            self.stats.unexpected += 1
            self.stats.problem(f"{t.tid} meter: code {code} with room block {room}")

    # -- choices ---------------------------------------------------------------------------

    def pick_card(self, rng: random.Random) -> tuple[SimHolder, str, set[str]]:
        """A card to present and the codes a payment with it may get."""
        roll = rng.random()
        if roll < LOST_CARD_P and self.lost:
            h = rng.choice(self.lost)
            return h, h.card, {"41"}
        if roll < LOST_CARD_P + OLD_CARD_P and self.replaced:
            h = rng.choice(self.replaced)
            assert h.old_card is not None
            return h, h.old_card, {"62"}
        h = rng.choice(self.active)
        return h, h.card, {"00", "51", "61"} if h.limit is not None else {"00", "51"}

    @staticmethod
    def pin_for(
        h: SimHolder, amount: int, rng: random.Random, allowed: set[str]
    ) -> tuple[str | None, set[str]]:
        """The PIN the holder types (sometimes wrongly) and the codes that leaves possible."""
        if h.pin is None or amount <= PIN_THRESHOLD or allowed <= {"41", "62"}:
            return None, allowed
        if rng.random() < WRONG_PIN_P:
            return "0000", {"55"}
        return h.pin, allowed

    @staticmethod
    def inquiry_codes(allowed: set[str]) -> set[str]:
        return allowed if allowed <= {"41", "62"} else {"00"}

    def spend(self, h: SimHolder, account: int, amount: int) -> None:
        """``amount`` left ``h``'s purses for ``account`` (negative: it came back)."""
        h.total -= amount
        self.books.balance[account] += amount

    # -- per kind ----------------------------------------------------------------------------

    async def pos_step(self, t: SimTerminal) -> None:
        rng = t.rng
        h, card, allowed = self.pick_card(rng)
        if t.outage:  # offline: the till records the meal and sends an advice later
            t.offline.append((t.client.offline_advice(card, rng.choice(MEAL_PRICES)), h))
            return
        if rng.random() < POS_INQUIRY_P:
            await self.send(t, Op.INQUIRY, t.client.inquiry(card), self.inquiry_codes(allowed))
            return
        amount = rng.choice(MEAL_PRICES)
        pin, allowed = self.pin_for(h, amount, rng, allowed)
        msg = t.client.purchase(card, amount, pin=pin)
        approved = await self.send(t, Op.MEAL, msg, allowed) == "00"
        if approved:
            self.spend(h, t.account, amount)
        t.reversible = (msg, h, amount, approved)

    async def send_offline(self, t: SimTerminal) -> None:
        """The outage is over: every advice recorded meanwhile, back to back."""
        queued, t.offline = t.offline, []
        for msg, h in queued:
            assert msg.amount is not None
            allowed = {"41"} if h.lost else {"62"} if msg.card_no == h.old_card else {"00"}
            approved = await self.send(t, Op.ADVICE, msg, allowed) == "00"
            if approved:
                self.spend(h, t.account, msg.amount)
            t.reversible = (msg, h, msg.amount, approved)

    async def reverse_last(self, t: SimTerminal) -> None:
        if t.reversible is None:
            return
        original, h, amount, approved = t.reversible
        t.reversible = None
        code = await self.send(t, Op.REVERSAL, t.client.reversal(original), {"00"})
        if code == "00" and approved:
            self.spend(h, t.account, -amount)

    async def retransmit(self, t: SimTerminal) -> None:
        if t.last is None:
            return
        msg, first = t.last
        ans = await self.exchange(t, Op.RETRANSMISSION, msg)
        if ans is not None and ans != first:
            self.stats.retransmit_mismatch += 1
            self.stats.problem(f"{t.tid}: retransmitted {msg.mti} STAN {msg.stan} answered "
                               f"{ans.response_code}/{ans.rrn}, first "
                               f"{first.response_code}/{first.rrn}")

    async def water_step(self, t: SimTerminal) -> None:
        if t.hold is not None:
            hold, t.hold = t.hold, None
            await self.complete(t, *hold)
            return
        h, card, allowed = self.pick_card(t.rng)
        amount = t.rng.randrange(300, 900)
        msg = t.client.hold(card, amount)
        if await self.send(t, Op.HOLD, msg, allowed) == "00":
            t.hold = (msg, h, amount)

    async def complete(self, t: SimTerminal, hold: Message, h: SimHolder, held: int) -> None:
        rng = t.rng
        if rng.random() < OVER_COMPLETION_P:
            await self.send(t, Op.COMPLETION, t.client.completion(hold, held + 1), {"13"})
        used = 0 if rng.random() < NOTHING_USED_P else rng.randrange(1, held + 1)
        if await self.send(t, Op.COMPLETION, t.client.completion(hold, used), {"00"}) == "00":
            self.spend(h, t.account, used)

    async def kiosk_step(self, t: SimTerminal) -> None:
        rng = t.rng
        h, card, allowed = self.pick_card(rng)
        if rng.random() < KIOSK_INQUIRY_P:
            await self.send(t, Op.INQUIRY, t.client.inquiry(card), self.inquiry_codes(allowed))
            return
        room = rng.choice(self.world.rooms)
        amount = rng.randrange(500, 3_000)
        pin, allowed = self.pin_for(h, amount, rng, allowed)
        msg = t.client.electricity_purchase(card, amount, room.room_id, pin=pin)
        if await self.send(t, Op.ELECTRICITY, msg, allowed) == "00":
            h.total -= amount
            self.books.balance[room.account_id] += amount

    async def meter_step(self, t: SimTerminal) -> None:
        assert t.room is not None
        amount = t.rng.randrange(20, 200)
        msg = t.client.meter_advice(t.room.room_id, amount)
        if await self.send(t, Op.METER, msg, {"00", "51"}) in ("00", "51"):
            self.books.move(t.room.account_id, t.account, amount)  # posted either way (force)

    # -- the run ------------------------------------------------------------------------------

    async def run(self, progress: Callable[[], None]) -> float:
        """Sign every terminal on, drive them all for the duration, then let them finish
        (open showers completed, offline advices delivered). Returns the traffic time."""
        o = self.o
        cut = self.cut

        async def sign_on(t: SimTerminal) -> None:
            ans = await self.exchange(t, Op.SIGN_ON, t.client.sign_on())
            if ans is None or ans.response_code != "00":
                raise RuntimeError(f"terminal {t.tid} cannot sign on: {ans}")

        await _bounded((sign_on(t) for t in self.world.terminals), SIGN_ON_CONCURRENCY)
        start = time.monotonic()
        end = start + o.duration
        outage = (start + o.duration * OUTAGE_START,
                  start + o.duration * (OUTAGE_START + OUTAGE_LENGTH))

        async def loop(t: SimTerminal) -> None:
            rng = t.rng
            await asyncio.sleep(rng.random() / self.per_terminal_rate)
            while (now := time.monotonic()) < end:
                was_out = t.outage
                t.outage = t.index in cut and outage[0] <= now < outage[1]
                if was_out and not t.outage:
                    await self.send_offline(t)
                roll = rng.random()
                if roll < RETRANSMIT_P and not t.outage:
                    await self.retransmit(t)
                elif roll < RETRANSMIT_P + REVERSAL_P and t.kind is TerminalKind.POS \
                        and not t.outage:
                    await self.reverse_last(t)
                elif t.kind is TerminalKind.POS:
                    await self.pos_step(t)
                elif t.kind is TerminalKind.WATER:
                    await self.water_step(t)
                elif t.kind is TerminalKind.KIOSK:
                    await self.kiosk_step(t)
                else:
                    await self.meter_step(t)
                await asyncio.sleep(rng.expovariate(self.per_terminal_rate))
            t.outage = False
            await self.send_offline(t)
            if t.hold is not None:
                hold, t.hold = t.hold, None
                await self.complete(t, *hold)

        async def ticker() -> None:
            while True:
                progress()
                await asyncio.sleep(PROGRESS_INTERVAL_S)

        tick = asyncio.create_task(ticker())
        try:
            await asyncio.gather(*(loop(t) for t in self.world.terminals))
        finally:
            tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tick
            progress()
            for t in self.world.terminals:
                await t.client.close()
        return time.monotonic() - start


# ---------------------------------------------------------------------------------------------
# The check

SQL_LEDGER_ACCOUNTS: Final = """
SELECT id, kind, debits_posted, credits_posted, debits_pending, credits_pending
FROM accounts WHERE ledger = $1
"""


class Check(msgspec.Struct, frozen=True):
    """What the ledger said."""

    accounts: int
    mismatched: int
    pending: int
    zero_sum: bool


def _signed(r: asyncpg.Record) -> int:
    d, c = r["debits_posted"], r["credits_posted"]
    return int(c - d if AccountKind(r["kind"]).credit_normal else d - c)


async def check_ledger(engine: Engine, world: World, books: Books, stats: Stats) -> Check:
    """Compare every account of the simulation's ledger with the books (one set-based read),
    check that nothing is pending and that debits equal credits."""
    async with engine.store.pool.acquire() as conn:
        rows = await conn.fetch(SQL_LEDGER_ACCOUNTS, world.ledger)
    live = {r["id"]: r for r in rows}
    mismatched = 0
    holder_accounts: set[int] = set()
    for h in world.holders:
        holder_accounts |= {h.purse, h.subsidy}
        got = sum(_signed(live[a]) for a in (h.purse, h.subsidy) if a in live)
        if got != h.total:
            mismatched += 1
            stats.problem(f"holder {h.holder_id}: purses hold {got}, expected {h.total}")
    for aid, r in live.items():
        if aid not in holder_accounts and _signed(r) != books.balance[aid]:
            mismatched += 1
            stats.problem(f"account {aid} ({r['kind']}): balance {_signed(r)}, "
                          f"expected {books.balance[aid]}")
    for aid in books.balance.keys() - live.keys():
        mismatched += 1
        stats.problem(f"account {aid} is missing from the ledger")
    pending = sum(1 for r in rows if r["debits_pending"] or r["credits_pending"])
    if pending:
        stats.problem(f"{pending} accounts still have pending amounts")
    zero_sum = (
        sum(r["debits_posted"] for r in rows) == sum(r["credits_posted"] for r in rows)
        and sum(r["debits_pending"] for r in rows) == sum(r["credits_pending"] for r in rows)
    )
    if not zero_sum:
        stats.problem("the ledger's debits and credits differ")
    return Check(len(rows), mismatched, pending, zero_sum)


# ---------------------------------------------------------------------------------------------
# Report


class Report(msgspec.Struct, frozen=True):
    """The outcome of a run."""

    ledger: int
    terminals: int
    holders: int
    duration_s: float
    answered: int
    throughput: float
    p50_ms: float
    p99_ms: float
    codes: dict[str, dict[str, int]]
    accounts_checked: int
    mismatched_accounts: int
    pending_left: int
    zero_sum: bool
    unresolved: int
    retransmit_mismatch: int
    unexpected: int
    problems: list[str]

    @property
    def consistent(self) -> bool:
        """True when the ledger matches the books and every answer was as expected."""
        return (
            self.mismatched_accounts == 0 and self.pending_left == 0 and self.zero_sum
            and self.unresolved == 0 and self.retransmit_mismatch == 0 and self.unexpected == 0
        )


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def show(report: Report, console: Console) -> None:
    """Print the answers by message type and code, the figures, and the check."""
    all_codes = sorted({c for per in report.codes.values() for c in per})
    table = Table(title="answers by message type and response code")
    table.add_column("message")
    for c in all_codes:
        table.add_column(c, justify="right")
    table.add_column("total", justify="right", style="bold")
    for op in Op:
        per = report.codes.get(str(op))
        if per:
            table.add_row(str(op), *(str(per.get(c, "")) for c in all_codes),
                          str(sum(per.values())))
    console.print(table)
    ok, bad = "[green]ok[/]", "[red]FAILED[/]"

    def verdict(n: int) -> str:
        return ok if n == 0 else f"{bad} ({n})"

    summary = Table(title="run", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    for what, value in (
        ("ledger", str(report.ledger)),
        ("terminals / holders", f"{report.terminals} / {report.holders}"),
        ("traffic time", f"{report.duration_s:.1f} s"),
        ("answers", f"{report.answered:,}"),
        ("throughput", f"{report.throughput:,.0f} answers/s"),
        ("latency p50 / p99", f"{report.p50_ms:.1f} / {report.p99_ms:.1f} ms"),
        ("accounts checked", f"{report.accounts_checked:,}"),
        ("balances as expected", verdict(report.mismatched_accounts)),
        ("nothing left pending", verdict(report.pending_left)),
        ("debits = credits", ok if report.zero_sum else bad),
        ("every request answered", verdict(report.unresolved)),
        ("retransmissions identical", verdict(report.retransmit_mismatch)),
        ("response codes as expected", verdict(report.unexpected)),
    ):
        summary.add_row(what, value)
    console.print(summary)
    for p in report.problems[:20]:
        console.print(f"[red]- {p}", highlight=False)
    console.print("[green bold]consistent[/]" if report.consistent else "[red bold]INCONSISTENT[/]")


# ---------------------------------------------------------------------------------------------
# Entry points


async def simulate(
    dsn: str,
    o: Options,
    *,
    console: Console | None = None,
    before_check: Callable[[Engine, World], Awaitable[None]] | None = None,
) -> Report:
    """Build a campus, drive it, check it. ``before_check`` runs between traffic and check
    (tests use it to prove the check notices tampering)."""
    if o.terminals < MIN_TERMINALS:
        raise ValueError(f"--terminals must be at least {MIN_TERMINALS}")
    if o.duration <= 0 or o.rate <= 0:
        raise ValueError("--duration and --rate must be positive")
    if not 0 <= o.workers <= MAX_WORKERS:
        raise ValueError(f"--workers must be in 0..{MAX_WORKERS}")
    console = console or Console()
    engine = Engine(dsn)
    await engine.start()
    gateway: Gateway | None = None
    try:
        campus = Campus(engine)
        if o.iso is None:
            gateway = Gateway(engine, campus=campus)
            await gateway.start("127.0.0.1", 0)
            host, port = "127.0.0.1", gateway.port
        else:
            host, port = o.iso
        with console.status("building the campus…"):
            world, books = await build_campus(engine, campus, o, host, port)
        console.print(
            f"ledger {world.ledger}: {len(world.holders)} holders, {len(world.terminals)} "
            f"terminals, {len(world.rooms)} rooms; gateway {host}:{port}",
            highlight=False,
        )
        stats = Stats()
        if o.workers:
            elapsed = await _drive_workers(world, books, stats, o, host, port, console)
        else:
            elapsed = await _drive(Driver(world, books, stats, o), console, o)
        if before_check is not None:
            await before_check(engine, world)
        check = await check_ledger(engine, world, books, stats)
    finally:
        if gateway is not None:
            await gateway.stop()
        await engine.stop()
    lat = sorted(stats.latencies)
    codes: dict[str, dict[str, int]] = {}
    for (op, code), n in sorted(stats.codes.items()):
        codes.setdefault(str(op), {})[code] = n
    return Report(
        ledger=world.ledger,
        terminals=len(world.terminals),
        holders=len(world.holders),
        duration_s=elapsed,
        answered=stats.answered,
        throughput=stats.answered / elapsed if elapsed else 0.0,
        p50_ms=_quantile(lat, 0.50) * 1000,
        p99_ms=_quantile(lat, 0.99) * 1000,
        codes=codes,
        accounts_checked=check.accounts,
        mismatched_accounts=check.mismatched,
        pending_left=check.pending,
        zero_sum=check.zero_sum,
        unresolved=stats.unresolved,
        retransmit_mismatch=stats.retransmit_mismatch,
        unexpected=stats.unexpected,
        problems=stats.problems,
    )


def _progress(console: Console, o: Options) -> Progress:
    return Progress(
        TextColumn("[bold]lunch rush"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not o.progress,
    )


async def _drive(driver: Driver, console: Console, o: Options) -> float:
    progress = _progress(console, o)
    t0 = time.monotonic()
    task = progress.add_task("rush", total=o.duration, info="")

    def update() -> None:
        el = time.monotonic() - t0
        n = driver.stats.answered
        rate = n / el if el else 0.0
        progress.update(task, completed=min(el, o.duration),
                        info=f"{n:,} answers  {rate:,.0f}/s  {driver.stats.unresolved} unresolved")

    with progress:
        return await driver.run(update)


# ---------------------------------------------------------------------------------------------
# Worker processes: each drives a share of the terminals and reports what its answers moved


class _ShardHolder(msgspec.Struct, frozen=True, array_like=True):
    index: int
    holder_id: str
    card: str
    purse: int
    subsidy: int
    pin: str | None
    limit: int | None
    lost: bool
    old_card: str | None


class _ShardTerminal(msgspec.Struct, frozen=True, array_like=True):
    index: int
    kind: TerminalKind
    terminal_id: str
    merchant_id: str
    account: int
    room: int | None  # a meter's room, as an index into the rooms


class _Shard(msgspec.Struct, frozen=True):
    """What a worker needs: the campus as the simulator built it, and its terminals."""

    options: Options
    host: str
    port: int
    ledger: int
    bank: int
    fund: int
    water: int
    power: int
    merchants: list[int]
    mac_key: bytes
    holders: list[_ShardHolder]
    rooms: list[SimRoom]
    terminals: list[_ShardTerminal]
    terminals_total: int
    cut: list[int]


class _ShardResult(msgspec.Struct, frozen=True):
    """A worker's answers: counts, latencies, problems, and the money they moved (changes to
    the holders' expected totals and to the other accounts' expected balances)."""

    codes: list[tuple[str, str, int]]
    latencies: list[float]
    problems: list[str]
    unresolved: int
    retransmit_mismatch: int
    unexpected: int
    holder_totals: dict[int, int]
    balances: dict[int, int]
    elapsed: float


def _shard(world: World, o: Options, host: str, port: int, share: list[SimTerminal],
           cut: set[int]) -> _Shard:
    rooms = {r.room_id: i for i, r in enumerate(world.rooms)}
    return _Shard(
        options=o, host=host, port=port, ledger=world.ledger, bank=world.bank,
        fund=world.fund, water=world.water, power=world.power, merchants=world.merchants,
        mac_key=world.mac_key,
        holders=[_ShardHolder(h.index, h.holder_id, h.card, h.purse, h.subsidy, h.pin, h.limit,
                              h.lost, h.old_card) for h in world.holders],
        rooms=world.rooms,
        terminals=[_ShardTerminal(t.index, t.kind, t.tid, t.client.merchant_id, t.account,
                                  None if t.room is None else rooms[t.room.room_id])
                   for t in share],
        terminals_total=len(world.terminals),
        cut=sorted(cut),
    )


async def _run_shard(shard: _Shard, progress: Callable[[int], None]) -> _ShardResult:
    """Drive ``shard``'s terminals (in the worker process); totals start at 0, so what the
    worker reports are changes."""
    o = shard.options
    holders = []
    for h in shard.holders:
        sh = SimHolder(h.index, h.holder_id, h.card, h.purse, h.subsidy)
        sh.pin, sh.limit, sh.lost, sh.old_card = h.pin, h.limit, h.lost, h.old_card
        holders.append(sh)
    terminals = []
    for t in shard.terminals:
        client = TerminalClient(shard.host, shard.port, terminal_id=t.terminal_id,
                                merchant_id=t.merchant_id, mac_key=shard.mac_key,
                                timeout_s=CLIENT_TIMEOUT_S)
        st = SimTerminal(t.index, t.kind, client, t.account, o.seed * 1_000_003 + t.index)
        if t.room is not None:
            st.room = shard.rooms[t.room]
        terminals.append(st)
    world = World(shard.ledger, shard.bank, shard.fund, shard.water, shard.power,
                  shard.merchants, holders, shard.rooms, terminals, shard.mac_key)
    books = Books({shard.bank, shard.fund})
    stats = Stats()
    driver = Driver(world, books, stats, o, terminals_total=shard.terminals_total,
                    cut=set(shard.cut))
    elapsed = await driver.run(lambda: progress(stats.answered))
    return _ShardResult(
        codes=[(str(op), code, n) for (op, code), n in stats.codes.items()],
        latencies=stats.latencies,
        problems=stats.problems,
        unresolved=stats.unresolved,
        retransmit_mismatch=stats.retransmit_mismatch,
        unexpected=stats.unexpected,
        holder_totals={h.index: h.total for h in holders if h.total},
        balances={a: n for a, n in books.balance.items() if n},
        elapsed=elapsed,
    )


# A worker reads its _Shard (msgpack) from stdin and writes frames to stdout: one type byte,
# a 4-byte big-endian length, the body: progress (answers so far, 8 bytes), the result
# (msgpack _ShardResult) or an error (text). A plain subprocess, not multiprocessing: nothing
# of the parent (its __main__, its event loop, its pool) is re-imported or inherited.
_PROGRESS: Final = b"P"
_RESULT: Final = b"R"
_ERROR: Final = b"E"
_WORKER_CODE: Final = "from terminals.simulator import worker_main; worker_main()"


def _frame(kind: bytes, body: bytes) -> bytes:
    return kind + len(body).to_bytes(4, "big") + body


def worker_main() -> None:
    """Entry point of a simulator worker process (see ``_drive_workers``)."""
    import uvloop

    out = sys.stdout.buffer

    def send(kind: bytes, body: bytes) -> None:
        out.write(_frame(kind, body))
        out.flush()

    try:
        shard = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=_Shard)
        result = uvloop.run(_run_shard(shard, lambda n: send(_PROGRESS, n.to_bytes(8, "big"))))
    except BaseException as e:  # the parent reports it
        send(_ERROR, f"{type(e).__name__}: {e}".encode())
        raise SystemExit(1) from None
    send(_RESULT, msgspec.msgpack.encode(result))


class _Worker:
    """One worker process as the parent sees it."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.answered = 0

    async def result(self) -> _ShardResult:
        """Read progress frames until the result; RuntimeError if the worker failed."""
        assert self.proc.stdout is not None
        while True:
            try:
                head = await self.proc.stdout.readexactly(5)
                body = await self.proc.stdout.readexactly(int.from_bytes(head[1:], "big"))
            except asyncio.IncompleteReadError:
                code = await self.proc.wait()
                raise RuntimeError(f"simulator {self.name} died (exit code {code})") from None
            kind = head[:1]
            if kind == _PROGRESS:
                self.answered = int.from_bytes(body, "big")
                continue
            await self.proc.wait()
            if kind == _RESULT:
                return msgspec.msgpack.decode(body, type=_ShardResult)
            raise RuntimeError(f"simulator {self.name} failed: {body.decode(errors='replace')}")


async def _start_worker(name: str, shard: _Shard) -> _Worker:
    # the worker imports this package from wherever this process did
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WORKER_CODE,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
    )
    worker = _Worker(proc, name)
    assert proc.stdin is not None
    try:
        proc.stdin.write(msgspec.msgpack.encode(shard))
        await proc.stdin.drain()
        proc.stdin.close()
    except ConnectionError:  # it died at once; result() will say how
        pass
    return worker


async def _drive_workers(world: World, books: Books, stats: Stats, o: Options, host: str,
                         port: int, console: Console) -> float:
    """Drive the terminals from ``o.workers`` processes, then fold their books into ours."""
    n = min(o.workers, len(world.terminals))
    cut = outage_cut(world.terminals, o.seed)
    workers: list[_Worker] = []
    try:
        for i in range(n):
            shard = _shard(world, o, host, port, world.terminals[i::n], cut)
            workers.append(await _start_worker(f"worker {i}", shard))
        progress = _progress(console, o)
        task = progress.add_task("rush", total=o.duration, info="")
        results = asyncio.gather(*(w.result() for w in workers))
        t0 = time.monotonic()
        with progress:
            while not results.done():
                el = time.monotonic() - t0
                answered = sum(w.answered for w in workers)
                progress.update(task, completed=min(el, o.duration),
                                info=f"{answered:,} answers  {answered / max(el, 1e-9):,.0f}/s")
                await asyncio.wait([results], timeout=PROGRESS_INTERVAL_S)
        shards = results.result()
    finally:
        for w in workers:
            if w.proc.returncode is None:  # failed or interrupted: nothing left to wait for
                w.proc.kill()
                await w.proc.wait()
    by_index = {h.index: h for h in world.holders}
    for r in shards:
        for op, code, k in r.codes:
            stats.codes[(Op(op), code)] += k
        stats.latencies.extend(r.latencies)
        for p in r.problems:
            stats.problem(p)
        stats.unresolved += r.unresolved
        stats.retransmit_mismatch += r.retransmit_mismatch
        stats.unexpected += r.unexpected
        for i, d in r.holder_totals.items():
            by_index[i].total += d
        for a, d in r.balances.items():
            books.balance[a] += d
    return max(r.elapsed for r in shards)

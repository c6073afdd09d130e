"""The traffic: every terminal's request loop against the gateway, over real TCP with
:class:`terminals.client.TerminalClient`: meals most of the time, balance inquiries,
hot-water holds and their completions, electricity purchases and meter readings, ~2 %
retransmissions (whose answers must be identical), ~0.5 % reversals, and a burst of offline
advices from the tills cut off by a simulated outage. The books are kept from the answers
alone: an approval moved the money, anything else did not."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Final

from rich.console import Console

from engine import limits
from engine.campus import TerminalKind
from terminals.client import ClientError
from terminals.iso8583 import AccountType, Message, parse_amounts
from terminals.simulator.books import Books, Op, Stats
from terminals.simulator.options import Options
from terminals.simulator.report import progress_bar
from terminals.simulator.world import (
    PIN_THRESHOLD,
    SimHolder,
    SimTerminal,
    World,
    bounded,
)

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S: Final = 0.25  # how often the progress line is redrawn

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
MEAL_PRICES: Final = (450, 800, 1_050, 1_200, 1_500, 1_800, 2_200, 2_600)


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
        delay = limits.SIMULATOR_RETRY_BACKOFF_S
        for _ in range(limits.SIMULATOR_MAX_ATTEMPTS):
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
            delay = min(delay * 2, limits.SIMULATOR_RETRY_BACKOFF_MAX_S)
        self.stats.unresolved += 1
        self.stats.problem(
            f"{t.tid} {op}: no definitive answer in {limits.SIMULATOR_MAX_ATTEMPTS} attempts"
        )
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

        await bounded(
            (sign_on(t) for t in self.world.terminals), limits.SIMULATOR_SIGN_ON_CONCURRENCY
        )
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


async def drive(
    world: World, books: Books, stats: Stats, o: Options, console: Console
) -> float:
    """Drive every terminal from this process, with a progress line; the traffic time."""
    driver = Driver(world, books, stats, o)
    progress = progress_bar(console, o)
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

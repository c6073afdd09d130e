"""What the terminal operations of one Campus share: the engine, the coalesced reads, the
spending memory, the PIN tries, the per-holder locks and the campus day.

The operation modules (payments, water, electricity, reversals) are functions of a
:class:`Shared`; :class:`~engine.campus.service.Campus` holds one and exposes them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
from asyncpg.pool import PoolAcquireContext

from engine import limits
from engine.access.secretbox import SecretBox
from engine.calendar import day_window_at, to_ns
from engine.campus.locks import KeyedLocks
from engine.campus.pin import PinTries
from engine.campus.reads import Reads
from engine.campus.spending import Spending
from engine.service import Engine


def connection(engine: Engine) -> PoolAcquireContext[Any]:
    """``async with connection(engine) as conn``: a connection of the engine's pool, waited
    for at most ``limits.DB_ACQUIRE_TIMEOUT_S``."""
    return engine.store.pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S)


class Shared:
    """The state every terminal operation of one Campus works with (see the module)."""

    __slots__ = ("_clock", "_day", "engine", "hold_timeout_s", "holder_locks", "max_amount",
                 "pins", "reads", "spending", "tz")

    def __init__(
        self,
        engine: Engine,
        *,
        tz: ZoneInfo,
        hold_timeout_s: int,
        clock: Callable[[], datetime],
        spend_ttl_s: float,
        max_batch: int,
        max_amount: int,
        box: SecretBox,
    ) -> None:
        self.engine = engine
        self.tz = tz
        self.hold_timeout_s = hold_timeout_s
        self.max_amount = max_amount
        self._clock = clock
        self._day: tuple[int, int] = (0, 0)  # the local day day_of answered last: [start, end)

        def pool() -> asyncpg.Pool:  # the engine's pool now (a restarted store has a new one)
            return engine.store.pool

        self.reads = Reads(pool, max_batch=max_batch, box=box)
        self.spending = Spending(engine, self.reads, ttl_s=spend_ttl_s, day_of=self.day_of)
        self.pins = PinTries(pool, tz=tz, max_batch=max_batch)
        # a holder's payments take turns (in this process), see engine/campus/locks.py
        self.holder_locks = KeyedLocks()

    def amount_ok(self, amount: int) -> bool:
        """A terminal amount this campus moves in one operation."""
        return 0 < amount <= self.max_amount

    def today(self) -> tuple[int, int]:
        """[start, end) of the current campus-local day in engine ns (per the clock)."""
        return self._day_bounds(to_ns(self._clock()))

    def day_of(self, ns: int) -> int:
        """Start (engine ns) of the campus-local day containing engine timestamp ``ns``."""
        return self._day_bounds(ns)[0]

    def _day_bounds(self, ns: int) -> tuple[int, int]:
        start, end = self._day
        if not start <= ns < end:  # one zone lookup per local day, not per request
            start, end = self._day = day_window_at(ns, self.tz)
        return start, end

"""Today's spending per holder, for the daily limits: read from the ledger once (in the shared
card-state statement), then kept up to date from every commit the batcher reports.

:class:`SpendMemory` is the batcher's commit observer; :class:`Spending` is what a payment
asks: the card's state with today's spending (remembered, or read and then remembered), and
the posting of a spending chain (the memory forgets the holder if its outcome is unknown).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Final
from uuid import UUID

from engine import limits
from engine.batcher import Batcher
from engine.campus.model import SPENDING_CODES
from engine.campus.posting import chain
from engine.campus.reads import CardRef, CardState, Reads
from engine.grouping import TransferResult
from engine.service import Engine
from ledger.transfer import StoredTransfer, Transfer
from ledger.types import TransferCode, TransferFlags

_PENDING: Final = int(TransferFlags.PENDING)
_POST: Final = int(TransferFlags.POST_PENDING)
_VOID: Final = int(TransferFlags.VOID_PENDING)
_SPENDING_CODE_SET: Final = frozenset(int(c) for c in SPENDING_CODES)  # plain ints: hot path
_REVERSAL_CODE: Final = int(TransferCode.REVERSAL)
_NS_PER_S: Final = 1_000_000_000


class _HolderSpend:
    """One holder's remembered spending: day start -> (fen, good until (monotonic s), earliest
    hold timeout it counts (engine ns, 0: none), the ledger clock the sum was read at)."""

    __slots__ = ("accounts", "days")

    def __init__(self, accounts: tuple[int, int]) -> None:
        self.accounts = accounts
        self.days: dict[int, tuple[int, float, int, int]] = {}


class _Reading:
    """A read of one holder's spending in flight, and what this process committed meanwhile
    that may or may not be in it: (timestamp, fen, hold timeout) of spending added, and
    whether anything lowered the spending (then the read is not remembered)."""

    __slots__ = ("accounts", "added", "lowered")

    def __init__(self, accounts: tuple[tuple[int, int], tuple[int, int]]) -> None:
        self.accounts = accounts
        self.added: list[tuple[int, int, int]] = []
        self.lowered = False


class SpendMemory:
    """Today's spending per holder (for daily limits), remembered after a first read; the
    batcher's :class:`~engine.batcher.CommitObserver`.

    The ledger's own sum is read on first touch (in the shared card-state statement, with the
    ledger's clock as that statement saw it). From then on every group this process commits is
    reported here, whatever door it came through (a terminal, ``POST /v1/transfers``, a
    subsidy), and the spending it adds is added: what the read counts (``SQL_CARD_STATES``),
    the spending codes debiting the holder's purses, a hold while it holds. A transfer stamped
    at or before the clock of the read is in the sum already and is not added twice; one
    committed while the read was in flight is collected for it (:class:`_Reading`) and added
    if the read did not see it. Anything that lowers spending (a hold posted or voided, a
    reversal crediting the purse, a hold reaching its timeout) drops the holder's entry, and
    the next payment reads the sum again. So within this process the remembered sum is the
    ledger's, never lower. A commit whose outcome is unknown (``unknown``) forgets everything.

    Spending through *another* engine process is not reported here; it is counted once the
    entry ages out (``ttl_s``) and the sum is read again: the limit is exact per process (see
    :class:`~engine.campus.service.Campus`), the money is exact everywhere (the ledger refuses
    every overdraft and every debit of a frozen purse whoever submits it).

    Until :meth:`watching` (the Campus registered it with a batcher that reports commits)
    nothing is remembered: every limited payment reads the sum.
    """

    def __init__(self, *, ttl_s: float, max_holders: int, day_of: Callable[[int], int]) -> None:
        self._ttl_s = ttl_s
        self._max = max_holders
        self._day_of = day_of
        self.watching = False
        # (ledger, purse id) and (ledger, subsidy id) both name the holder's one record
        self._holders: dict[tuple[int, int], _HolderSpend] = {}
        self._reading: dict[tuple[int, int], _Reading] = {}  # at most one per holder (its lock)

    def lookup(self, ledger: int, purse: int, day: int) -> int | None:
        """The remembered spending of the local day starting at ``day``, or None."""
        rec = self._holders.get((ledger, purse))
        entry = None if rec is None else rec.days.get(day)
        if entry is not None:
            assert rec is not None
            spent, until, hold_expiry, _ = entry
            if time.monotonic() < until and (not hold_expiry or time.time_ns() < hold_expiry):
                return spent
            del rec.days[day]
        return None

    def begin(self, ledger: int, purse: int, subsidy: int) -> _Reading:
        """A read of the holder's spending starts now: collect what commits meanwhile."""
        r = _Reading(((ledger, purse), (ledger, subsidy)))
        for k in r.accounts:
            self._reading[k] = r
        return r

    def end(self, r: _Reading) -> None:
        """The read is over (answered or failed): stop collecting for it."""
        for k in r.accounts:
            if self._reading.get(k) is r:
                del self._reading[k]

    def finish(self, r: _Reading, day: int, spent: int, hold_expiry: int | None,
               as_of: int) -> int:
        """The read answered ``spent`` at ledger clock ``as_of``: remember it (unless something
        lowered the spending meanwhile) and return it with what committed after it."""
        self.end(r)
        expiry = hold_expiry or 0
        for ts, amount, hold in r.added:
            if ts > as_of and self._day_of(ts) == day:
                spent += amount
                expiry = hold if hold and (not expiry or hold < expiry) else expiry
        if self.watching and not r.lowered:
            self._store(r.accounts, day, spent, expiry, as_of)
        return spent

    def _store(self, accounts: tuple[tuple[int, int], tuple[int, int]], day: int, spent: int,
               hold_expiry: int, as_of: int) -> None:
        (ledger, purse), (_, subsidy) = accounts
        rec = self._holders.get((ledger, purse))
        if rec is None:
            if len(self._holders) >= 2 * self._max:
                oldest = next(iter(self._holders))  # dicts keep insertion order
                for aid in self._holders[oldest].accounts:
                    self._holders.pop((oldest[0], aid), None)
            rec = _HolderSpend((purse, subsidy))
            self._holders[(ledger, purse)] = rec
            self._holders[(ledger, subsidy)] = rec
        now = time.monotonic()
        for d in [d for d, (_, until, _, _) in rec.days.items() if until <= now]:
            del rec.days[d]
        rec.days[day] = (spent, now + self._ttl_s, hold_expiry, as_of)

    def committed(self, ledger: int, created: Sequence[StoredTransfer]) -> None:
        """The batcher committed ``created`` on ``ledger`` (any door, this process)."""
        holders, reading = self._holders, self._reading
        if not holders and not reading:
            return
        for t in created:  # per transfer: a set lookup, nothing more for the rest
            if t.code in _SPENDING_CODE_SET:
                key = (ledger, t.debit_account_id)
                if key not in holders and key not in reading:
                    continue
                if t.flags & (_POST | _VOID):  # a hold resolved: the sum falls, read it again
                    self._lower(key)
                else:
                    expiry = (t.timestamp + t.timeout_s * _NS_PER_S
                              if t.flags & _PENDING and t.timeout_s else 0)
                    self._add(key, t.timestamp, t.amount, expiry)
            elif t.code == _REVERSAL_CODE:  # spending given back no longer counts
                key = (ledger, t.credit_account_id)
                if key in holders or key in reading:
                    self._lower(key)

    def unknown(self, ledger: int) -> None:
        """Something may have committed unreported: forget everything, read sums again."""
        self._holders.clear()
        for r in self._reading.values():
            r.lowered = True  # not remembered; still exact as far as it saw

    def _add(self, key: tuple[int, int], ts: int, amount: int, hold_expiry: int) -> None:
        r = self._reading.get(key)
        if r is not None:
            r.added.append((ts, amount, hold_expiry))
        rec = self._holders.get(key)
        if rec is None:
            return
        day = self._day_of(ts)
        entry = rec.days.get(day)
        if entry is None:
            return  # nothing remembered for that day: the next read sums it from the ledger
        spent, until, expiry, as_of = entry
        if ts <= as_of:
            return  # the read that made the entry counted it already
        if hold_expiry and (not expiry or hold_expiry < expiry):
            expiry = hold_expiry
        rec.days[day] = (spent + amount, until, expiry, as_of)

    def _lower(self, key: tuple[int, int]) -> None:
        r = self._reading.get(key)
        if r is not None:
            r.lowered = True
        rec = self._holders.get(key)
        if rec is not None:
            rec.days.clear()

    def drop(self, ledger: int, account: int) -> None:
        """Forget the spending of the holder owning ``account`` (any account: no-op)."""
        self._lower((ledger, account))


class Spending:
    """Today's spending of the holder a payment is for (one per Campus): remembered by the
    :class:`SpendMemory` once the engine's batcher reports its commits to it, else read."""

    def __init__(self, engine: Engine, reads: Reads, *, ttl_s: float,
                 day_of: Callable[[int], int]) -> None:
        self._engine = engine
        self._reads = reads
        self.memory = SpendMemory(ttl_s=ttl_s, max_holders=limits.MAX_REMEMBERED_HOLDERS,
                                  day_of=day_of)
        self._watched: object = None  # the batcher the spending memory hears commits from

    def _watch(self) -> bool:
        """Register the spending memory with the engine's batcher (again after a restart made a
        new one); False if the batcher cannot report commits (nothing is remembered then)."""
        batcher = self._engine.batcher
        if self._watched is not batcher:
            self._watched = batcher
            self.memory.unknown(0)  # commits of the old batcher's last moments were not heard
            # a stand-in (tests wrap the batcher) reports nothing: then nothing is remembered
            self.memory.watching = isinstance(batcher, Batcher)
            if isinstance(batcher, Batcher):
                batcher.observe(self.memory)
        return self.memory.watching

    async def state_and_spending(
        self, ref: CardRef, key: UUID, parts: Sequence[UUID], *, day: tuple[int, int],
        want_spent: bool,
    ) -> tuple[CardState, int]:
        """The card's state and, if ``want_spent``, today's spending for the limit check (0 for
        a card without a limit): remembered, or read with the state and then remembered."""
        remembered = (
            self.memory.lookup(ref.ledger, ref.purse_id, day[0])
            if want_spent and self._watch() else None
        )
        if remembered is not None or not want_spent:
            st = await self._reads.card_state(ref, key, parts, day=day, want_spent=False)
            return st, remembered or 0
        reading = self.memory.begin(ref.ledger, ref.purse_id, ref.subsidy_id)
        try:
            st = await self._reads.card_state(ref, key, parts, day=day, want_spent=True)
        finally:
            self.memory.end(reading)
        if st.spent is None:  # the card has no limit: nothing summed, nothing to remember
            return st, 0
        return st, self.memory.finish(reading, day[0], st.spent, st.hold_expiry, st.clock)

    async def post(self, ledger: int, transfers: list[Transfer]) -> list[TransferResult]:
        """Submit a spending chain (the batcher reports what it posted to the spending memory);
        if the outcome is unknown (the batcher failed), forget the holder's spending so it is
        read again."""
        try:
            return await self._engine.batcher.submit(chain(transfers))
        except BaseException:
            for t in transfers:
                self.memory.drop(ledger, t.debit_account_id)
            raise

    def drop(self, ledger: int, account: int) -> None:
        """Forget the spending of the holder owning ``account``: it fell (a hold resolved, a
        payment given back), so it is read again."""
        self.memory.drop(ledger, account)

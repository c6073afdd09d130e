"""Group commit: every transfer submission goes through one bounded queue.

Callers (HTTP, the terminal gateway, in-process users) ``await submit(transfers)``; a single
committer task takes whole requests off the queue, up to ``MAX_BATCH_TRANSFERS`` at a time,
groups them per ledger (one database transaction touches one ledger), and applies each group in
one transaction. While a transaction is in flight the next requests gather, so the batch grows
with the load and the cost of a commit is shared. Order within a ledger is arrival order, and
a request's linked chains never mix with another request's (``request_ends``).

Under load the committer keeps two batches going: while batch N is being written, batch N+1
is prepared (read, applied and encoded, see ``Store.prepare``) on the state N leaves, and N's
callers are answered while N+1's write is on the server (never before N's commit, never later
than ``BATCH_ANSWER_DEFER_MAX_S``). Python's work and PostgreSQL's then overlap instead of
alternating. A preparation only commits if the ledger's clock shows nothing but N happened
since (``Store.commit_prepared``); otherwise, and whenever N itself did not commit as prepared,
the batch takes the locked path (``Store.post_locked``), so the answers are always those of
one batch after the other. With nothing queued, or for a batch smaller than
``BATCH_ANSWER_DEFER_MIN_TRANSFERS``, the answer goes out at once.

A full queue refuses at once (``Overloaded``: HTTP 503, terminal 96), so memory stays bounded.

Whoever keeps a view of the ledger above it (the campus's daily-spending memory) registers a
:class:`CommitObserver`: it hears every group this process commits, with the transfers it
created, before any caller of that batch is answered, whichever door (HTTP, terminal,
in-process) the transfers came through; and it hears when a group's outcome is unknown (a
commit whose connection broke may have committed: its retry answers ``exists``, so its
transfers are never reported as created).

How a batch is split in ledger groups and rounds: engine/grouping.py; how its callers are
answered: engine/delivery.py; the hold expirer: engine/expiry.py. This module stays a little
over 400 lines: the Batcher is one class (the queue, the committer, the two-batch pipeline)
whose steps share the pipeline's state.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from engine import limits, metrics
from engine.delivery import Answers, fail
from engine.faults import RETRYABLE
from engine.grouping import Batch, Group, Request, TransferResult, ledger_groups
from engine.store import Store
from engine.writing import Tip
from ledger.apply import BatchOutcome
from ledger.transfer import StoredTransfer, Transfer

log = logging.getLogger(__name__)

# Queue depth is read when /metrics is scraped (summed over this process's running batchers),
# not written on every submit: a gauge update takes a lock, per request.
_RUNNING: Final[weakref.WeakSet[Batcher]] = weakref.WeakSet()
metrics.QUEUE_DEPTH.set_function(lambda: sum(b.queued for b in list(_RUNNING)))


class Overloaded(Exception):
    """The queue is full: try again later."""


class Unavailable(Exception):
    """The database could not be reached: try again later."""


class CommitObserver(Protocol):
    """Hears what the committer did, in the committer's task (so it must be cheap and must
    not await: it runs on the path of every batch)."""

    def committed(self, ledger: int, created: Sequence[StoredTransfer]) -> None:
        """A group of ``ledger`` committed; ``created`` are the transfers it wrote."""

    def unknown(self, ledger: int) -> None:
        """Something may have committed on ``ledger`` without being reported."""


class TooManyLedgers(ValueError):
    """A request needs more ledger groups than one batch may hold (HTTP 413)."""


class _Flight:
    """A batch whose commit is running."""

    __slots__ = ("batch", "task")

    def __init__(self, batch: Batch, task: asyncio.Task[Answers]) -> None:
        self.batch = batch
        self.task = task


class Batcher:
    """The bounded queue and its committer."""

    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = limits.MAX_BATCH_TRANSFERS,
        max_queued: int = limits.MAX_QUEUED_TRANSFERS,
        linger_s: float = limits.BATCH_LINGER_S,
        max_groups: int = limits.MAX_LEDGER_GROUPS_PER_BATCH,
    ) -> None:
        assert max_batch >= limits.MAX_TRANSFERS_PER_REQUEST, "a request must fit in a batch"
        assert max_groups >= limits.MAX_LEDGER_GROUPS_PER_REQUEST, "a request must fit"
        self.store = store
        self.max_batch = max_batch
        self.max_groups = max_groups
        self.max_queued = max_queued
        self.linger_s = linger_s
        self._queue: deque[Request] = deque()
        self._queued = 0
        self._cost = 0  # the queued requests' cost (transfers, and their extra ledger groups)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # per ledger, the state the latest batch leaves (the next batch is prepared on it)
        self._tips: dict[int, Tip] = {}
        self._missed: set[int] = set()  # ledgers whose last prepared batch found them moved
        # held weakly: an observer goes away with its owner (tests make many campuses)
        self._observers: weakref.WeakSet[CommitObserver] = weakref.WeakSet()
        self._clocked: set[int] = set()  # ledgers known to have a clock row (accounts)

    @property
    def queued(self) -> int:
        """Transfers waiting for the committer."""
        return self._queued

    def observe(self, observer: CommitObserver) -> None:
        """Tell ``observer`` about every group committed from now on (held weakly)."""
        self._observers.add(observer)

    def _committed(self, ledger: int, created: Sequence[StoredTransfer]) -> None:
        if not created:
            return
        for o in self._observers:
            try:
                o.committed(ledger, created)
            except Exception:  # an observer's bug must not fail a committed batch
                log.exception("commit observer failed")
                self._unknown(ledger)

    def _unknown(self, ledger: int) -> None:
        for o in self._observers:
            try:
                o.unknown(ledger)
            except Exception:
                log.exception("commit observer failed")

    def start(self) -> None:
        """Start the committer task."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="onecard-committer")
            _RUNNING.add(self)

    async def stop(self) -> None:
        """Refuse new work, commit what is queued, answer it, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        _RUNNING.discard(self)

    async def submit(self, transfers: Sequence[Transfer]) -> list[TransferResult]:
        """Queue one request's transfers and wait for their answers (in request order)."""
        n = len(transfers)
        if n == 0:
            return []
        if n > limits.MAX_TRANSFERS_PER_REQUEST:
            raise ValueError(f"a request holds at most {limits.MAX_TRANSFERS_PER_REQUEST}")
        first = transfers[0].ledger
        ledger: int | None = first
        cost = n
        if not all(t.ledger == first for t in transfers):
            ledger = None
            groups = ledger_groups(transfers)
            if groups > limits.MAX_LEDGER_GROUPS_PER_REQUEST:
                raise TooManyLedgers(
                    f"a request may name at most {limits.MAX_LEDGER_GROUPS_PER_REQUEST} "
                    f"ledgers (one counts again after an id it shares with another ledger of "
                    f"the request); this one needs {groups}"
                )
            # each ledger group is a transaction: the queue's bound is one of time
            cost += (groups - 1) * limits.LEDGER_GROUP_COST
        if self._closing or self._task is None:
            raise Unavailable("the engine is shutting down")
        if self._cost + cost > self.max_queued:
            metrics.OVERLOADED.inc()
            raise Overloaded(f"{self._queued} transfers queued")
        fut: asyncio.Future[list[TransferResult]] = asyncio.get_running_loop().create_future()
        self._queue.append(Request(transfers, fut, ledger=ledger, cost=cost))
        self._cost += cost
        self._queued += n
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        idle = True  # nothing gathered during the last commit: a new request lingers for company
        flight: _Flight | None = None  # the batch being committed
        try:
            while True:
                if flight is not None and (not self._queue or self._closing):
                    answers = await self._land(flight)  # nothing to overlap with
                    flight = None
                    if answers is not None:
                        answers.deliver()
                    idle = not self._queue
                await self._wake.wait()
                if not self._queue:
                    if self._closing:
                        return
                    self._wake.clear()
                    idle = True
                    continue
                # Under load the requests that arrived during the previous commit are the
                # company; lingering then would only add to every batch's latency.
                if idle and self.linger_s and self._queued < self.max_batch and not self._closing:
                    await asyncio.sleep(self.linger_s)
                batch = Batch()
                size = 0
                while self._queue:
                    r = self._queue[0]
                    if size + len(r.transfers) > self.max_batch or not batch.add(
                        r, max_groups=self.max_groups
                    ):
                        break  # full: in transfers, or in ledger groups (transactions)
                    self._queue.popleft()
                    size += len(r.transfers)
                    self._cost -= r.cost
                self._queued -= size
                if not self._queue and not self._closing:
                    self._wake.clear()
                # Apply this batch on the state the one in flight leaves, while it commits.
                await self._prepare(batch, flight)
                pending: Answers | None = None
                if flight is not None:
                    pending = await self._land(flight)
                    small = limits.BATCH_ANSWER_DEFER_MIN_TRANSFERS
                    if pending is not None and pending.size < small:
                        pending.deliver()  # holding a small batch back only adds latency
                        pending = None
                    flight = None
                    batch.keep_prepared_on(self._tips)
                    # what could not be prepared on the batch in flight is prepared on what it
                    # left (no overlap this time, but the next batch can overlap with this one)
                    await self._prepare(batch, None)
                flight = _Flight(
                    batch, asyncio.create_task(self._commit_batch(batch, pending=pending))
                )
                if pending is not None:
                    # Answered while this batch's write is on the server (see _commit_batch),
                    # or by this deadline if that write has not gone out.
                    pending.deliver_by(limits.BATCH_ANSWER_DEFER_MAX_S)
                idle = False
        finally:
            if flight is not None:
                answers = await self._land(flight)
                if answers is not None:
                    answers.deliver()

    async def _prepare(self, batch: Batch, flight: _Flight | None) -> None:
        """Prepare every ledger group of ``batch`` on the state its ledger will be in: as the
        batch in flight leaves it if that batch was prepared, else the latest known tip.
        A group naming an id the batch in flight names in another ledger waits for that batch
        to commit (it is prepared again after it lands), and so do later rounds."""
        await self._answer_unclocked(batch, flight)
        for g in batch.groups:
            ledger = g.ledger
            if g.round or g.prepared is not None or g.outcome is not None:
                continue  # read after the earlier rounds commit; or prepared, or answered
            if ledger in self._missed:
                continue  # after a miss, one batch takes the locked path
            if flight is not None and flight.batch.clashes(g):
                continue
            ahead = None if flight is None else flight.batch.last.get(ledger)
            if ahead is not None and ahead.prepared is not None:
                tip: Tip | None = ahead.prepared.tip
            elif ahead is not None:
                continue  # that batch takes the locked path: its outcome is not known yet
            else:
                tip = self._tips.get(ledger)
            try:
                g.prepared = await self.store.prepare(
                    ledger, g.transfers, request_ends=g.ends, tip=tip
                )
                g.based_on = tip
            except Exception as e:  # the locked path will meet it again and deal with it
                if not isinstance(e, RETRYABLE):
                    log.warning("preparing a batch failed (%s); it takes the locked path", e)
                g.prepared = None
                # The tip's rows may be half-applied: nothing more is prepared on it; the
                # ledger's next tip comes from the locked path's fresh reads.
                self._tips.pop(ledger, None)
                self._missed.add(ledger)

    async def _answer_unclocked(self, batch: Batch, flight: _Flight | None) -> None:
        """Answer, without a transaction, the groups of ledgers that have no clock row (no
        accounts: every transfer fails and nothing is written), all of them from a few reads
        (``Store.answer_unclocked``): a request naming a thousand made-up ledgers costs what
        one ledger costs, and leaves nothing behind."""
        unknown = [
            g for g in batch.groups
            if not g.round and g.outcome is None and g.prepared is None
            and g.ledger not in self._tips and g.ledger not in self._clocked
        ]
        if not unknown:
            return
        try:
            clocked = await self.store.clocked({g.ledger for g in unknown})
            if len(self._clocked) + len(clocked) > limits.MAX_KNOWN_LEDGERS:
                self._clocked.clear()
            self._clocked |= clocked
            bare = [
                g for g in unknown
                if g.ledger not in clocked and (flight is None or not flight.batch.clashes(g))
            ]
            if bare:
                outcomes = await self.store.answer_unclocked(
                    [(g.ledger, g.transfers, g.ends) for g in bare]
                )
                for g, outcome in zip(bare, outcomes, strict=True):
                    g.outcome = outcome  # None: accounts appeared meanwhile; posted as usual
        except Exception as e:  # the locked path answers them (and meets the fault again)
            if not isinstance(e, RETRYABLE):
                log.warning("answering ledgers without accounts failed (%s); locked path", e)

    async def _land(self, flight: _Flight) -> Answers | None:
        """Wait for a batch's commit; its answers (not yet delivered), or None if every caller
        has already been answered (a failure)."""
        try:
            return await flight.task
        except Exception as e:  # answer every waiter; the committer itself carries on
            self._tips.clear()  # nothing is known about what the batch left
            for g in flight.batch.groups:
                self._unknown(g.ledger)
            taken = flight.batch.requests
            outage = isinstance(e, Unavailable)
            if len(taken) == 1 or (outage and not self.store.distributed):
                log.exception("batch failed", exc_info=e)
                fail(taken, e)
                return None
            # Not a database outage: one request may be poison (an error only it causes).
            # Commit each alone so only the guilty one fails. On a Citus cluster an outage may
            # be one worker's: each ledger's requests commit apart, so the ledgers on the
            # other workers go on. A request whose ledger did commit answers `exists` the
            # second time.
            parts = _by_ledger(taken) if outage else [[r] for r in taken]
            log.warning("batch of %d requests failed (%s); in %d parts", len(taken), e,
                        len(parts))
            for part in parts:
                try:
                    (await self._commit_batch(Batch.of(part))).deliver()
                except Exception as e1:
                    log.exception("request failed")
                    fail(part, e1)
            return None

    async def _commit_batch(self, batch: Batch, *, pending: Answers | None = None) -> Answers:
        """Commit a batch (per ledger, each in its own transaction) and return its answers,
        not yet delivered. ``pending`` (the previous batch's answers) is delivered once the
        first write has been sent, so the callers' work overlaps with PostgreSQL's."""
        hook = None if pending is None else pending.deliver
        try:
            posted: list[tuple[Group, BatchOutcome]] = []
            for g in batch.groups:
                ledger = g.ledger
                if g.outcome is not None:  # a ledger without accounts: nothing to write
                    posted.append((g, g.outcome))
                    continue
                p = g.prepared
                held = False
                tip: Tip | None
                if p is not None:
                    t0 = time.perf_counter()
                    try:
                        held = await self.store.commit_prepared(p, on_write=hook)
                    except RETRYABLE as e:
                        metrics.BATCH_RETRIES.inc()
                        log.warning("prepared batch failed (%s); retrying locked", e)
                        self._unknown(ledger)  # it may have committed: the retry says exists
                if held:
                    assert p is not None
                    outcome, tip = p.outcome, p.tip
                    metrics.SPECULATION.labels("held").inc()
                    self._missed.discard(ledger)
                    metrics.COMMIT_SECONDS.observe(time.perf_counter() - t0)
                    metrics.BATCH_SIZE.observe(len(g.transfers))
                else:
                    if p is not None:
                        metrics.SPECULATION.labels("missed").inc()
                        # Another writer moved the clock; if it keeps writing, preparing
                        # every batch would be wasted work: the next one takes the locked path.
                        self._missed.add(ledger)
                    else:
                        self._missed.discard(ledger)
                    outcome, tip = await self._post_with_retry(ledger, g, on_write=hook)
                if tip is None:  # no clock: answered, nothing written, nothing to build on
                    self._tips.pop(ledger, None)
                else:
                    self._tips[ledger] = tip
                self._committed(ledger, outcome.created)
                posted.append((g, outcome))
                hook = None
            return Answers(batch.requests, batch.answers, posted)
        finally:
            if pending is not None:
                pending.deliver()  # if nothing was written, the hook never ran

    async def _post_with_retry(
        self, ledger: int, g: Group, *, on_write: Callable[[], None] | None
    ) -> tuple[BatchOutcome, Tip | None]:
        for attempt in range(limits.BATCH_RETRIES + 1):
            t0 = time.perf_counter()
            try:
                outcome, tip = await self.store.post_locked(
                    ledger, g.transfers, request_ends=g.ends, on_write=on_write
                )
            except RETRYABLE as e:
                self._unknown(ledger)  # it may have committed: the retry says exists
                if attempt == limits.BATCH_RETRIES:
                    raise Unavailable(f"database unavailable: {e}") from e
                metrics.BATCH_RETRIES.inc()
                log.warning("batch attempt %d failed (%s); retrying", attempt + 1, e)
                await asyncio.sleep(0.05 * 2**attempt)
                continue
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - t0)
            metrics.BATCH_SIZE.observe(len(g.transfers))
            return outcome, tip
        raise AssertionError("unreachable")


def _by_ledger(requests: list[Request]) -> list[list[Request]]:
    """The requests in parts of one ledger each (one naming several ledgers goes alone)."""
    parts: dict[int, list[Request]] = {}
    alone: list[list[Request]] = []
    for r in requests:
        if r.ledger is None:
            alone.append([r])
        else:
            parts.setdefault(r.ledger, []).append(r)
    return [*parts.values(), *alone]

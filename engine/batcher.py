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
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Final, Protocol, cast

import asyncpg
import msgspec

from engine import limits, metrics
from engine.store import Prepared, Store, Tip, now_ns
from ledger.apply import BatchOutcome
from ledger.status import TransferStatus
from ledger.transfer import StoredTransfer, Transfer
from ledger.types import TransferFlags, transfer_flag_bits

log = logging.getLogger(__name__)

# A plain int: `int & IntFlag` builds a new enum member per call, on the per-transfer path.
_LINKED: Final = int(TransferFlags.LINKED)

# Queue depth is read when /metrics is scraped (summed over this process's running batchers),
# not written on every submit: a gauge update takes a lock, per request.
_RUNNING: Final[weakref.WeakSet[Batcher]] = weakref.WeakSet()
metrics.QUEUE_DEPTH.set_function(lambda: sum(b.queued for b in list(_RUNNING)))

# Faults after which the whole batch is safely retried: the transaction either rolled back or
# committed, and a committed transfer answers `exists` the second time (idempotency).
RETRYABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # protocol state left behind by a terminated backend
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    OSError,
    TimeoutError,
)


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


class TransferResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """The answer for one transfer: its status and, when recorded, its timestamp."""

    id: str
    status: TransferStatus
    timestamp: int | None = None


class _Request:
    __slots__ = ("future", "transfers")

    def __init__(self, transfers: Sequence[Transfer], future: asyncio.Future[list[TransferResult]]):
        self.transfers = transfers
        self.future = future


class _Group:
    """One ledger's share of a batch, with where each transfer's answer goes."""

    __slots__ = ("based_on", "ends", "prepared", "spans", "transfers")

    def __init__(self) -> None:
        self.transfers: list[Transfer] = []
        # runs of consecutive transfers: (request index, first position in the request,
        # first position in this group, length)
        self.spans: list[tuple[int, int, int, int]] = []
        self.ends: list[int] = []
        self.prepared: Prepared | None = None  # applied ahead of the commit, if it could be
        self.based_on: Tip | None = None  # the tip it was prepared on (None: the database)


class _Batch:
    """The requests the committer took at once, split per ledger."""

    __slots__ = ("answers", "groups", "requests")

    def __init__(self, requests: list[_Request]) -> None:
        self.requests = requests
        self.answers: list[list[TransferResult | None]] = [
            [None] * len(r.transfers) for r in requests
        ]
        self.groups = _group(requests, self.answers)

    def keep_prepared_on(self, tips: dict[int, Tip]) -> None:
        """Drop every preparation whose tip is no longer its ledger's latest: the batch before
        took the locked path or failed, so what it was prepared on never committed."""
        for ledger, g in self.groups.items():
            if g.prepared is not None and tips.get(ledger) is not g.based_on:
                g.prepared = None


class _Flight:
    """A batch whose commit is running."""

    __slots__ = ("batch", "task")

    def __init__(self, batch: _Batch, task: asyncio.Task[_Answers]) -> None:
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
    ) -> None:
        assert max_batch >= limits.MAX_TRANSFERS_PER_REQUEST, "a request must fit in a batch"
        self.store = store
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.linger_s = linger_s
        self._queue: deque[_Request] = deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # per ledger, the state the latest batch leaves (the next batch is prepared on it)
        self._tips: dict[int, Tip] = {}
        self._missed: set[int] = set()  # ledgers whose last prepared batch found them moved
        # held weakly: an observer goes away with its owner (tests make many campuses)
        self._observers: weakref.WeakSet[CommitObserver] = weakref.WeakSet()

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
        if self._closing or self._task is None:
            raise Unavailable("the engine is shutting down")
        if self._queued + n > self.max_queued:
            metrics.OVERLOADED.inc()
            raise Overloaded(f"{self._queued} transfers queued")
        fut: asyncio.Future[list[TransferResult]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(transfers, fut))
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
                taken: list[_Request] = []
                size = 0
                while self._queue and size + len(self._queue[0].transfers) <= self.max_batch:
                    r = self._queue.popleft()
                    taken.append(r)
                    size += len(r.transfers)
                self._queued -= size
                if not self._queue and not self._closing:
                    self._wake.clear()
                batch = _Batch(taken)
                # Apply this batch on the state the one in flight leaves, while it commits.
                await self._prepare(batch, flight)
                pending: _Answers | None = None
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

    async def _prepare(self, batch: _Batch, flight: _Flight | None) -> None:
        """Prepare every ledger group of ``batch`` on the state its ledger will be in: as the
        batch in flight leaves it if that batch was prepared, else the latest known tip."""
        for ledger, g in batch.groups.items():
            if g.prepared is not None or ledger in self._missed:
                continue  # prepared already; or, after a miss, one batch takes the locked path
            ahead = None if flight is None else flight.batch.groups.get(ledger)
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

    async def _land(self, flight: _Flight) -> _Answers | None:
        """Wait for a batch's commit; its answers (not yet delivered), or None if every caller
        has already been answered (a failure)."""
        try:
            return await flight.task
        except Exception as e:  # answer every waiter; the committer itself carries on
            self._tips.clear()  # nothing is known about what the batch left
            for ledger in flight.batch.groups:
                self._unknown(ledger)
            taken = flight.batch.requests
            if isinstance(e, Unavailable) or len(taken) == 1:
                log.exception("batch failed", exc_info=e)
                _fail(taken, e)
                return None
            # Not a database outage: one request may be poison (an error only it causes).
            # Commit each alone so only the guilty one fails; a request whose ledger did
            # commit answers `exists` the second time.
            log.warning("batch of %d requests failed (%s); one by one", len(taken), e)
            for r in taken:
                try:
                    (await self._commit_batch(_Batch([r]))).deliver()
                except Exception as e1:
                    log.exception("request failed")
                    _fail([r], e1)
            return None

    async def _commit_batch(self, batch: _Batch, *, pending: _Answers | None = None) -> _Answers:
        """Commit a batch (per ledger, each in its own transaction) and return its answers,
        not yet delivered. ``pending`` (the previous batch's answers) is delivered once the
        first write has been sent, so the callers' work overlaps with PostgreSQL's."""
        hook = None if pending is None else pending.deliver
        try:
            posted: list[tuple[_Group, BatchOutcome]] = []
            for ledger, g in batch.groups.items():
                p = g.prepared
                held = False
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
                self._tips[ledger] = tip
                self._committed(ledger, outcome.created)
                posted.append((g, outcome))
                hook = None
            return _Answers(batch.requests, batch.answers, posted)
        finally:
            if pending is not None:
                pending.deliver()  # if nothing was written, the hook never ran

    async def _post_with_retry(
        self, ledger: int, g: _Group, *, on_write: Callable[[], None] | None
    ) -> tuple[BatchOutcome, Tip]:
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


class _Answers:
    """A committed batch's answers, delivered once (results built, futures resolved, counted)."""

    __slots__ = ("_answers", "_done", "_posted", "_requests", "_timer")

    def __init__(
        self,
        requests: list[_Request],
        answers: list[list[TransferResult | None]],
        posted: list[tuple[_Group, BatchOutcome]],
    ) -> None:
        self._requests = requests
        self._answers = answers
        self._posted = posted
        self._done = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def size(self) -> int:
        """Transfers answered."""
        return sum(len(g.transfers) for g, _ in self._posted)

    def deliver_by(self, delay_s: float) -> None:
        """Deliver at the latest ``delay_s`` from now (at the next await after it)."""
        self._timer = asyncio.get_running_loop().call_later(delay_s, self.deliver)

    def deliver(self) -> None:
        """Answer every caller of the batch (idempotent; never raises: it also runs as a hook
        inside the next batch's write)."""
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        try:
            self._resolve()
        except Exception as e:  # a bug here must not leave callers waiting forever
            log.exception("answering a batch failed")
            for r in self._requests:
                if not r.future.done():
                    r.future.set_exception(e)

    def _resolve(self) -> None:
        answers = self._answers
        for g, outcome in self._posted:
            ids = _id_strings(g.transfers)
            sts, stamps = outcome.statuses, outcome.timestamps
            assert len(ids) == len(sts) == len(stamps), "one answer per transfer"
            for ri, k0, j0, n in g.spans:
                answers[ri][k0 : k0 + n] = [
                    TransferResult(i, st, ts or None)
                    for i, st, ts in zip(
                        ids[j0 : j0 + n], sts[j0 : j0 + n], stamps[j0 : j0 + n], strict=True
                    )
                ]
        tally: Counter[TransferStatus] = Counter()
        for r, a in zip(self._requests, answers, strict=True):
            assert None not in a, "every transfer gets an answer"
            done = cast(list[TransferResult], a)
            tally.update([x.status for x in done])
            if not r.future.done():  # the caller may have gone away
                r.future.set_result(done)
        for status, n in tally.items():  # one labelled increment per status, not per transfer
            metrics.TRANSFERS.labels(status.value).inc(n)


_encode_ids = msgspec.json.Encoder().encode
_decode_strs = msgspec.json.Decoder(list[str]).decode


def _id_strings(transfers: list[Transfer]) -> list[str]:
    """The canonical string of every transfer id: one C round trip through msgspec for the
    whole batch rather than a Python-level ``UUID.__str__`` per transfer."""
    return _decode_strs(_encode_ids([t.id for t in transfers]))


def _fail(requests: list[_Request], e: BaseException) -> None:
    for r in requests:
        if not r.future.done():
            r.future.set_exception(e)


def _group(
    requests: list[_Request], answers: list[list[TransferResult | None]]
) -> dict[int, _Group]:
    """Split requests per ledger, keeping arrival order and request boundaries.

    A linked chain whose transfers name different ledgers cannot commit atomically (it would
    span two transactions), so it fails here: the first transfer of another ledger answers
    ``accounts_must_have_the_same_ledger``, the rest of the chain ``linked_event_failed``.
    """
    groups: dict[int, _Group] = {}
    for ri, r in enumerate(requests):
        ts = r.transfers
        n = len(ts)
        first = ts[0].ledger
        if all(t.ledger == first for t in ts):
            # the common case: the whole request belongs to one ledger, so none of its chains
            # can be mixed and it goes to that ledger's group as it is
            g = groups.get(first)
            if g is None:
                g = groups[first] = _Group()
            g.transfers.extend(ts)
            g.spans.append((ri, 0, len(g.transfers) - n, n))
            g.ends.append(len(g.transfers))
            continue
        touched: set[int] = set()
        i = 0
        while i < n:
            j = i
            while transfer_flag_bits(ts[j].flags) & _LINKED and j + 1 < n:
                j += 1
            ledger = ts[i].ledger
            mixed = next((k for k in range(i, j + 1) if ts[k].ledger != ledger), None)
            if mixed is not None:
                for k in range(i, j + 1):
                    st = (
                        TransferStatus.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER
                        if k == mixed
                        else TransferStatus.LINKED_EVENT_FAILED
                    )
                    answers[ri][k] = TransferResult(str(ts[k].id), st)
            else:
                g = groups.get(ledger)
                if g is None:
                    g = groups[ledger] = _Group()
                g.spans.append((ri, i, len(g.transfers), j + 1 - i))
                g.transfers.extend(ts[i : j + 1])
                touched.add(ledger)
            i = j + 1
        for ledger in touched:
            g = groups[ledger]
            g.ends.append(len(g.transfers))
    return groups


async def run_expirer(store: Store, *, interval_s: float = limits.EXPIRER_INTERVAL_S) -> None:
    """Release holds whose timeout has passed, in every ledger, forever (cancel to stop).

    It posts empty batches with ``expire_due``: the same transaction shape, clock and locks as
    any batch, so it cannot race the committer or another engine process.
    """
    while True:
        try:
            for ledger in await store.ledgers():
                # an expiry pass takes the ledger's clock, which sends the batch being
                # prepared down the locked path: only when there is something to release
                while await store.has_due_holds(ledger, now_ns()):
                    outcome = await store.post_batch(ledger, (), expire_due=True)
                    metrics.HOLDS_EXPIRED.inc(len(outcome.expired))
                    if len(outcome.expired) < limits.MAX_EXPIRED_PER_RUN:
                        break
        except RETRYABLE as e:
            log.warning("expirer: database unavailable (%s)", e)
        await asyncio.sleep(interval_s)

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
**Ledger groups.** One database transaction touches one ledger, so a batch is split in ledger
groups, committed one after another by the one committer; every caller of the batch waits for
all of them. So a batch holds at most ``MAX_LEDGER_GROUPS_PER_BATCH`` (the taker stops there),
a request needing more is refused (``TooManyLedgers``, HTTP 413), and each extra ledger group
of a request counts ``LEDGER_GROUP_COST`` transfers against the queue's bound. A group whose
ledger has no clock row (no accounts: every transfer fails) is answered from a few reads shared
by all such groups of the batch, without a transaction, and writes nothing.

**One transfer id, one transfer.** The id is the key across ledgers (a transfer's reads load
the ids it names from every ledger), but each ledger group reads before the others commit. So,
in this process, no read may miss a write of the same id that precedes it in arrival order:

- within a batch, one id never sits in two ledgers' groups of the same round (``_Batch``): a
  chain naming an id the round already gave another ledger starts the next round, read only
  after the earlier rounds committed;
- across batches, a group naming an id that the batch in flight names in another ledger is not
  prepared on the side: it is read once that batch has committed.

Every transfer therefore gets the status one-at-a-time application in arrival order gives
(the later occurrence of an id answers ``exists_with_different_*``, or is created if the
earlier one failed), and an id is stored once.

**Across engine processes** (several committers on one database) nothing orders two ledgers'
writers: a ledger's clock row serialises that ledger only, and a unique index on ``id`` alone
cannot exist on a table distributed by ledger (Citus). The same id sent to two ledgers through
two processes within the window between one batch's read and the other's commit is stored
twice. Measured (``scripts/id_window.py``: two processes post each id into two ledgers at a
chosen offset): when idle, 85-95 % of the pairs at ±1 ms, about half at ±5 ms, 2-8 % at
±20 ms; with both processes also committing 500-transfer batches, 75 % still at ±20 ms. Only
a client that sends one id for two different ledgers at once, to two processes, meets it (a
retry names the same ledger), and one ``onecard serve`` (one committer) is exact. Exact across
processes would take a claim table keyed by id alone: an insert into a second unique index
per transfer, and on Citus a distributed transaction for every batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Final, Protocol, cast
from uuid import UUID

import asyncpg
import msgspec

from engine import limits, metrics
from engine.store import Prepared, Store, Tip, now_ns
from ledger.apply import BatchOutcome
from ledger.status import TransferStatus
from ledger.transfer import StoredTransfer, Transfer
from ledger.types import NIL_UUID, TransferFlags, transfer_flag_bits

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


class TooManyLedgers(ValueError):
    """A request needs more ledger groups than one batch may hold (HTTP 413)."""


class _Request:
    __slots__ = ("cost", "future", "ledger", "transfers")

    def __init__(
        self,
        transfers: Sequence[Transfer],
        future: asyncio.Future[list[TransferResult]],
        *,
        ledger: int | None,
        cost: int,
    ):
        self.transfers = transfers
        self.future = future
        self.ledger = ledger  # the one ledger every transfer names; None when several
        self.cost = cost  # what it counts against max_queued (see submit)


class _Group:
    """One ledger's share of a batch (in one round), with where each transfer's answer goes."""

    __slots__ = (
        "based_on", "ends", "ledger", "outcome", "prepared", "round", "spans", "transfers",
    )

    def __init__(self, ledger: int, round_: int) -> None:
        self.ledger = ledger
        # 0, or a later round of the batch: read and committed only after the earlier rounds
        # committed (never prepared ahead)
        self.round = round_
        self.transfers: list[Transfer] = []
        # runs of consecutive transfers: (request index, first position in the request,
        # first position in this group, length)
        self.spans: list[tuple[int, int, int, int]] = []
        self.ends: list[int] = []
        self.prepared: Prepared | None = None  # applied ahead of the commit, if it could be
        self.based_on: Tip | None = None  # the tip it was prepared on (None: the database)
        self.outcome: BatchOutcome | None = None  # answered with nothing to write (no clock)


class _Batch:
    """The requests the committer took at once, split in ledger groups.

    Each ledger group is its own transaction, its reads made before the others commit, so
    **one transfer id never sits in two ledgers' groups of the same round** (an id counts where
    a transfer has it as ``id`` or as ``pending_id``). A linked chain naming an id the round
    already gave another ledger starts the next round, which is read only once the earlier
    rounds have committed: the later occurrence then sees the earlier one exactly as if the
    requests had been applied one at a time (``exists_with_different_ledger`` if it was
    created, ``pending_transfer_has_different_ledger`` for a hold of another ledger...).
    Groups commit in the order they were opened, so a ledger's groups keep arrival order.
    """

    __slots__ = ("_claims", "_names", "_open", "_round", "answers", "groups", "last", "requests")

    def __init__(self) -> None:
        self.requests: list[_Request] = []
        self.answers: list[list[TransferResult | None]] = []
        self.groups: list[_Group] = []  # in commit order
        self.last: dict[int, _Group] = {}  # per ledger, its last group (the state it leaves)
        self._open: dict[int, _Group] = {}  # the current round's groups
        self._round = 0
        # the current round's ids -> ledger; kept only once the batch names a second ledger
        # (a one-ledger batch, the usual one, pays nothing per transfer for it)
        self._claims: dict[UUID, int] | None = None
        self._names: dict[UUID, int] | None = None  # see clashes()

    @classmethod
    def of(cls, requests: list[_Request]) -> _Batch:
        """A batch of exactly these requests (each fits: see ``Batcher.submit``)."""
        b = cls()
        for r in requests:
            b.add(r, max_groups=None)
        return b

    def add(self, r: _Request, *, max_groups: int | None) -> bool:
        """Take request ``r``, unless the batch would then hold more than ``max_groups``
        ledger groups (an empty batch takes any request); False: not taken, nothing changed."""
        ts = r.transfers
        ri = len(self.requests)
        ledger = r.ledger
        if ledger is not None and self._claims is None and self._open.keys() <= {ledger}:
            # the common case: the batch so far and this request name one ledger, so no id
            # can sit in two ledgers: the request joins that ledger's group as it is
            self.requests.append(r)
            self.answers.append([None] * len(ts))
            g = self._open.get(ledger) or self._new_group(ledger)
            g.transfers.extend(ts)
            n = len(ts)
            g.spans.append((ri, 0, len(g.transfers) - n, n))
            g.ends.append(len(g.transfers))
            return True
        if self._claims is None:
            self._claims = {}
            for g in self._open.values():
                self._claims.update(dict.fromkeys(_names(g.transfers), g.ledger))
        plan, added = _place(ts, self._claims, set(self._open))
        if max_groups is not None and self.groups and len(self.groups) + added > max_groups:
            return False
        self.requests.append(r)
        answers: list[TransferResult | None] = [None] * len(ts)
        self.answers.append(answers)
        touched: dict[int, _Group] = {}
        for i, j, lg, clash in plan:
            if lg is None:  # a chain mixing ledgers cannot commit atomically: refused here
                mixed = next(k for k in range(i, j + 1) if ts[k].ledger != ts[i].ledger)
                for k in range(i, j + 1):
                    st = (
                        TransferStatus.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER
                        if k == mixed
                        else TransferStatus.LINKED_EVENT_FAILED
                    )
                    answers[k] = TransferResult(str(ts[k].id), st)
                continue
            if clash:
                self._round += 1
                self._open = {}
                self._claims = {}
            g = self._open.get(lg) or self._new_group(lg)
            g.spans.append((ri, i, len(g.transfers), j + 1 - i))
            g.transfers.extend(ts[i : j + 1])
            self._claims.update(dict.fromkeys(_names(ts[i : j + 1]), lg))
            touched[id(g)] = g
        for g in touched.values():
            g.ends.append(len(g.transfers))
        return True

    def _new_group(self, ledger: int) -> _Group:
        g = _Group(ledger, self._round)
        self._open[ledger] = g
        self.groups.append(g)
        self.last[ledger] = g
        return g

    def clashes(self, g: _Group) -> bool:
        """Whether ``g`` (a group of the next batch) names an id that this batch names in
        another ledger: then it must not be read before this batch has committed."""
        if self.last.keys() <= {g.ledger}:
            return False  # this batch names no other ledger
        if self._names is None:
            names: dict[UUID, int] = {}  # id -> its ledger, -1 when several (ledgers are >= 0)
            for h in self.groups:
                for x in _names(h.transfers):
                    names[x] = h.ledger if names.get(x, h.ledger) == h.ledger else -1
            self._names = names
        mine = g.ledger
        return any(self._names.get(x, mine) != mine for x in _names(g.transfers))

    def keep_prepared_on(self, tips: dict[int, Tip]) -> None:
        """Drop every preparation whose tip is no longer its ledger's latest: the batch before
        took the locked path or failed, so what it was prepared on never committed."""
        for g in self.groups:
            if g.prepared is not None and tips.get(g.ledger) is not g.based_on:
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
        max_groups: int = limits.MAX_LEDGER_GROUPS_PER_BATCH,
    ) -> None:
        assert max_batch >= limits.MAX_TRANSFERS_PER_REQUEST, "a request must fit in a batch"
        assert max_groups >= limits.MAX_LEDGER_GROUPS_PER_REQUEST, "a request must fit"
        self.store = store
        self.max_batch = max_batch
        self.max_groups = max_groups
        self.max_queued = max_queued
        self.linger_s = linger_s
        self._queue: deque[_Request] = deque()
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
        self._queue.append(_Request(transfers, fut, ledger=ledger, cost=cost))
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
                batch = _Batch()
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

    async def _answer_unclocked(self, batch: _Batch, flight: _Flight | None) -> None:
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

    async def _land(self, flight: _Flight) -> _Answers | None:
        """Wait for a batch's commit; its answers (not yet delivered), or None if every caller
        has already been answered (a failure)."""
        try:
            return await flight.task
        except Exception as e:  # answer every waiter; the committer itself carries on
            self._tips.clear()  # nothing is known about what the batch left
            for g in flight.batch.groups:
                self._unknown(g.ledger)
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
                    (await self._commit_batch(_Batch.of([r]))).deliver()
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
            return _Answers(batch.requests, batch.answers, posted)
        finally:
            if pending is not None:
                pending.deliver()  # if nothing was written, the hook never ran

    async def _post_with_retry(
        self, ledger: int, g: _Group, *, on_write: Callable[[], None] | None
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


def _names(transfers: Sequence[Transfer]) -> list[UUID]:
    """Every transfer id the transfers name, as ``id`` or as ``pending_id`` (the nil id, which
    names nothing, left out)."""
    out = [t.id for t in transfers if t.id != NIL_UUID]
    out.extend(t.pending_id for t in transfers if t.pending_id and t.pending_id != NIL_UUID)
    return out


def _place(
    ts: Sequence[Transfer], claims: dict[UUID, int], open_ledgers: set[int]
) -> tuple[list[tuple[int, int, int | None, bool]], int]:
    """Where each linked chain of a request goes, given the current round's ``claims`` (id ->
    ledger) and ledgers: (first, last, ledger or None for a chain mixing ledgers, whether it
    starts a new round), and how many ledger groups the request adds. Nothing is changed."""
    plan: list[tuple[int, int, int | None, bool]] = []
    local: dict[UUID, int] = {}  # what this request claims in the round it is placed in
    fresh = False  # this request started a round: the earlier claims no longer apply
    ledgers = set(open_ledgers)
    added = 0
    n = len(ts)
    i = 0
    while i < n:
        j = i
        while transfer_flag_bits(ts[j].flags) & _LINKED and j + 1 < n:
            j += 1
        ledger = ts[i].ledger
        if any(ts[k].ledger != ledger for k in range(i + 1, j + 1)):
            plan.append((i, j, None, False))
            i = j + 1
            continue
        names = _names(ts[i : j + 1])
        clash = any(
            local.get(x, ledger) != ledger or (not fresh and claims.get(x, ledger) != ledger)
            for x in names
        )
        if clash:
            fresh = True
            local = {}
            ledgers = set()
        if ledger not in ledgers:
            ledgers.add(ledger)
            added += 1
        local.update(dict.fromkeys(names, ledger))
        plan.append((i, j, ledger, clash))
        i = j + 1
    return plan, added


def ledger_groups(transfers: Sequence[Transfer]) -> int:
    """How many ledger groups (transactions) one request needs on its own: its ledgers, and a
    ledger again each time a transfer id it already named in another ledger starts a round."""
    if not transfers:
        return 0
    first = transfers[0].ledger
    if all(t.ledger == first for t in transfers):
        return 1
    return _place(transfers, {}, set())[1]


async def run_expirer(store: Store, *, interval_s: float = limits.EXPIRER_INTERVAL_S) -> None:
    """Release holds whose timeout has passed, in every ledger, forever (cancel to stop)."""
    while True:
        try:
            await expire_due_holds(store)
        except RETRYABLE as e:
            log.warning("expirer: database unavailable (%s)", e)
        await asyncio.sleep(interval_s)


async def expire_due_holds(store: Store) -> int:
    """One pass of the expirer; returns how many holds it released.

    One indexed statement asks which ledgers have a pending hold past its timeout, for all
    ledgers at once (an idle server with 10,000 ledgers asks one question a second, not
    10,000). Only those ledgers get expiry batches: empty batches with ``expire_due``, the
    same transaction shape, clock and locks as any batch, so they cannot race the committer
    or another engine process; an expiry batch takes the ledger's clock, which sends the
    batch being prepared down the locked path, hence only where there is something to do.
    """
    released = 0
    for ledger in await store.ledgers_with_due_holds(now_ns()):
        while True:
            outcome = await store.post_batch(ledger, (), expire_due=True)
            metrics.HOLDS_EXPIRED.inc(len(outcome.expired))
            released += len(outcome.expired)
            if len(outcome.expired) < limits.MAX_EXPIRED_PER_RUN:
                break
    return released

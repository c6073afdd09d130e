"""A batch split in ledger groups and rounds (engine/batcher.py commits them).

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

- within a batch, one id never sits in two ledgers' groups of the same round (``Batch``): a
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
from collections.abc import Sequence
from typing import Final
from uuid import UUID

import msgspec

from engine.writing import Prepared, Tip
from ledger.apply import BatchOutcome
from ledger.status import TransferStatus
from ledger.transfer import Transfer
from ledger.types import NIL_UUID, TransferFlags, transfer_flag_bits

__all__ = ["Batch", "Group", "Request", "TransferResult", "ledger_groups"]

# A plain int: `int & IntFlag` builds a new enum member per call, on the per-transfer path.
_LINKED: Final = int(TransferFlags.LINKED)


class TransferResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """The answer for one transfer: its status and, when recorded, its timestamp."""

    id: str
    status: TransferStatus
    timestamp: int | None = None


class Request:
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


class Group:
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


class Batch:
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
        self.requests: list[Request] = []
        self.answers: list[list[TransferResult | None]] = []
        self.groups: list[Group] = []  # in commit order
        self.last: dict[int, Group] = {}  # per ledger, its last group (the state it leaves)
        self._open: dict[int, Group] = {}  # the current round's groups
        self._round = 0
        # the current round's ids -> ledger; kept only once the batch names a second ledger
        # (a one-ledger batch, the usual one, pays nothing per transfer for it)
        self._claims: dict[UUID, int] | None = None
        self._names: dict[UUID, int] | None = None  # see clashes()

    @classmethod
    def of(cls, requests: list[Request]) -> Batch:
        """A batch of exactly these requests (each fits: see ``Batcher.submit``)."""
        b = cls()
        for r in requests:
            b.add(r, max_groups=None)
        return b

    def add(self, r: Request, *, max_groups: int | None) -> bool:
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
        touched: dict[int, Group] = {}
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

    def _new_group(self, ledger: int) -> Group:
        g = Group(ledger, self._round)
        self._open[ledger] = g
        self.groups.append(g)
        self.last[ledger] = g
        return g

    def clashes(self, g: Group) -> bool:
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

"""Apply a batch of transfers to in-memory account state: the ledger's rules, and nothing else.

Pure: no I/O, no asyncio, no clock. The store loads every account, transfer and hold the batch
can touch, calls :func:`apply_transfers`, and writes back what it returns. Because the same
function decides every batch, a batch of N transfers answers exactly what N one-transfer
batches would, in the same order (the batcher relies on it; tests prove it).

Order of checks for one transfer (the first failure answers):

1. ``id_must_not_be_zero``; ``flags_are_mutually_exclusive``.
2. Idempotency: an existing id answers ``exists`` or ``exists_with_different_<field>``, the
   fields compared in the order flags, pending_id, timeout, debit_account_id,
   credit_account_id, amount, user_data, ledger, code.
3. Plain and pending transfers: ``amount_must_be_positive``, ``pending_id_must_be_zero``,
   ``timeout_reserved_for_pending_transfer``, ``accounts_must_be_different``,
   ``code_must_not_be_zero``, ``debit_account_not_found``, ``credit_account_not_found``,
   ``accounts_must_have_the_same_ledger``, ``account_closed``, ``debit_account_frozen``,
   ``overflows_debits``, ``overflows_credits``, then (unless ``force``) ``exceeds_credits``,
   ``exceeds_debits``.
4. ``post_pending`` / ``void_pending``: ``pending_transfer_not_found`` /
   ``pending_transfer_not_pending``, ``pending_transfer_has_different_*`` (debit, credit,
   ledger, code), ``timeout_reserved_for_pending_transfer``, the hold's state
   (``already_posted``, ``already_voided``, ``expired``), the amount
   (``amount_must_be_positive``, ``exceeds_pending_transfer_amount``,
   ``pending_transfer_has_different_amount`` for a partial void), then for a post
   ``account_closed`` and the overflow checks. A void is always allowed on a frozen or closed
   account: releasing a hold can only make the holder better off. A post ignores ``frozen``:
   the hold reserved the money before the card was frozen, and the service was delivered.

Linked chains: events up to and including the first one without ``linked`` commit together or
not at all. The failing event answers its own status and the others ``linked_event_failed``.
A chain still open at the end of its request answers ``linked_event_chain_open`` on its last
event and ``linked_event_failed`` on the others, without evaluating them. An ``exists`` inside
a chain counts as success, so a retried chain answers ``exists`` for every event.

Holds whose timeout has passed at the batch's timestamp are expired before any event runs —
every hold the caller passed in, that is: the store passes the holds the batch names (by id or
``pending_id``), so a post or void of an overdue hold always answers
``pending_transfer_expired``; other overdue holds are released by the expirer's next pass (each
second), until which they keep their money reserved.

Two corner cases follow from the order above: debit and credit both 0 is not
``accounts_must_be_different`` but falls to ``code_must_not_be_zero`` /
``debit_account_not_found``; a ``pending_id`` naming another ledger's plain transfer answers
``pending_transfer_has_different_ledger``.

The rules stay in one module, as TigerBeetle keeps its state machine in one file: the order of
checks above, the code that runs them, the posting that follows and the linked chains are read
and changed together, and any seam between them would either cut the order of checks in two or
cost a call per transfer on the hottest path of the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

import msgspec

from ledger.account import AccountState
from ledger.status import TransferStatus as S
from ledger.transfer import Hold, StoredTransfer, Transfer
from ledger.types import (
    INT64_MAX,
    NIL_UUID,
    AccountFlags,
    TransferFlags,
    TransferState,
    transfer_flag_bits,
)

# Plain ints, not IntFlag members: `int & IntFlag` goes through Flag.__and__ and builds a new
# enum member each time, about ten times per transfer; with ints apply() costs a third as much.
_LINKED = int(TransferFlags.LINKED)
_PENDING = int(TransferFlags.PENDING)
_POST = int(TransferFlags.POST_PENDING)
_VOID = int(TransferFlags.VOID_PENDING)
_FORCE = int(TransferFlags.FORCE)
_RESOLVING = _POST | _VOID
_EXCLUSIVE = _PENDING | _POST | _VOID
_CLOSED = int(AccountFlags.CLOSED)
_FROZEN = int(AccountFlags.FROZEN)
_DMNEC = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
_CMNED = int(AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)
_NS_PER_S = 1_000_000_000


class BatchOutcome(msgspec.Struct, gc=False):
    """What a batch did. ``timestamps[i]`` is 0 unless ``statuses[i]`` is ok."""

    statuses: list[S]
    timestamps: list[int]
    created: list[StoredTransfer]
    touched_accounts: list[int]
    holds_changed: list[Hold]
    expired: list[Hold]


def timestamps_needed(batch_len: int) -> int:
    """How many engine timestamps a batch of ``batch_len`` transfers consumes.

    Slot 0 is the batch's own instant (hold expiry); transfer ``i`` gets ``first + 1 + i``.
    """
    return batch_len + 1


class _Undo:
    """What a linked chain changed, so a failing chain can put it all back."""

    __slots__ = ("accounts", "created_len", "holds", "transfer_ids")

    def __init__(self, created_len: int) -> None:
        self.accounts: dict[int, tuple[int, int, int, int]] = {}
        self.transfer_ids: list[UUID] = []
        self.holds: dict[UUID, tuple[TransferState, int] | None] = {}
        self.created_len = created_len


class _Batch:
    """Mutable state of one batch application."""

    def __init__(
        self,
        accounts: dict[int, AccountState],
        transfers: dict[UUID, StoredTransfer],
        holds: dict[UUID, Hold],
    ) -> None:
        self.accounts = accounts
        self.transfers = transfers
        self.holds = holds
        self.created: list[StoredTransfer] = []
        self.touched: set[int] = set()
        self.dirty_holds: set[UUID] = set()

    # -- bookkeeping -------------------------------------------------------------------------

    def _save(self, undo: _Undo | None, a: AccountState) -> None:
        self.touched.add(a.id)
        if undo is not None and a.id not in undo.accounts:
            undo.accounts[a.id] = (
                a.debits_posted,
                a.credits_posted,
                a.debits_pending,
                a.credits_pending,
            )

    def _save_hold(self, undo: _Undo | None, h: Hold, *, new: bool) -> None:
        self.dirty_holds.add(h.id)
        if undo is not None and h.id not in undo.holds:
            undo.holds[h.id] = None if new else (h.state, h.resolved_at)

    def rollback(self, undo: _Undo) -> None:
        for aid, (dp, cp, dq, cq) in undo.accounts.items():
            a = self.accounts[aid]
            a.debits_posted, a.credits_posted = dp, cp
            a.debits_pending, a.credits_pending = dq, cq
        for tid in undo.transfer_ids:
            del self.transfers[tid]
        for hid, prior in undo.holds.items():
            if prior is None:
                del self.holds[hid]
            else:
                h = self.holds[hid]
                h.state, h.resolved_at = prior
        del self.created[undo.created_len :]

    def _record(self, undo: _Undo | None, st: StoredTransfer) -> None:
        self.transfers[st.id] = st
        self.created.append(st)
        if undo is not None:
            undo.transfer_ids.append(st.id)

    # -- expiry ------------------------------------------------------------------------------

    def expire_due(self, now: int) -> list[Hold]:
        """Release every loaded hold whose timeout has passed at ``now``."""
        expired = []
        for h in self.holds.values():
            if h.state is TransferState.PENDING and 0 < h.expires_at <= now:
                self._release(None, h)
                h.state = TransferState.EXPIRED
                h.resolved_at = now
                self.dirty_holds.add(h.id)
                expired.append(h)
        return expired

    def _release(self, undo: _Undo | None, h: Hold) -> None:
        dr = self.accounts[h.debit_account_id]
        cr = self.accounts[h.credit_account_id]
        self._save(undo, dr)
        self._save(undo, cr)
        dr.debits_pending -= h.amount
        cr.credits_pending -= h.amount
        assert dr.debits_pending >= 0 and cr.credits_pending >= 0, "pending went negative"

    # -- one transfer ------------------------------------------------------------------------

    def apply(self, t: Transfer, bits: int, ts: int, undo: _Undo | None) -> S:
        """Validate and apply one transfer; on failure nothing is changed."""
        if t.id == NIL_UUID:
            return S.ID_MUST_NOT_BE_ZERO
        if (bits & _EXCLUSIVE) not in (0, _PENDING, _POST, _VOID):
            return S.FLAGS_ARE_MUTUALLY_EXCLUSIVE
        existing = self.transfers.get(t.id)
        if existing is not None:
            return self._compare(existing, t, bits)
        if bits & _RESOLVING:
            return self._resolve(t, bits, ts, undo)
        return self._create(t, bits, ts, undo)

    def _compare(self, e: StoredTransfer, t: Transfer, bits: int) -> S:
        if e.flags != bits:
            return S.EXISTS_WITH_DIFFERENT_FLAGS
        pending_id = t.pending_id if t.pending_id != NIL_UUID else None
        if e.pending_id != pending_id:
            return S.EXISTS_WITH_DIFFERENT_PENDING_ID
        if e.timeout_s != (t.timeout_s or 0):
            return S.EXISTS_WITH_DIFFERENT_TIMEOUT
        resolving = bool(bits & _RESOLVING)
        # A post/void may leave accounts, code and amount zero: "as the pending transfer".
        if t.debit_account_id != e.debit_account_id and not (resolving and t.debit_account_id == 0):
            return S.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID
        if t.credit_account_id != e.credit_account_id and not (
            resolving and t.credit_account_id == 0
        ):
            return S.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
        if t.amount != e.amount and not (resolving and t.amount == 0 and self._was_full(e)):
            return S.EXISTS_WITH_DIFFERENT_AMOUNT
        if t.user_data != e.user_data:
            return S.EXISTS_WITH_DIFFERENT_USER_DATA
        if t.ledger != e.ledger:
            return S.EXISTS_WITH_DIFFERENT_LEDGER
        if t.code != e.code and not (resolving and t.code == 0):
            return S.EXISTS_WITH_DIFFERENT_CODE
        return S.EXISTS

    def _was_full(self, e: StoredTransfer) -> bool:
        """Whether a stored post/void covered its hold's whole amount (so amount 0 matches)."""
        if e.flags & _VOID:
            return True
        assert e.pending_id is not None
        h = self.holds.get(e.pending_id)
        # The store loads the holds of every pending_id in the batch, but only the batch's own
        # ledger's: a hold of another ledger is unknown here and that comparison falls to ledger.
        return h is None or e.amount == h.amount

    def _create(self, t: Transfer, bits: int, ts: int, undo: _Undo | None) -> S:
        # Longer than 70 lines on purpose: the checks run top to bottom in the order the module
        # docstring lists, and the posting below them uses their locals (dr, cr, amount); a
        # helper would add a call for every transfer of every batch.
        amount = t.amount
        if amount <= 0:
            return S.AMOUNT_MUST_BE_POSITIVE
        if t.pending_id is not None and t.pending_id != NIL_UUID:
            return S.PENDING_ID_MUST_BE_ZERO
        pending = bool(bits & _PENDING)
        if t.timeout_s and not pending:
            return S.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
        if t.debit_account_id == t.credit_account_id and t.debit_account_id != 0:
            return S.ACCOUNTS_MUST_BE_DIFFERENT
        if t.code == 0:
            return S.CODE_MUST_NOT_BE_ZERO
        dr = self.accounts.get(t.debit_account_id)
        if dr is None:
            return S.DEBIT_ACCOUNT_NOT_FOUND
        cr = self.accounts.get(t.credit_account_id)
        if cr is None:
            return S.CREDIT_ACCOUNT_NOT_FOUND
        if dr.ledger != cr.ledger or dr.ledger != t.ledger:
            return S.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER
        if (dr.flags | cr.flags) & _CLOSED:
            return S.ACCOUNT_CLOSED
        if dr.flags & _FROZEN:
            return S.DEBIT_ACCOUNT_FROZEN
        if dr.debits_posted + dr.debits_pending + amount > INT64_MAX:
            return S.OVERFLOWS_DEBITS
        if cr.credits_posted + cr.credits_pending + amount > INT64_MAX:
            return S.OVERFLOWS_CREDITS
        if not bits & _FORCE:
            if dr.flags & _DMNEC and (
                dr.debits_posted + dr.debits_pending + amount > dr.credits_posted
            ):
                return S.EXCEEDS_CREDITS
            if cr.flags & _CMNED and (
                cr.credits_posted + cr.credits_pending + amount > cr.debits_posted
            ):
                return S.EXCEEDS_DEBITS
        # -- all checks passed: change state (nothing below may fail) --
        self._save(undo, dr)
        self._save(undo, cr)
        timeout = t.timeout_s or 0
        if pending:
            dr.debits_pending += amount
            cr.credits_pending += amount
            h = Hold(
                id=t.id,
                ledger=t.ledger,
                debit_account_id=dr.id,
                credit_account_id=cr.id,
                amount=amount,
                code=t.code,
                expires_at=ts + timeout * _NS_PER_S if timeout else 0,
                created_at=ts,
            )
            self.holds[t.id] = h
            self._save_hold(undo, h, new=True)
        else:
            dr.debits_posted += amount
            cr.credits_posted += amount
        self._record(
            undo,
            StoredTransfer(
                id=t.id,
                ledger=t.ledger,
                debit_account_id=dr.id,
                credit_account_id=cr.id,
                amount=amount,
                code=t.code,
                flags=bits,
                pending_id=None,
                timeout_s=timeout,
                user_data=t.user_data,
                timestamp=ts,
            ),
        )
        return S.CREATED

    def _resolve(self, t: Transfer, bits: int, ts: int, undo: _Undo | None) -> S:
        pid = t.pending_id
        h = self.holds.get(pid) if pid is not None else None
        if h is None:
            other = self.transfers.get(pid) if pid is not None else None
            if other is None:
                return S.PENDING_TRANSFER_NOT_FOUND
            if other.ledger != t.ledger:
                return S.PENDING_TRANSFER_HAS_DIFFERENT_LEDGER
            return S.PENDING_TRANSFER_NOT_PENDING
        if t.debit_account_id and t.debit_account_id != h.debit_account_id:
            return S.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID
        if t.credit_account_id and t.credit_account_id != h.credit_account_id:
            return S.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID
        if t.ledger != h.ledger:
            return S.PENDING_TRANSFER_HAS_DIFFERENT_LEDGER
        if t.code and t.code != h.code:
            return S.PENDING_TRANSFER_HAS_DIFFERENT_CODE
        if t.timeout_s:
            return S.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
        if h.state is TransferState.SETTLED:
            return S.PENDING_TRANSFER_ALREADY_POSTED
        if h.state is TransferState.VOIDED:
            return S.PENDING_TRANSFER_ALREADY_VOIDED
        if h.state is TransferState.EXPIRED:
            return S.PENDING_TRANSFER_EXPIRED
        if t.amount < 0:
            return S.AMOUNT_MUST_BE_POSITIVE
        if t.amount > h.amount:
            return S.EXCEEDS_PENDING_TRANSFER_AMOUNT
        post = bool(bits & _POST)
        if not post and t.amount not in (0, h.amount):
            return S.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT
        amount = (t.amount or h.amount) if post else h.amount
        dr = self.accounts[h.debit_account_id]
        cr = self.accounts[h.credit_account_id]
        if post:
            if (dr.flags | cr.flags) & _CLOSED:
                return S.ACCOUNT_CLOSED
            if dr.debits_posted + amount > INT64_MAX:
                return S.OVERFLOWS_DEBITS
            if cr.credits_posted + amount > INT64_MAX:
                return S.OVERFLOWS_CREDITS
        # -- all checks passed: change state --
        self._release(undo, h)
        if post:
            dr.debits_posted += amount
            cr.credits_posted += amount
        self._save_hold(undo, h, new=False)
        h.state = TransferState.SETTLED if post else TransferState.VOIDED
        h.resolved_at = ts
        self._record(
            undo,
            StoredTransfer(
                id=t.id,
                ledger=t.ledger,
                debit_account_id=h.debit_account_id,
                credit_account_id=h.credit_account_id,
                amount=amount,
                code=h.code,
                flags=bits,
                pending_id=pid,
                timeout_s=0,
                user_data=t.user_data,
                timestamp=ts,
            ),
        )
        return S.CREATED


def apply_transfers(
    batch: Sequence[Transfer],
    *,
    accounts: dict[int, AccountState],
    transfers: dict[UUID, StoredTransfer],
    holds: dict[UUID, Hold],
    first_timestamp: int,
    request_ends: Sequence[int] = (),
) -> BatchOutcome:
    """Apply ``batch`` in order and return each transfer's status.

    ``accounts``, ``transfers`` and ``holds`` must hold every stored account, transfer and hold
    the batch names (by account id, transfer id or pending_id; holds' accounts included); they
    are updated in place. ``first_timestamp`` starts the run of
    ``timestamps_needed(len(batch))`` engine timestamps reserved for the batch.
    ``request_ends`` lists the indices at which one request ends and the next begins (the
    batcher merges requests; a linked chain never crosses a request boundary).
    """
    b = _Batch(accounts, transfers, holds)
    expired = b.expire_due(first_timestamp)
    n = len(batch)
    statuses: list[S] = [S.LINKED_EVENT_FAILED] * n
    stamps = [0] * n
    bits_of = [transfer_flag_bits(t.flags) for t in batch]
    ends = sorted({*request_ends, n})
    seg = 0
    i = 0
    while i < n:
        while ends[seg] <= i:
            seg += 1
        seg_end = ends[seg]
        j = i
        while bits_of[j] & _LINKED and j + 1 < seg_end:
            j += 1
        if i == j and not bits_of[i] & _LINKED:
            statuses[i] = b.apply(batch[i], bits_of[i], first_timestamp + 1 + i, None)
        elif bits_of[j] & _LINKED:
            statuses[j] = S.LINKED_EVENT_CHAIN_OPEN  # the others stay linked_event_failed
        else:
            undo = _Undo(len(b.created))
            for k in range(i, j + 1):
                st = b.apply(batch[k], bits_of[k], first_timestamp + 1 + k, undo)
                statuses[k] = st
                if not st.ok:
                    b.rollback(undo)
                    # earlier events are undone; later ones were never evaluated
                    for m in range(i, k):
                        statuses[m] = S.LINKED_EVENT_FAILED
                    break
        i = j + 1
    for k in range(n):
        if statuses[k].ok:
            stamps[k] = transfers[batch[k].id].timestamp
    return BatchOutcome(
        statuses=statuses,
        timestamps=stamps,
        created=b.created,
        touched_accounts=sorted(b.touched),
        holds_changed=[holds[h] for h in b.dirty_holds if h in holds],
        expired=expired,
    )

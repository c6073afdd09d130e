"""A deliberately simple reference model of the ledger rules (contract §1).

Independent of ``ledger.apply``: it shares only the wire structs, flags and status enums. It
applies one transfer at a time, checking in the order documented in the module docstring of
``ledger.apply``, and implements linked chains the obvious way: apply the chain to a deep copy
of the whole state and keep the copy only if every event succeeded. It is slow on purpose;
tests compare the real rules (pure and on PostgreSQL) against it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from uuid import UUID

from ledger.account import Account
from ledger.status import AccountStatus, TransferStatus
from ledger.transfer import Transfer
from ledger.types import (
    INT64_MAX,
    AccountFlag,
    AccountKind,
    TransferFlag,
    TransferState,
    account_flag_bits,
    transfer_flag_bits,
)

NS_PER_S = 1_000_000_000
NIL = UUID(int=0)

_DMNEC = account_flag_bits((AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,))
_CMNED = account_flag_bits((AccountFlag.CREDITS_MUST_NOT_EXCEED_DEBITS,))
_CLOSED = account_flag_bits((AccountFlag.CLOSED,))
_FROZEN = account_flag_bits((AccountFlag.FROZEN,))


@dataclass
class MAccount:
    """An account as the model sees it."""

    id: int
    ledger: int
    kind: AccountKind
    code: int
    flags: int
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0

    def fields(self) -> tuple[int, int, int, int]:
        """The four live balance fields."""
        return (self.debits_posted, self.credits_posted, self.debits_pending, self.credits_pending)


@dataclass
class MTransfer:
    """A recorded transfer (effective accounts, amount and code)."""

    id: UUID
    ledger: int
    debit_account_id: int
    credit_account_id: int
    amount: int
    code: int
    flags: frozenset[TransferFlag]
    pending_id: UUID | None
    timeout_s: int
    user_data: str | None
    timestamp: int


@dataclass
class MHold:
    """The lifecycle of a pending transfer."""

    id: UUID
    ledger: int
    debit_account_id: int
    credit_account_id: int
    amount: int
    code: int
    expires_at: int  # 0 = never
    state: TransferState = TransferState.PENDING
    resolved_at: int = 0


@dataclass
class ModelState:
    """Everything the model knows: accounts, transfers and holds of every ledger."""

    accounts: dict[int, MAccount] = field(default_factory=dict)
    transfers: dict[UUID, MTransfer] = field(default_factory=dict)
    holds: dict[UUID, MHold] = field(default_factory=dict)


class Model:
    """The reference ledger. Not thread-safe, not fast, hopefully obviously right."""

    def __init__(self) -> None:
        self.state = ModelState()
        self.last_expired: list[UUID] = []  # the holds the last batch expired

    # -- accounts ----------------------------------------------------------------------------

    def create_accounts(self, batch: Sequence[Account]) -> list[AccountStatus]:
        """Create accounts one at a time; a duplicate later in the batch sees the earlier one."""
        return [self._create_account(a) for a in batch]

    def _create_account(self, a: Account) -> AccountStatus:
        if a.id == 0:
            return AccountStatus.ID_MUST_NOT_BE_ZERO
        if a.ledger == 0:
            return AccountStatus.LEDGER_MUST_NOT_BE_ZERO
        flags = set(a.flags)
        if {
            AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,
            AccountFlag.CREDITS_MUST_NOT_EXCEED_DEBITS,
        } <= flags:
            return AccountStatus.FLAGS_ARE_MUTUALLY_EXCLUSIVE
        bits = account_flag_bits(a.flags)
        old = self.state.accounts.get(a.id)
        if old is not None:
            if old.ledger != a.ledger:
                return AccountStatus.EXISTS_WITH_DIFFERENT_LEDGER
            if old.kind != a.kind:
                return AccountStatus.EXISTS_WITH_DIFFERENT_KIND
            if old.code != a.code:
                return AccountStatus.EXISTS_WITH_DIFFERENT_CODE
            if old.flags != bits:
                return AccountStatus.EXISTS_WITH_DIFFERENT_FLAGS
            return AccountStatus.EXISTS
        self.state.accounts[a.id] = MAccount(a.id, a.ledger, a.kind, a.code, bits)
        return AccountStatus.CREATED

    # -- transfers ---------------------------------------------------------------------------

    def expire(self, now: int, *, only: Collection[UUID] | None = None) -> list[UUID]:
        """Release every pending hold whose deadline is at or before ``now``.

        ``only`` narrows expiry to the holds a batch can see (the store expires only the holds
        it loaded, unless asked to sweep); None means every hold.
        """
        expired = []
        for h in self.state.holds.values():
            if only is not None and h.id not in only:
                continue
            if h.state is TransferState.PENDING and h.expires_at != 0 and h.expires_at <= now:
                self._release(self.state, h)
                h.state = TransferState.EXPIRED
                h.resolved_at = now
                expired.append(h.id)
        return expired

    def apply_batch(
        self,
        batch: Sequence[Transfer],
        first_timestamp: int,
        *,
        request_ends: Sequence[int] = (),
        expire_only: Collection[UUID] | None = None,
    ) -> tuple[list[TransferStatus], list[int]]:
        """Apply a batch: expire due holds at ``first_timestamp``, then every transfer in
        order, transfer ``i`` stamped ``first_timestamp + 1 + i``. Returns statuses and the
        timestamp of each recorded (created or existing) transfer, 0 for the others."""
        self.last_expired = self.expire(first_timestamp, only=expire_only)
        n = len(batch)
        statuses: list[TransferStatus | None] = [None] * n
        stamps = [0] * n
        cuts = sorted({0, n, *request_ends})
        for start, end in itertools.pairwise(cuts):
            self._apply_request(batch, start, end, first_timestamp, statuses, stamps)
        done = [s for s in statuses if s is not None]
        assert len(done) == n
        return done, stamps

    def _apply_request(
        self,
        batch: Sequence[Transfer],
        start: int,
        end: int,
        first_timestamp: int,
        statuses: list[TransferStatus | None],
        stamps: list[int],
    ) -> None:
        # Cut the request into units: a chain runs up to and including the first event
        # without `linked`; an event without `linked` on its own is a unit of one.
        i = start
        while i < end:
            j = i
            while TransferFlag.LINKED in batch[j].flags and j + 1 < end:
                j += 1
            unit = range(i, j + 1)
            if TransferFlag.LINKED in batch[j].flags:
                # the request ended with the chain still open: nothing in it is evaluated
                for k in unit:
                    statuses[k] = TransferStatus.LINKED_EVENT_FAILED
                statuses[j] = TransferStatus.LINKED_EVENT_CHAIN_OPEN
            else:
                trial = copy.deepcopy(self.state)
                failed: int | None = None
                for k in unit:
                    st = self._apply_one(trial, batch[k], first_timestamp + 1 + k)
                    statuses[k] = st
                    if st not in (TransferStatus.CREATED, TransferStatus.EXISTS):
                        failed = k
                        break
                if failed is None:
                    self.state = trial
                    for k in unit:
                        stamps[k] = self.state.transfers[batch[k].id].timestamp
                else:
                    for k in unit:
                        if k != failed:
                            statuses[k] = TransferStatus.LINKED_EVENT_FAILED
            i = j + 1

    @staticmethod
    def _release(s: ModelState, h: MHold) -> None:
        s.accounts[h.debit_account_id].debits_pending -= h.amount
        s.accounts[h.credit_account_id].credits_pending -= h.amount

    def _apply_one(self, s: ModelState, t: Transfer, ts: int) -> TransferStatus:
        if t.id == NIL:
            return TransferStatus.ID_MUST_NOT_BE_ZERO
        kinds = set(t.flags) & {
            TransferFlag.PENDING,
            TransferFlag.POST_PENDING,
            TransferFlag.VOID_PENDING,
        }
        if len(kinds) > 1:
            return TransferStatus.FLAGS_ARE_MUTUALLY_EXCLUSIVE
        old = s.transfers.get(t.id)
        if old is not None:
            return self._compare(s, old, t)
        if kinds & {TransferFlag.POST_PENDING, TransferFlag.VOID_PENDING}:
            return self._resolve(s, t, ts)
        return self._create(s, t, ts)

    @staticmethod
    def _compare(s: ModelState, old: MTransfer, t: Transfer) -> TransferStatus:
        S = TransferStatus
        if old.flags != frozenset(t.flags):
            return S.EXISTS_WITH_DIFFERENT_FLAGS
        pending_id = None if t.pending_id in (None, NIL) else t.pending_id
        if old.pending_id != pending_id:
            return S.EXISTS_WITH_DIFFERENT_PENDING_ID
        if old.timeout_s != (t.timeout_s or 0):
            return S.EXISTS_WITH_DIFFERENT_TIMEOUT
        # What the resubmission asks for, with "zero = as the pending transfer" resolved.
        debit, credit, amount, code = (
            t.debit_account_id,
            t.credit_account_id,
            t.amount,
            t.code,
        )
        if old.pending_id is not None:
            h = s.holds[old.pending_id]
            debit = debit or h.debit_account_id
            credit = credit or h.credit_account_id
            code = code or h.code
            if TransferFlag.VOID_PENDING in old.flags:
                amount = h.amount if amount in (0, h.amount) else amount
            else:
                amount = amount or h.amount
        if old.debit_account_id != debit:
            return S.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID
        if old.credit_account_id != credit:
            return S.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
        if old.amount != amount:
            return S.EXISTS_WITH_DIFFERENT_AMOUNT
        if old.user_data != t.user_data:
            return S.EXISTS_WITH_DIFFERENT_USER_DATA
        if old.ledger != t.ledger:
            return S.EXISTS_WITH_DIFFERENT_LEDGER
        if old.code != code:
            return S.EXISTS_WITH_DIFFERENT_CODE
        return S.EXISTS

    @staticmethod
    def _create(s: ModelState, t: Transfer, ts: int) -> TransferStatus:
        S = TransferStatus
        pending = TransferFlag.PENDING in t.flags
        if t.amount <= 0:
            return S.AMOUNT_MUST_BE_POSITIVE
        if t.pending_id not in (None, NIL):
            return S.PENDING_ID_MUST_BE_ZERO
        if t.timeout_s and not pending:
            return S.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
        # Account id 0 names no account (it is "absent", answered as not found below), so two
        # zero ids are not "the same account".
        if t.debit_account_id == t.credit_account_id != 0:
            return S.ACCOUNTS_MUST_BE_DIFFERENT
        if t.code == 0:
            return S.CODE_MUST_NOT_BE_ZERO
        dr = s.accounts.get(t.debit_account_id)
        if dr is None:
            return S.DEBIT_ACCOUNT_NOT_FOUND
        cr = s.accounts.get(t.credit_account_id)
        if cr is None:
            return S.CREDIT_ACCOUNT_NOT_FOUND
        if not dr.ledger == cr.ledger == t.ledger:
            return S.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER
        if dr.flags & _CLOSED or cr.flags & _CLOSED:
            return S.ACCOUNT_CLOSED
        if dr.flags & _FROZEN:
            return S.DEBIT_ACCOUNT_FROZEN
        if dr.debits_posted + dr.debits_pending + t.amount > INT64_MAX:
            return S.OVERFLOWS_DEBITS
        if cr.credits_posted + cr.credits_pending + t.amount > INT64_MAX:
            return S.OVERFLOWS_CREDITS
        if TransferFlag.FORCE not in t.flags:
            if dr.flags & _DMNEC and (
                dr.debits_posted + dr.debits_pending + t.amount > dr.credits_posted
            ):
                return S.EXCEEDS_CREDITS
            if cr.flags & _CMNED and (
                cr.credits_posted + cr.credits_pending + t.amount > cr.debits_posted
            ):
                return S.EXCEEDS_DEBITS
        timeout = t.timeout_s or 0
        if pending:
            dr.debits_pending += t.amount
            cr.credits_pending += t.amount
            s.holds[t.id] = MHold(
                id=t.id,
                ledger=t.ledger,
                debit_account_id=dr.id,
                credit_account_id=cr.id,
                amount=t.amount,
                code=t.code,
                expires_at=ts + timeout * NS_PER_S if timeout else 0,
            )
        else:
            dr.debits_posted += t.amount
            cr.credits_posted += t.amount
        s.transfers[t.id] = MTransfer(
            id=t.id,
            ledger=t.ledger,
            debit_account_id=dr.id,
            credit_account_id=cr.id,
            amount=t.amount,
            code=t.code,
            flags=frozenset(t.flags),
            pending_id=None,
            timeout_s=timeout,
            user_data=t.user_data,
            timestamp=ts,
        )
        return S.CREATED

    def _resolve(self, s: ModelState, t: Transfer, ts: int) -> TransferStatus:
        S = TransferStatus
        post = TransferFlag.POST_PENDING in t.flags
        h = s.holds.get(t.pending_id) if t.pending_id is not None else None
        if h is None:
            if t.pending_id is not None and t.pending_id in s.transfers:
                # Not documented in ledger.apply's order: a non-hold transfer of another ledger
                # is reported for its ledger (as a hold of another ledger would be), not as
                # "not pending".
                if s.transfers[t.pending_id].ledger != t.ledger:
                    return S.PENDING_TRANSFER_HAS_DIFFERENT_LEDGER
                return S.PENDING_TRANSFER_NOT_PENDING
            return S.PENDING_TRANSFER_NOT_FOUND
        if t.debit_account_id not in (0, h.debit_account_id):
            return S.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID
        if t.credit_account_id not in (0, h.credit_account_id):
            return S.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID
        if t.ledger != h.ledger:
            return S.PENDING_TRANSFER_HAS_DIFFERENT_LEDGER
        if t.code not in (0, h.code):
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
        if not post and t.amount not in (0, h.amount):
            return S.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT
        amount = (t.amount or h.amount) if post else h.amount
        dr = s.accounts[h.debit_account_id]
        cr = s.accounts[h.credit_account_id]
        if post:
            if dr.flags & _CLOSED or cr.flags & _CLOSED:
                return S.ACCOUNT_CLOSED
            # the hold's own reservation is released as the amount is posted
            if dr.debits_posted + amount + dr.debits_pending - h.amount > INT64_MAX:
                return S.OVERFLOWS_DEBITS
            if cr.credits_posted + amount + cr.credits_pending - h.amount > INT64_MAX:
                return S.OVERFLOWS_CREDITS
        self._release(s, h)
        if post:
            dr.debits_posted += amount
            cr.credits_posted += amount
        h.state = TransferState.SETTLED if post else TransferState.VOIDED
        h.resolved_at = ts
        s.transfers[t.id] = MTransfer(
            id=t.id,
            ledger=t.ledger,
            debit_account_id=h.debit_account_id,
            credit_account_id=h.credit_account_id,
            amount=amount,
            code=h.code,
            flags=frozenset(t.flags),
            pending_id=t.pending_id,
            timeout_s=0,
            user_data=t.user_data,
            timestamp=ts,
        )
        return S.CREATED

    # -- views for comparison ----------------------------------------------------------------

    def balances(self) -> dict[int, tuple[int, int, int, int]]:
        """Every account's four live fields."""
        return {a.id: a.fields() for a in self.state.accounts.values()}

    def hold_states(self) -> dict[UUID, tuple[TransferState, int]]:
        """Every hold's state and the timestamp that resolved it (0 while pending)."""
        return {h.id: (h.state, h.resolved_at) for h in self.state.holds.values()}

    def transfer_rows(self) -> dict[UUID, tuple[object, ...]]:
        """Every recorded transfer as a tuple of its stored fields (flags as bits)."""
        return {
            t.id: (
                t.ledger,
                t.debit_account_id,
                t.credit_account_id,
                t.amount,
                t.code,
                transfer_flag_bits(tuple(sorted(t.flags))),
                t.pending_id,
                t.timeout_s,
                t.user_data,
                t.timestamp,
            )
            for t in self.state.transfers.values()
        }

    def pending_deadlines(self) -> list[int]:
        """Deadlines of holds that are still pending and can expire."""
        return [
            h.expires_at
            for h in self.state.holds.values()
            if h.state is TransferState.PENDING and h.expires_at
        ]

    def zero_sum(self, ledger: int) -> tuple[int, int]:
        """(sum debits_posted - sum credits_posted, same for pending) over one ledger."""
        accts = [a for a in self.state.accounts.values() if a.ledger == ledger]
        return (
            sum(a.debits_posted for a in accts) - sum(a.credits_posted for a in accts),
            sum(a.debits_pending for a in accts) - sum(a.credits_pending for a in accts),
        )

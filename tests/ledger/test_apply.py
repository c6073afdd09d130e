"""Unit tests of the pure ledger rules: ``ledger.apply.apply_transfers`` and
``ledger.account.create_accounts``.

A catalogue of small cases drives one assertion per transfer status the pure rules can produce
(every status except the campus layer's ``daily_limit_exceeded`` and ``card_not_active``);
further tests pin balances, hold lifecycles, linked chains, flags and timestamps exactly.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple
from uuid import UUID

import pytest
from msgspec.structs import replace

from ledger.account import Account, AccountState, create_accounts
from ledger.apply import BatchOutcome, apply_transfers, timestamps_needed
from ledger.status import AccountStatus, TransferStatus
from ledger.transfer import Hold, StoredTransfer, Transfer
from ledger.types import (
    INT64_MAX,
    NIL_UUID,
    AccountFlag,
    AccountFlags,
    AccountKind,
    TransferFlag,
    TransferState,
)

S = TransferStatus
F = TransferFlag
L = 7  # the ledger of every case
L2 = 8  # another campus
NS = 1_000_000_000
T0 = 1_700_000_000 * NS

# Account ids of the standard world.
BANK, PURSE, SHOP, FROZEN, CLOSED, CAPPED = 1, 2, 3, 4, 5, 6
FOREIGN, FOREIGN2, HUGE_D, HUGE_C, WATER = 9, 10, 11, 12, 13
CAMPUS_ONLY = frozenset({S.DAILY_LIMIT_EXCEEDED, S.CARD_NOT_ACTIVE})
DMNEC = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
CMNED = AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS


def _acct(
    aid: int, kind: AccountKind, flags: int = 0, *, ledger: int = L, dp: int = 0, cp: int = 0
) -> AccountState:
    return AccountState(
        id=aid,
        ledger=ledger,
        kind=kind,
        code=1,
        flags=flags,
        debits_posted=dp,
        credits_posted=cp,
    )


class Snapshot(NamedTuple):
    """Account fields, stored transfers and hold lifecycles at one instant."""

    balances: dict[int, tuple[int, int, int, int]]
    transfers: dict[UUID, StoredTransfer]
    holds: dict[UUID, tuple[TransferState, int, int]]


@dataclass
class World:
    """Stored state handed to ``apply_transfers`` batch after batch, and a clock."""

    accounts: dict[int, AccountState] = field(default_factory=dict)
    transfers: dict[UUID, StoredTransfer] = field(default_factory=dict)
    holds: dict[UUID, Hold] = field(default_factory=dict)
    now: int = T0

    def run(
        self,
        batch: Sequence[Transfer],
        *,
        at: int | None = None,
        request_ends: Sequence[int] = (),
    ) -> BatchOutcome:
        """Apply one batch at ``at`` (default: just after the previous batch)."""
        first = self.now if at is None else at
        out = apply_transfers(
            batch,
            accounts=self.accounts,
            transfers=self.transfers,
            holds=self.holds,
            first_timestamp=first,
            request_ends=request_ends,
        )
        self.now = first + timestamps_needed(len(batch))
        return out

    def fields(self, aid: int) -> tuple[int, int, int, int]:
        """(debits_posted, credits_posted, debits_pending, credits_pending)."""
        a = self.accounts[aid]
        return (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending)

    def snapshot(self) -> Snapshot:
        """Everything observable, for exact before/after comparison."""
        return Snapshot(
            {aid: self.fields(aid) for aid in self.accounts},
            dict(self.transfers),
            {h.id: (h.state, h.resolved_at, h.amount) for h in self.holds.values()},
        )

    def zero_sum(self, ledger: int = L) -> tuple[int, int]:
        """Per ledger: sum of debits minus sum of credits, posted and pending."""
        accts = [a for a in self.accounts.values() if a.ledger == ledger]
        return (
            sum(a.debits_posted for a in accts) - sum(a.credits_posted for a in accts),
            sum(a.debits_pending for a in accts) - sum(a.credits_pending for a in accts),
        )


def world() -> World:
    """Bank, a purse holding 1000 fen, a shop, and accounts with each interesting flag."""
    w = World()
    for a in (
        _acct(BANK, AccountKind.CLEARING),
        _acct(PURSE, AccountKind.PURSE, DMNEC),
        _acct(SHOP, AccountKind.MERCHANT),
        _acct(FROZEN, AccountKind.PURSE, DMNEC | AccountFlags.FROZEN),
        _acct(CLOSED, AccountKind.MERCHANT, AccountFlags.CLOSED),
        _acct(CAPPED, AccountKind.SUSPENSE, CMNED),
        _acct(FOREIGN, AccountKind.MERCHANT, ledger=L2),
        _acct(FOREIGN2, AccountKind.CLEARING, ledger=L2),
        # near the top of BIGINT, balanced against each other
        _acct(HUGE_D, AccountKind.CLEARING, dp=INT64_MAX - 10),
        _acct(HUGE_C, AccountKind.MERCHANT, cp=INT64_MAX - 10),
        _acct(WATER, AccountKind.UTILITY),
    ):
        w.accounts[a.id] = a
    out = w.run([xfer(BANK, PURSE, 1000, code=4)])
    assert out.statuses == [S.CREATED]
    return w


def xfer(
    debit: int = 0,
    credit: int = 0,
    amount: int = 0,
    *,
    id: UUID | None = None,
    ledger: int = L,
    code: int = 1,
    flags: tuple[TransferFlag, ...] = (),
    pending_id: UUID | None = None,
    timeout_s: int | None = None,
    user_data: str | None = None,
) -> Transfer:
    """A transfer with a fresh id unless one is given."""
    return Transfer(
        id=uuid.uuid4() if id is None else id,
        ledger=ledger,
        debit_account_id=debit,
        credit_account_id=credit,
        amount=amount,
        code=code,
        flags=flags,
        pending_id=pending_id,
        timeout_s=timeout_s,
        user_data=user_data,
    )


def hold(amount: int = 300, *, timeout_s: int | None = None, code: int = 2) -> Transfer:
    """A hold on the purse for the water utility."""
    return xfer(PURSE, WATER, amount, code=code, flags=(F.PENDING,), timeout_s=timeout_s)


def _resolve(
    h: Transfer,
    flag: TransferFlag,
    amount: int,
    *,
    id: UUID | None,
    debit: int,
    credit: int,
    ledger: int,
    code: int,
    linked: bool,
    timeout_s: int | None,
    user_data: str | None,
) -> Transfer:
    return xfer(
        debit,
        credit,
        amount,
        id=id,
        ledger=ledger,
        code=code,
        flags=(flag, F.LINKED) if linked else (flag,),
        pending_id=h.id,
        timeout_s=timeout_s,
        user_data=user_data,
    )


def post(
    h: Transfer,
    amount: int = 0,
    *,
    id: UUID | None = None,
    debit: int = 0,
    credit: int = 0,
    ledger: int = L,
    code: int = 0,
    linked: bool = False,
    timeout_s: int | None = None,
    user_data: str | None = None,
) -> Transfer:
    """Settle hold ``h`` (amount 0 = all of it); zero accounts and code mean "as the hold"."""
    return _resolve(h, F.POST_PENDING, amount, id=id, debit=debit, credit=credit,
                    ledger=ledger, code=code, linked=linked, timeout_s=timeout_s,
                    user_data=user_data)


def void(
    h: Transfer,
    amount: int = 0,
    *,
    id: UUID | None = None,
    debit: int = 0,
    credit: int = 0,
    ledger: int = L,
    code: int = 0,
    linked: bool = False,
    timeout_s: int | None = None,
    user_data: str | None = None,
) -> Transfer:
    """Release hold ``h``."""
    return _resolve(h, F.VOID_PENDING, amount, id=id, debit=debit, credit=credit,
                    ledger=ledger, code=code, linked=linked, timeout_s=timeout_s,
                    user_data=user_data)


# -- the catalogue: one case per status ------------------------------------------------------


@dataclass
class Case:
    """Setup batches (each must fully succeed), then one batch and its expected statuses."""

    name: str
    build: Callable[[], tuple[list[list[Transfer]], list[Transfer]]]
    expected: list[TransferStatus]
    request_ends: tuple[int, ...] = ()
    advance_ns: int = 0  # the batch runs this long after the setup


def _changed(**changes: object) -> Callable[[], tuple[list[list[Transfer]], list[Transfer]]]:
    """An original plain transfer, then the same id with some fields changed."""

    def build() -> tuple[list[list[Transfer]], list[Transfer]]:
        base = xfer(PURSE, SHOP, 100, user_data="u1")
        return [[base]], [replace(base, **changes)]

    return build


def _resolve_case(
    make: Callable[[Transfer], list[Transfer]], *, setup_more: Callable[[Transfer], list[Transfer]]
    | None = None, pending: Callable[[], Transfer] = hold,
) -> Callable[[], tuple[list[list[Transfer]], list[Transfer]]]:
    def build() -> tuple[list[list[Transfer]], list[Transfer]]:
        h = pending()
        setup = [[h]]
        if setup_more is not None:
            setup.append(setup_more(h))
        return setup, make(h)

    return build


def _same_id_post(h: Transfer) -> list[Transfer]:
    return [post(h)]


_FIXED = uuid.uuid4()


CASES: list[Case] = [
    Case("created", lambda: ([], [xfer(PURSE, SHOP, 1000)]), [S.CREATED]),
    Case(
        "exists",
        lambda: (lambda t: ([[t]], [t]))(xfer(PURSE, SHOP, 100, user_data="x")),
        [S.EXISTS],
    ),
    Case("exists_amount", _changed(amount=101), [S.EXISTS_WITH_DIFFERENT_AMOUNT]),
    Case("exists_debit", _changed(debit_account_id=BANK),
         [S.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID]),
    Case("exists_credit", _changed(credit_account_id=WATER),
         [S.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID]),
    Case("exists_flags", _changed(flags=(F.FORCE,)), [S.EXISTS_WITH_DIFFERENT_FLAGS]),
    Case("exists_pending_id", _changed(pending_id=_FIXED), [S.EXISTS_WITH_DIFFERENT_PENDING_ID]),
    Case("exists_code", _changed(code=6), [S.EXISTS_WITH_DIFFERENT_CODE]),
    Case("exists_ledger", _changed(ledger=L2), [S.EXISTS_WITH_DIFFERENT_LEDGER]),
    Case("exists_user_data", _changed(user_data="u2"), [S.EXISTS_WITH_DIFFERENT_USER_DATA]),
    Case("exists_user_data_none", _changed(user_data=None), [S.EXISTS_WITH_DIFFERENT_USER_DATA]),
    Case(
        "exists_timeout",
        lambda: (lambda h: ([[h]], [replace(h, timeout_s=20)]))(hold(timeout_s=10)),
        [S.EXISTS_WITH_DIFFERENT_TIMEOUT],
    ),
    Case("id_zero", lambda: ([], [xfer(PURSE, SHOP, 1, id=NIL_UUID)]), [S.ID_MUST_NOT_BE_ZERO]),
    Case("amount_zero", lambda: ([], [xfer(PURSE, SHOP, 0)]), [S.AMOUNT_MUST_BE_POSITIVE]),
    Case("amount_negative", lambda: ([], [xfer(PURSE, SHOP, -5)]), [S.AMOUNT_MUST_BE_POSITIVE]),
    Case("same_accounts", lambda: ([], [xfer(SHOP, SHOP, 5)]), [S.ACCOUNTS_MUST_BE_DIFFERENT]),
    Case("debit_missing", lambda: ([], [xfer(999, SHOP, 5)]), [S.DEBIT_ACCOUNT_NOT_FOUND]),
    Case("debit_zero", lambda: ([], [xfer(0, SHOP, 5)]), [S.DEBIT_ACCOUNT_NOT_FOUND]),
    Case("credit_missing", lambda: ([], [xfer(SHOP, 999, 5)]), [S.CREDIT_ACCOUNT_NOT_FOUND]),
    Case("other_ledger_account", lambda: ([], [xfer(PURSE, FOREIGN, 5)]),
         [S.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER]),
    Case("other_ledger_transfer", lambda: ([], [xfer(PURSE, SHOP, 5, ledger=L2)]),
         [S.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER]),
    Case("exceeds_credits", lambda: ([], [xfer(PURSE, SHOP, 1001)]), [S.EXCEEDS_CREDITS]),
    Case("exceeds_debits", lambda: ([], [xfer(BANK, CAPPED, 1)]), [S.EXCEEDS_DEBITS]),
    Case("frozen", lambda: ([], [xfer(FROZEN, SHOP, 1, flags=(F.FORCE,))]),
         [S.DEBIT_ACCOUNT_FROZEN]),
    Case("closed_credit", lambda: ([], [xfer(PURSE, CLOSED, 1)]), [S.ACCOUNT_CLOSED]),
    Case("closed_debit", lambda: ([], [xfer(CLOSED, SHOP, 1)]), [S.ACCOUNT_CLOSED]),
    Case(
        "linked_failed",
        lambda: ([], [xfer(PURSE, SHOP, 600, flags=(F.LINKED,)), xfer(PURSE, SHOP, 600)]),
        [S.LINKED_EVENT_FAILED, S.EXCEEDS_CREDITS],
    ),
    Case(
        "chain_open",
        lambda: ([], [xfer(PURSE, SHOP, 1, flags=(F.LINKED,)),
                      xfer(PURSE, SHOP, 1, flags=(F.LINKED,))]),
        [S.LINKED_EVENT_FAILED, S.LINKED_EVENT_CHAIN_OPEN],
    ),
    Case(
        "mutually_exclusive",
        lambda: ([], [xfer(PURSE, SHOP, 1, flags=(F.PENDING, F.VOID_PENDING))]),
        [S.FLAGS_ARE_MUTUALLY_EXCLUSIVE],
    ),
    Case("pending_not_found", lambda: ([], [post(xfer())]), [S.PENDING_TRANSFER_NOT_FOUND]),
    Case(
        "pending_not_pending",
        lambda: (lambda t: ([[t]], [post(t)]))(xfer(PURSE, SHOP, 5)),
        [S.PENDING_TRANSFER_NOT_PENDING],
    ),
    Case(
        "already_posted",
        _resolve_case(lambda h: [void(h)], setup_more=_same_id_post),
        [S.PENDING_TRANSFER_ALREADY_POSTED],
    ),
    Case(
        "already_voided",
        _resolve_case(lambda h: [post(h)], setup_more=lambda h: [void(h)]),
        [S.PENDING_TRANSFER_ALREADY_VOIDED],
    ),
    Case(
        "expired",
        _resolve_case(lambda h: [void(h)], pending=lambda: hold(timeout_s=1)),
        [S.PENDING_TRANSFER_EXPIRED],
        advance_ns=NS,
    ),
    Case(
        "exceeds_pending_amount",
        _resolve_case(lambda h: [post(h, 301)]),
        [S.EXCEEDS_PENDING_TRANSFER_AMOUNT],
    ),
    Case("code_zero", lambda: ([], [xfer(PURSE, SHOP, 1, code=0)]), [S.CODE_MUST_NOT_BE_ZERO]),
    Case(
        "pending_id_on_plain",
        lambda: ([], [xfer(PURSE, SHOP, 1, pending_id=_FIXED)]),
        [S.PENDING_ID_MUST_BE_ZERO],
    ),
    Case(
        "timeout_on_plain",
        lambda: ([], [xfer(PURSE, SHOP, 1, timeout_s=5)]),
        [S.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER],
    ),
    Case(
        "timeout_on_post",
        _resolve_case(lambda h: [post(h, timeout_s=5)]),
        [S.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER],
    ),
    Case(
        "pending_different_debit",
        _resolve_case(lambda h: [post(h, debit=BANK)]),
        [S.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID],
    ),
    Case(
        "pending_different_credit",
        _resolve_case(lambda h: [post(h, credit=SHOP)]),
        [S.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID],
    ),
    Case(
        "pending_different_ledger",
        _resolve_case(lambda h: [post(h, ledger=L2)]),
        [S.PENDING_TRANSFER_HAS_DIFFERENT_LEDGER],
    ),
    Case(
        "pending_different_code",
        _resolve_case(lambda h: [void(h, code=1)]),
        [S.PENDING_TRANSFER_HAS_DIFFERENT_CODE],
    ),
    Case(
        "partial_void",
        _resolve_case(lambda h: [void(h, 100)]),
        [S.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT],
    ),
    Case(
        "post_negative",
        _resolve_case(lambda h: [post(h, -1)]),
        [S.AMOUNT_MUST_BE_POSITIVE],
    ),
    Case("overflow_debits", lambda: ([], [xfer(HUGE_D, SHOP, 11)]), [S.OVERFLOWS_DEBITS]),
    Case("overflow_credits", lambda: ([], [xfer(BANK, HUGE_C, 11)]), [S.OVERFLOWS_CREDITS]),
    Case(
        "overflow_debits_pending",
        lambda: ([[xfer(HUGE_D, SHOP, 6, flags=(F.PENDING,))]],
                 [xfer(HUGE_D, SHOP, 5, flags=(F.PENDING,))]),
        [S.OVERFLOWS_DEBITS],
    ),
    Case("fits_exactly", lambda: ([], [xfer(HUGE_D, HUGE_C, 10)]), [S.CREATED]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_catalogue(case: Case) -> None:
    w = world()
    setup, batch = case.build()
    for b in setup:
        assert all(s.ok for s in w.run(b).statuses), case.name
    if case.advance_ns:
        w.run([], at=w.now + case.advance_ns)  # let expiry happen on its own first
    before = w.snapshot()
    out = w.run(batch, at=w.now + case.advance_ns, request_ends=case.request_ends)
    assert out.statuses == case.expected
    assert not set(out.statuses) & CAMPUS_ONLY
    if not any(s is S.CREATED for s in out.statuses):
        assert w.snapshot() == before, "a refused batch changes nothing"
        assert out.created == []
    assert w.zero_sum() == (0, 0)


def test_catalogue_covers_every_pure_status() -> None:
    produced = {s for c in CASES for s in c.expected}
    assert produced == set(TransferStatus) - CAMPUS_ONLY
    assert not produced & CAMPUS_ONLY


def test_expired_status() -> None:
    w = world()
    h = hold(timeout_s=1)
    t_hold = w.run([h]).timestamps[0]
    out = w.run([post(h)], at=t_hold + NS)
    assert out.statuses == [S.PENDING_TRANSFER_EXPIRED]
    assert [x.id for x in out.expired] == [h.id]


# -- balances, holds and chains in detail ----------------------------------------------------


def test_plain_transfer_moves_posted_fields_only() -> None:
    w = world()
    out = w.run([xfer(PURSE, SHOP, 250)])
    assert out.statuses == [S.CREATED]
    assert w.fields(PURSE) == (250, 1000, 0, 0)
    assert w.fields(SHOP) == (0, 250, 0, 0)
    assert w.accounts[PURSE].balance == 750
    assert w.accounts[BANK].balance == 1000  # debit-normal: debits - credits
    assert out.touched_accounts == [PURSE, SHOP]


def test_exact_balance_can_be_spent_and_no_more() -> None:
    w = world()
    assert w.run([xfer(PURSE, SHOP, 1000)]).statuses == [S.CREATED]
    assert w.run([xfer(PURSE, SHOP, 1)]).statuses == [S.EXCEEDS_CREDITS]
    assert w.accounts[PURSE].balance == 0


def test_force_posts_past_overdraft_but_not_past_frozen() -> None:
    w = world()
    out = w.run([xfer(PURSE, SHOP, 1500, flags=(F.FORCE,))])
    assert out.statuses == [S.CREATED]
    assert w.accounts[PURSE].balance == -500
    assert w.accounts[PURSE].available == -500
    # still overdrawn: a normal spend is refused, a top-up is fine
    assert w.run([xfer(PURSE, SHOP, 1)]).statuses == [S.EXCEEDS_CREDITS]
    assert w.run([xfer(BANK, PURSE, 600, code=4)]).statuses == [S.CREATED]
    assert w.accounts[PURSE].balance == 100
    # force also passes credits_must_not_exceed_debits
    assert w.run([xfer(BANK, CAPPED, 5, flags=(F.FORCE,))]).statuses == [S.CREATED]
    assert w.zero_sum() == (0, 0)


def test_forced_hold_reserves_past_overdraft() -> None:
    w = world()
    h = xfer(PURSE, WATER, 1200, code=2, flags=(F.PENDING, F.FORCE))
    assert w.run([h]).statuses == [S.CREATED]
    assert w.accounts[PURSE].available == -200
    assert w.run([post(h)]).statuses == [S.CREATED]
    assert w.fields(PURSE) == (1200, 1000, 0, 0)


def test_frozen_refuses_debits_only() -> None:
    w = world()
    assert w.run([xfer(BANK, FROZEN, 70, code=4)]).statuses == [S.CREATED]
    assert w.fields(FROZEN) == (0, 70, 0, 0)
    assert w.run([xfer(FROZEN, SHOP, 1)]).statuses == [S.DEBIT_ACCOUNT_FROZEN]


def test_hold_then_freeze_post_and_void_still_allowed() -> None:
    w = world()
    h1, h2 = hold(300), hold(200)
    assert w.run([h1, h2]).statuses == [S.CREATED, S.CREATED]
    w.accounts[PURSE].flags |= AccountFlags.FROZEN  # the card was reported lost
    assert w.run([xfer(PURSE, SHOP, 1)]).statuses == [S.DEBIT_ACCOUNT_FROZEN]
    assert w.run([post(h1, 120)]).statuses == [S.CREATED]  # service already delivered
    assert w.run([void(h2)]).statuses == [S.CREATED]
    assert w.fields(PURSE) == (120, 1000, 0, 0)
    assert w.fields(WATER) == (0, 120, 0, 0)


def test_closed_account_void_allowed_post_refused() -> None:
    w = world()
    h1, h2 = hold(300), hold(200)
    w.run([h1, h2])
    w.accounts[WATER].flags |= AccountFlags.CLOSED
    assert w.run([post(h1)]).statuses == [S.ACCOUNT_CLOSED]
    assert w.run([void(h2)]).statuses == [S.CREATED]
    assert w.fields(PURSE) == (0, 1000, 300, 0)
    assert w.fields(WATER) == (0, 0, 0, 300)
    assert w.holds[h1.id].state is TransferState.PENDING
    assert w.holds[h2.id].state is TransferState.VOIDED


def test_hold_reserves_available_and_partial_post_releases_rest() -> None:
    w = world()
    h = hold(400, timeout_s=600)
    out = w.run([h])
    assert out.statuses == [S.CREATED]
    assert w.fields(PURSE) == (0, 1000, 400, 0)
    assert w.fields(WATER) == (0, 0, 0, 400)
    assert (w.accounts[PURSE].balance, w.accounts[PURSE].available) == (1000, 600)
    assert w.run([xfer(PURSE, SHOP, 601)]).statuses == [S.EXCEEDS_CREDITS]
    p = post(h, 150, user_data="meter 12")
    out = w.run([p])
    assert out.statuses == [S.CREATED]
    assert w.fields(PURSE) == (150, 1000, 0, 0)
    assert w.fields(WATER) == (0, 150, 0, 0)
    hd = w.holds[h.id]
    assert (hd.state, hd.resolved_at) == (TransferState.SETTLED, out.timestamps[0])
    st = w.transfers[p.id]
    # the stored post carries the effective accounts, code and amount
    assert (st.debit_account_id, st.credit_account_id, st.amount, st.code, st.pending_id) == (
        PURSE,
        WATER,
        150,
        2,
        h.id,
    )
    assert out.holds_changed == [hd]
    assert w.run([post(h)]).statuses == [S.PENDING_TRANSFER_ALREADY_POSTED]
    assert w.zero_sum() == (0, 0)


def test_full_post_with_explicit_fields() -> None:
    w = world()
    h = hold(400)
    w.run([h])
    p = xfer(PURSE, WATER, 400, code=2, flags=(F.POST_PENDING,), pending_id=h.id)
    assert w.run([p]).statuses == [S.CREATED]
    assert w.fields(PURSE) == (400, 1000, 0, 0)
    # re-submitting with zeros (= "as the hold") is the same transfer
    assert w.run([post(h, id=p.id)]).statuses == [S.EXISTS]
    assert w.run([post(h, 399, id=p.id)]).statuses == [S.EXISTS_WITH_DIFFERENT_AMOUNT]


def test_partial_post_resubmitted_with_zero_amount_differs() -> None:
    w = world()
    h = hold(400)
    w.run([h])
    p = post(h, 100)
    w.run([p])
    assert w.run([post(h, 0, id=p.id)]).statuses == [S.EXISTS_WITH_DIFFERENT_AMOUNT]
    assert w.run([post(h, 100, id=p.id, debit=PURSE, credit=WATER, code=2)]).statuses == [
        S.EXISTS
    ]


def test_void_releases_everything() -> None:
    w = world()
    h = hold(400)
    w.run([h])
    v = void(h)
    out = w.run([v])
    assert out.statuses == [S.CREATED]
    assert w.fields(PURSE) == (0, 1000, 0, 0)
    assert w.fields(WATER) == (0, 0, 0, 0)
    assert w.holds[h.id].state is TransferState.VOIDED
    assert w.transfers[v.id].amount == 400  # the amount released
    assert w.run([void(h, 400, id=v.id)]).statuses == [S.EXISTS]
    assert w.run([post(h)]).statuses == [S.PENDING_TRANSFER_ALREADY_VOIDED]
    assert w.run([void(h, 400)]).statuses == [S.PENDING_TRANSFER_ALREADY_VOIDED]


def test_expiry_happens_at_the_batch_timestamp_before_events() -> None:
    w = world()
    h = hold(400, timeout_s=2)
    ts = w.run([h]).timestamps[0]
    deadline = ts + 2 * NS
    assert w.holds[h.id].expires_at == deadline
    # one ns before the deadline the hold is alive and can be settled by a later batch
    still = w.run([], at=deadline - 1)
    assert still.expired == [] and still.statuses == []
    assert w.fields(PURSE) == (0, 1000, 400, 0)
    # a batch at the deadline expires it first; its own events then see it expired
    spend = xfer(PURSE, SHOP, 1000)
    out = w.run([spend, post(h)], at=deadline)
    assert out.statuses == [S.CREATED, S.PENDING_TRANSFER_EXPIRED]
    assert [x.id for x in out.expired] == [h.id]
    hd = w.holds[h.id]
    assert (hd.state, hd.resolved_at) == (TransferState.EXPIRED, deadline)
    assert w.fields(PURSE) == (1000, 1000, 0, 0)
    assert w.fields(WATER) == (0, 0, 0, 0)
    assert w.run([void(h)]).statuses == [S.PENDING_TRANSFER_EXPIRED]
    # expiry records no transfer: the top-up, the hold and the spend
    assert len(w.transfers) == 3 and h.id in w.transfers and spend.id in w.transfers


def test_hold_without_timeout_never_expires() -> None:
    w = world()
    h = hold(400, timeout_s=0)
    w.run([h])
    out = w.run([post(h)], at=T0 + 10**6 * NS)
    assert out.statuses == [S.CREATED] and out.expired == []


def test_linked_chain_commits_together() -> None:
    w = world()
    chain = [
        xfer(PURSE, SHOP, 300, flags=(F.LINKED,)),
        xfer(SHOP, BANK, 100, flags=(F.LINKED,)),
        xfer(PURSE, WATER, 200),
    ]
    out = w.run(chain)
    assert out.statuses == [S.CREATED] * 3
    assert w.fields(PURSE) == (500, 1000, 0, 0)
    assert w.fields(SHOP) == (100, 300, 0, 0)
    # re-submitting the whole chain: exists counts as success inside a chain
    again = w.run(chain)
    assert again.statuses == [S.EXISTS] * 3
    assert again.timestamps == out.timestamps
    assert w.fields(PURSE) == (500, 1000, 0, 0)


def test_linked_chain_rollback_restores_everything_exactly() -> None:
    w = world()
    old = hold(100)
    w.run([old])
    before = w.snapshot()
    new_hold = hold(50)
    dup = xfer(PURSE, SHOP, 10)
    chain = [
        xfer(PURSE, SHOP, 300, flags=(F.LINKED,)),
        replace(new_hold, flags=(F.PENDING, F.LINKED)),
        post(old, 60, linked=True),
        replace(dup, flags=(F.LINKED,)),
        xfer(BANK, PURSE, 5, code=4, flags=(F.LINKED,)),
        xfer(PURSE, SHOP, 10_000),  # fails: exceeds_credits
        xfer(PURSE, SHOP, 1),  # after the chain: evaluated on its own
    ]
    out = w.run(chain)
    assert out.statuses == [S.LINKED_EVENT_FAILED] * 5 + [S.EXCEEDS_CREDITS, S.CREATED]
    assert out.timestamps == [0] * 6 + [w.now - 1]
    after = w.snapshot()
    # only the last, unlinked transfer changed anything
    bal_before, tr_before, holds_before = before
    bal_after, tr_after, holds_after = after
    assert holds_after == holds_before
    assert set(tr_after) - set(tr_before) == {chain[-1].id}
    assert bal_after[PURSE] == (bal_before[PURSE][0] + 1, *bal_before[PURSE][1:])
    assert bal_after[SHOP] == (0, bal_before[SHOP][1] + 1, 0, 0)
    for aid in (BANK, WATER):
        assert bal_after[aid] == bal_before[aid]
    assert [t.id for t in out.created] == [chain[-1].id]
    # nothing of the chain is stored: the same ids can be used again
    assert w.run([replace(chain[0], flags=())]).statuses == [S.CREATED]
    assert w.holds[old.id].state is TransferState.PENDING


def test_chain_with_duplicate_inside_then_failure_rolls_back_both() -> None:
    w = world()
    t = xfer(PURSE, SHOP, 10, flags=(F.LINKED,))
    out = w.run([t, t, xfer(PURSE, SHOP, 0)])
    assert out.statuses == [S.LINKED_EVENT_FAILED, S.LINKED_EVENT_FAILED,
                            S.AMOUNT_MUST_BE_POSITIVE]
    assert t.id not in w.transfers
    out = w.run([t, t, xfer(PURSE, SHOP, 1)])
    assert out.statuses == [S.CREATED, S.EXISTS, S.CREATED]
    assert out.timestamps[0] == out.timestamps[1]


def test_chain_open_evaluates_nothing() -> None:
    w = world()
    before = w.snapshot()
    chain = [
        xfer(PURSE, SHOP, 5, flags=(F.LINKED,)),
        xfer(0, 0, 0, id=NIL_UUID, flags=(F.LINKED,)),  # would fail if it were evaluated
        xfer(PURSE, SHOP, 5, flags=(F.LINKED,)),
    ]
    out = w.run(chain)
    assert out.statuses == [S.LINKED_EVENT_FAILED, S.LINKED_EVENT_FAILED,
                            S.LINKED_EVENT_CHAIN_OPEN]
    assert out.timestamps == [0, 0, 0]
    assert w.snapshot() == before


def test_request_ends_close_chains_per_request() -> None:
    w = world()
    a = xfer(PURSE, SHOP, 5, flags=(F.LINKED,))
    b = xfer(PURSE, SHOP, 6)
    c = xfer(PURSE, SHOP, 7, flags=(F.LINKED,))
    d = xfer(PURSE, SHOP, 8)
    # requests [a] [b, c] [d]: a's chain is open at its request end, c's too
    out = w.run([a, b, c, d], request_ends=[1, 3])
    assert out.statuses == [S.LINKED_EVENT_CHAIN_OPEN, S.CREATED, S.LINKED_EVENT_CHAIN_OPEN,
                            S.CREATED]
    assert w.fields(PURSE) == (14, 1000, 0, 0)
    # the same four as one request: a+b and c+d are chains
    out = w.run([a, replace(b, id=uuid.uuid4()), c, d])
    assert out.statuses == [S.CREATED, S.CREATED, S.CREATED, S.EXISTS]


def test_timestamps() -> None:
    w = world()
    first = T0 + 50 * NS
    ok1 = xfer(PURSE, SHOP, 1)
    bad = xfer(PURSE, SHOP, 0)
    ok2 = xfer(PURSE, SHOP, 2)
    out = w.run([ok1, bad, ok2, ok1], at=first)
    assert out.statuses == [S.CREATED, S.AMOUNT_MUST_BE_POSITIVE, S.CREATED, S.EXISTS]
    assert out.timestamps == [first + 1, 0, first + 3, first + 1]
    assert [t.timestamp for t in out.created] == [first + 1, first + 3]
    assert timestamps_needed(4) == 5
    later = w.run([ok2, ok1], at=first + NS)
    assert later.statuses == [S.EXISTS, S.EXISTS]
    assert later.timestamps == [first + 3, first + 1]
    assert later.created == []


def test_checks_run_in_documented_order() -> None:
    w = world()
    # several faults at once: the documented first one answers
    cases = [
        (xfer(999, 999, 0, code=0, timeout_s=3, pending_id=_FIXED), S.AMOUNT_MUST_BE_POSITIVE),
        (xfer(999, 999, 5, code=0, timeout_s=3, pending_id=_FIXED), S.PENDING_ID_MUST_BE_ZERO),
        (xfer(999, 999, 5, code=0, timeout_s=3), S.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER),
        (xfer(999, 999, 5, code=0), S.ACCOUNTS_MUST_BE_DIFFERENT),
        (xfer(999, 998, 5, code=0), S.CODE_MUST_NOT_BE_ZERO),
        (xfer(999, 998, 5), S.DEBIT_ACCOUNT_NOT_FOUND),
        (xfer(FROZEN, CLOSED, 5, ledger=L2), S.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER),
        (xfer(FROZEN, CLOSED, 5), S.ACCOUNT_CLOSED),
        (xfer(FROZEN, HUGE_C, 50), S.DEBIT_ACCOUNT_FROZEN),
        (xfer(PURSE, HUGE_C, 5000), S.OVERFLOWS_CREDITS),
        (xfer(PURSE, CAPPED, 5000), S.EXCEEDS_CREDITS),
        (xfer(id=NIL_UUID, flags=(F.PENDING, F.POST_PENDING)), S.ID_MUST_NOT_BE_ZERO),
    ]
    for t, expected in cases:
        assert w.run([t]).statuses == [expected], t
    h = hold(300)
    w.run([h])
    w.run([post(h)])
    resolve_cases = [
        (post(h, 999, debit=BANK, credit=SHOP, ledger=L2, code=9, timeout_s=1),
         S.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID),
        (post(h, 999, credit=SHOP, ledger=L2, code=9, timeout_s=1),
         S.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID),
        (post(h, 999, ledger=L2, code=9, timeout_s=1), S.PENDING_TRANSFER_HAS_DIFFERENT_LEDGER),
        (post(h, 999, code=9, timeout_s=1), S.PENDING_TRANSFER_HAS_DIFFERENT_CODE),
        (post(h, 999, timeout_s=1), S.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER),
        (post(h, 999), S.PENDING_TRANSFER_ALREADY_POSTED),
    ]
    for t, expected in resolve_cases:
        assert w.run([t]).statuses == [expected], t
    h2 = hold(300)
    w.run([h2])
    assert w.run([post(h2, 301)]).statuses == [S.EXCEEDS_PENDING_TRANSFER_AMOUNT]
    assert w.run([void(h2, -1)]).statuses == [S.AMOUNT_MUST_BE_POSITIVE]
    assert w.run([void(h2, 301)]).statuses == [S.EXCEEDS_PENDING_TRANSFER_AMOUNT]
    # idempotency is checked before the transfer's own validity
    first = xfer(PURSE, SHOP, 5)
    w.run([first])
    w.accounts[SHOP].flags |= AccountFlags.CLOSED
    assert w.run([first]).statuses == [S.EXISTS]
    changed = replace(first, flags=(F.PENDING,), amount=6)
    assert w.run([changed]).statuses == [S.EXISTS_WITH_DIFFERENT_FLAGS]


def test_no_campus_statuses_from_pure_rules() -> None:
    # daily limits and card states live in the campus layer; apply never answers them
    w = world()
    h = hold(100)
    batch = [
        xfer(PURSE, SHOP, 10**6),
        xfer(FROZEN, SHOP, 1),
        h,
        post(h),
        post(h),
        xfer(PURSE, SHOP, 1, flags=(F.LINKED,)),
    ]
    out = w.run(batch)
    assert not set(out.statuses) & CAMPUS_ONLY
    assert out.statuses[-1] is S.LINKED_EVENT_CHAIN_OPEN


# -- accounts ----------------------------------------------------------------------------------


def _account(aid: int, **kw: object) -> Account:
    base: dict[str, object] = {"id": aid, "ledger": L, "kind": AccountKind.PURSE, "code": 1}
    base.update(kw)
    return Account(**base)  # type: ignore[arg-type]


def test_create_accounts_every_status() -> None:
    existing: dict[int, AccountState] = {}
    purse = _account(
        100, flags=(AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,), holder_id="s1", name="Li"
    )
    batch = [
        purse,
        _account(100, flags=(AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,), holder_id="other"),
        _account(100, kind=AccountKind.SUBSIDY,
                 flags=(AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,)),
        _account(100, ledger=L2, kind=AccountKind.SUBSIDY),
        _account(100, code=2, flags=(AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,)),
        _account(100),
        _account(0),
        _account(101, ledger=0),
        _account(102, flags=(AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,
                             AccountFlag.CREDITS_MUST_NOT_EXCEED_DEBITS)),
        _account(103, kind=AccountKind.CLEARING, flags=(AccountFlag.FROZEN, AccountFlag.CLOSED)),
    ]
    statuses, created = create_accounts(batch, existing)
    assert statuses == [
        AccountStatus.CREATED,
        AccountStatus.EXISTS,  # holder_id and name are metadata
        AccountStatus.EXISTS_WITH_DIFFERENT_KIND,
        AccountStatus.EXISTS_WITH_DIFFERENT_LEDGER,
        AccountStatus.EXISTS_WITH_DIFFERENT_CODE,
        AccountStatus.EXISTS_WITH_DIFFERENT_FLAGS,
        AccountStatus.ID_MUST_NOT_BE_ZERO,
        AccountStatus.LEDGER_MUST_NOT_BE_ZERO,
        AccountStatus.FLAGS_ARE_MUTUALLY_EXCLUSIVE,
        AccountStatus.CREATED,
    ]
    assert set(statuses) == set(AccountStatus)
    assert [a.id for a in created] == [100, 103]
    assert existing[100].flags == AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
    assert existing[103].flags == AccountFlags.FROZEN | AccountFlags.CLOSED
    assert (existing[100].debits_posted, existing[100].credits_posted) == (0, 0)
    # a second batch sees the stored accounts; flags order and duplicates do not matter
    again, created2 = create_accounts(
        [_account(103, kind=AccountKind.CLEARING,
                  flags=(AccountFlag.CLOSED, AccountFlag.FROZEN, AccountFlag.CLOSED))],
        existing,
    )
    assert again == [AccountStatus.EXISTS] and created2 == []


def test_create_accounts_zero_id_beats_zero_ledger() -> None:
    statuses, created = create_accounts([_account(0, ledger=0)], {})
    assert statuses == [AccountStatus.ID_MUST_NOT_BE_ZERO] and created == []

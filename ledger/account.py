"""Accounts: the wire shape, the live state the engine mutates, and creation rules."""

from __future__ import annotations

from typing import Annotated

import msgspec

from ledger.status import AccountStatus
from ledger.types import (
    TEXT_WITHOUT_NUL,
    AccountFlag,
    AccountFlags,
    AccountId,
    AccountKind,
    Code,
    LedgerId,
    account_flag_bits,
)

HolderId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=TEXT_WITHOUT_NUL)]
AccountName = Annotated[str, msgspec.Meta(max_length=256, pattern=TEXT_WITHOUT_NUL)]


class Account(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An account as created over the API. ``holder_id`` and ``name`` are metadata."""

    id: AccountId
    ledger: LedgerId
    kind: AccountKind
    code: Code = 0
    flags: tuple[AccountFlag, ...] = ()
    holder_id: HolderId | None = None
    name: AccountName | None = None


class AccountState(msgspec.Struct, gc=False):
    """The live state of an account inside one batch; mutated by ``ledger.apply``."""

    id: int
    ledger: int
    kind: AccountKind
    code: int
    flags: int
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0

    @property
    def balance(self) -> int:
        """Posted balance signed by the kind's normal side."""
        if self.kind.credit_normal:
            return self.credits_posted - self.debits_posted
        return self.debits_posted - self.credits_posted

    @property
    def available(self) -> int:
        """Balance less what holds have reserved against it."""
        if self.kind.credit_normal:
            return self.balance - self.debits_pending
        return self.balance - self.credits_pending


def validate_account(a: Account) -> AccountStatus | None:
    """The status an account is refused with on its own merits, or None when it is valid."""
    if a.id == 0:
        return AccountStatus.ID_MUST_NOT_BE_ZERO
    if a.ledger == 0:
        return AccountStatus.LEDGER_MUST_NOT_BE_ZERO
    bits = account_flag_bits(a.flags)
    both = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS
    if bits & both == both:
        return AccountStatus.FLAGS_ARE_MUTUALLY_EXCLUSIVE
    return None


def compare_account(existing: AccountState, a: Account) -> AccountStatus:
    """Idempotency answer for an account id that already exists."""
    if existing.ledger != a.ledger:
        return AccountStatus.EXISTS_WITH_DIFFERENT_LEDGER
    if existing.kind != a.kind:
        return AccountStatus.EXISTS_WITH_DIFFERENT_KIND
    if existing.code != a.code:
        return AccountStatus.EXISTS_WITH_DIFFERENT_CODE
    if existing.flags != account_flag_bits(a.flags):
        return AccountStatus.EXISTS_WITH_DIFFERENT_FLAGS
    return AccountStatus.EXISTS


def create_accounts(
    batch: list[Account], existing: dict[int, AccountState]
) -> tuple[list[AccountStatus], list[AccountState]]:
    """Apply a batch of account creations in order.

    ``existing`` holds every already stored account whose id occurs in the batch; it is
    extended with the new ones so a duplicate later in the same batch answers ``exists``.
    Returns one status per account and the accounts to insert.
    """
    statuses: list[AccountStatus] = []
    created: list[AccountState] = []
    for a in batch:
        status = validate_account(a)
        if status is None:
            prior = existing.get(a.id)
            if prior is not None:
                status = compare_account(prior, a)
            else:
                state = AccountState(
                    id=a.id,
                    ledger=a.ledger,
                    kind=a.kind,
                    code=a.code,
                    flags=account_flag_bits(a.flags),
                )
                existing[a.id] = state
                created.append(state)
                status = AccountStatus.CREATED
        statuses.append(status)
    return statuses, created

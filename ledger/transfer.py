"""Transfers: the wire shape and the stored (timestamped) record."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

import msgspec

from ledger.types import (
    AccountId,
    Amount,
    Code,
    LedgerId,
    TransferFlag,
    TransferState,
)

# Holds longer than a week are a mistake on a campus (a shower, a meal); cap them.
MAX_TIMEOUT_S = 7 * 24 * 3600
USER_DATA_MAX_BYTES = 256

Timeout = Annotated[int, msgspec.Meta(ge=0, le=MAX_TIMEOUT_S)]
UserData = Annotated[str, msgspec.Meta(max_length=USER_DATA_MAX_BYTES)]


class Transfer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A transfer as submitted. For ``post_pending``/``void_pending`` the account ids, code and
    amount may be zero: they are then taken from the pending transfer."""

    id: UUID
    ledger: LedgerId
    debit_account_id: AccountId = 0
    credit_account_id: AccountId = 0
    amount: Amount = 0
    code: Code = 0
    flags: tuple[TransferFlag, ...] = ()
    pending_id: UUID | None = None
    timeout_s: Timeout | None = None
    user_data: UserData | None = None


class StoredTransfer(msgspec.Struct, frozen=True, gc=False):
    """A transfer as recorded: effective accounts, amount and code, flags as bits, timestamp.

    For a ``post_pending`` the amount is what was posted; for a ``void_pending`` it is the
    amount released. Never changed after it is written.
    """

    # In the audit chain's row order (ledger.audit.Row): a row is ``astuple`` of this struct.
    id: UUID
    ledger: int
    debit_account_id: int
    credit_account_id: int
    amount: int
    pending_id: UUID | None
    code: int
    flags: int
    timeout_s: int
    user_data: str | None
    timestamp: int


class Hold(msgspec.Struct, gc=False):
    """The mutable state of a pending transfer (a hold)."""

    id: UUID
    ledger: int
    debit_account_id: int
    credit_account_id: int
    amount: int
    code: int
    expires_at: int  # engine ns timestamp; 0 = never
    created_at: int  # timestamp of the pending transfer
    state: TransferState = TransferState.PENDING
    resolved_at: int = 0  # timestamp of the post/void/expiry that ended it


def user_data_fits(user_data: str | None) -> bool:
    """True when user_data is within the contract's 256-byte bound (bytes, not characters)."""
    return user_data is None or len(user_data.encode()) <= USER_DATA_MAX_BYTES

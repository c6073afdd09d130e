"""Derived ids: a holder's and a room's accounts, the transfers one terminal operation posts,
and the transfer that undoes one. Deriving them makes every creation and every retry
idempotent: the same request names the same rows.
"""

from __future__ import annotations

import hashlib
from typing import Final
from uuid import UUID

from engine.campus.model import FUND_OWNER
from ledger.ids import child
from ledger.types import INT64_MAX, AccountKind


def derived_account_id(ledger: int, owner: str, kind: AccountKind) -> int:
    """The account id of ``owner``'s account of ``kind`` in ``ledger``: a positive int63
    hash, so creating the same holder or room twice names the same accounts."""
    digest = hashlib.sha256(f"onecard/{ledger}/{kind}/{owner}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") & INT64_MAX) or 1


def holder_account_ids(ledger: int, holder_id: str) -> tuple[int, int]:
    """(cash purse id, subsidy purse id) of a holder."""
    return (
        derived_account_id(ledger, holder_id, AccountKind.PURSE),
        derived_account_id(ledger, holder_id, AccountKind.SUBSIDY),
    )


def room_account_id(ledger: int, room_id: str) -> int:
    """The room purse id of a dorm room."""
    return derived_account_id(ledger, room_id, AccountKind.ROOM)


# Part names: the transfers one operation posts, each id = child(key, part): derived, and
# beside the request's key in time order (ledger/ids.py).
SUBSIDY_PART: Final = "subsidy"
CASH_PART: Final = "cash"
ROOM_PART: Final = "room"
ALL_PARTS: Final = (SUBSIDY_PART, CASH_PART, ROOM_PART)


def part_id(key: UUID, part: str) -> UUID:
    """Id of one transfer of the operation ``key`` (deterministic: retries post nothing)."""
    return child(key, part)


def reversal_id(transfer_id: UUID) -> UUID:
    """Id of the transfer that undoes ``transfer_id``: one undo, however many reversals."""
    return child(transfer_id, "reversal")


def fund_account_id(ledger: int) -> int:
    """The ledger's subsidy fund account id (deterministic)."""
    return derived_account_id(ledger, FUND_OWNER, AccountKind.FUND)

"""How the engine reads rows: the column lists its statements select, the decoders of those
rows into ledger objects, and the array literals its id lists travel as (engine/store.py,
engine/writing.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import asyncpg
import msgspec

from ledger.account import AccountState
from ledger.transfer import Hold, StoredTransfer
from ledger.types import AccountKind, TransferState

__all__ = [
    "ACCOUNT_COLS",
    "HOLD_COLS",
    "TRANSFER_COLS",
    "account_of",
    "check_read",
    "hold_of",
    "pg_array",
    "state_of",
    "transfer_of",
]

TRANSFER_COLS = (
    "t.id, t.ledger, t.debit_account_id, t.credit_account_id, t.amount, t.code, t.flags, "
    "t.pending_id, t.timeout_s, t.user_data, t.timestamp"
)
HOLD_COLS = (
    "h.id AS h_id, h.ledger AS h_ledger, h.debit_account_id AS h_debit, "
    "h.credit_account_id AS h_credit, h.amount AS h_amount, h.code AS h_code, "
    "h.expires_at, h.created_at AS h_created, h.state, h.resolved_at"
)
ACCOUNT_COLS = (
    "id, ledger, kind, code, flags, debits_posted, credits_posted, debits_pending, "
    "credits_pending"
)

# Enum construction by value costs a microsecond; a batch reads thousands of accounts.
_KINDS: Final = {k.value: k for k in AccountKind}


def account_of(r: asyncpg.Record) -> AccountState:
    # positional: the record's columns are ACCOUNT_COLS, in AccountState's field order
    return AccountState(r[0], r[1], _KINDS[r[2]], r[3], r[4], r[5], r[6], r[7], r[8])


def transfer_of(r: asyncpg.Record) -> StoredTransfer:
    return StoredTransfer(
        id=r["id"],
        ledger=r["ledger"],
        debit_account_id=r["debit_account_id"],
        credit_account_id=r["credit_account_id"],
        amount=r["amount"],
        code=r["code"],
        flags=r["flags"],
        pending_id=r["pending_id"],
        timeout_s=r["timeout_s"],
        user_data=r["user_data"],
        timestamp=r["timestamp"],
    )


def hold_of(r: asyncpg.Record) -> Hold:
    return Hold(
        id=r["h_id"],
        ledger=r["h_ledger"],
        debit_account_id=r["h_debit"],
        credit_account_id=r["h_credit"],
        amount=r["h_amount"],
        code=r["h_code"],
        expires_at=r["expires_at"],
        created_at=r["h_created"],
        state=TransferState(r["state"]),
        resolved_at=r["resolved_at"],
    )


def state_of(r: asyncpg.Record) -> TransferState:
    s = r["state"]
    return TransferState.POSTED if s is None else TransferState(s)


def check_read(a: AccountState) -> None:
    assert min(a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending) >= 0, a


_json: Final = msgspec.json.Encoder().encode


def pg_array(values: Sequence[object]) -> str:
    """A PostgreSQL array literal of integers, UUIDs and NULLs, e.g. ``{1,"0f..-..",null}``.

    Built in C by msgspec (a JSON array with brackets turned into braces: JSON's numbers,
    quoted UUIDs and ``null`` are all valid array-literal elements) and parsed by the server
    in C. asyncpg's binary array encoder instead makes several Python-level ``isinstance``
    checks per element, which was the largest single cost of a batch on the engine's side.
    Never for free text: JSON string escapes are not array-literal escapes.
    """
    return "{" + _json(values).decode()[1:-1] + "}"

"""Terminals and dorm rooms (contract §2): the campus's places where money is spent.

A terminal credits one merchant or utility account of its ledger and never changes once
registered; its id is unique across ledgers (claimed in engine/campus/unique.py). A room is
an idempotently created ``room`` purse under the room's name.
"""

from __future__ import annotations

import time

from engine.access.secretbox import SecretBox, seal_mac_key
from engine.campus.accounts import room_account_id
from engine.campus.model import (
    ROOM_CODE,
    Refusal,
    Refused,
    RegistryStatus,
    Room,
    Terminal,
    TerminalKind,
)
from engine.campus.secrets import same_terminal, terminal_row
from engine.campus.shared import connection
from engine.campus.unique import claim_terminal, unclaim_terminal
from engine.service import Engine
from ledger.account import Account
from ledger.status import AccountStatus
from ledger.types import AccountFlag, AccountKind

SQL_TERMINAL = """
SELECT terminal_id, merchant_id, ledger, kind, account_id, mac_key, mac_key_enc
FROM terminals WHERE ledger = $1 AND terminal_id = $2
"""

SQL_ACCOUNT_KIND = "SELECT kind FROM accounts WHERE ledger = $1 AND id = $2"
SQL_INSERT_TERMINAL = """
INSERT INTO terminals (ledger, terminal_id, merchant_id, kind, account_id, mac_key_enc,
                       created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""
SQL_INSERT_ROOM = """
INSERT INTO rooms (ledger, room_id, account_id, created_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (ledger, room_id) DO NOTHING
"""


async def register_terminal(
    engine: Engine,
    box: SecretBox,
    *,
    terminal_id: str,
    merchant_id: str,
    ledger: int,
    kind: TerminalKind,
    account_id: int,
    mac_key: bytes,
) -> RegistryStatus | Refused:
    """Register a terminal. It will credit only ``account_id``, which must be a merchant or
    utility account of the same ledger. Terminal ids are unique across ledgers; a
    registered terminal never changes (a different request answers
    ``exists_with_different_fields``)."""
    want = Terminal(terminal_id, merchant_id, ledger, kind, account_id, mac_key)
    async with connection(engine) as conn, conn.transaction():
        owner = await claim_terminal(conn, terminal_id, ledger)
        if owner is not None:
            r = await conn.fetchrow(SQL_TERMINAL, owner, terminal_id)
            assert r is not None, f"terminal {terminal_id} claimed but not there"
            if same_terminal(terminal_row(r, box), want):
                return RegistryStatus.EXISTS
            return RegistryStatus.EXISTS_WITH_DIFFERENT_FIELDS
        account_kind = await conn.fetchval(SQL_ACCOUNT_KIND, ledger, account_id)
        if account_kind not in (AccountKind.MERCHANT, AccountKind.UTILITY):
            await unclaim_terminal(conn, terminal_id, ledger)
        if account_kind is None:
            return Refused(Refusal.ACCOUNT_NOT_FOUND,
                           f"no account {account_id} in ledger {ledger}")
        if account_kind not in (AccountKind.MERCHANT, AccountKind.UTILITY):
            return Refused(Refusal.ACCOUNT_NOT_CREDITABLE,
                           f"account {account_id} is a {account_kind} account; a terminal "
                           "credits a merchant or utility account")
        sealed_key = seal_mac_key(box, ledger, terminal_id, mac_key)
        await conn.execute(SQL_INSERT_TERMINAL, ledger, terminal_id, merchant_id, str(kind),
                           account_id, sealed_key, time.time_ns())
    return RegistryStatus.CREATED

async def create_room(engine: Engine, *, room_id: str, ledger: int) -> Room | Refused:
    """Create (idempotently) a dorm room and its ``room`` purse (no overdraft)."""
    account_id = room_account_id(ledger, room_id)
    [st] = await engine.store.create_accounts([
        Account(id=account_id, ledger=ledger, kind=AccountKind.ROOM, code=ROOM_CODE,
                flags=(AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,), name=room_id)
    ])
    if st not in (AccountStatus.CREATED, AccountStatus.EXISTS):
        return Refused(Refusal.ACCOUNT_ID_TAKEN, f"account {account_id} exists: {st}")
    async with connection(engine) as conn:
        await conn.execute(SQL_INSERT_ROOM, ledger, room_id, account_id, time.time_ns())
    return Room(room_id, ledger, account_id)

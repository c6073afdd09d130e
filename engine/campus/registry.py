"""The campus registry (contract §2, used by the HTTP API): holders and their purses,
terminals, dorm rooms (their cards are in ``engine.campus.cards``). Each operation answers its
result or a :class:`~engine.campus.model.Refused` with the reason; creating the same thing
again is idempotent (derived account ids, ``exists`` answers).
"""

from __future__ import annotations

import time
from typing import Final

import asyncpg

from engine.access.secretbox import SecretBox, seal_mac_key
from engine.campus.accounts import fund_account_id, holder_account_ids, room_account_id
from engine.campus.model import (
    FUND_CODE,
    PURSE_CODE,
    ROOM_CODE,
    SUBSIDY_CODE,
    Holder,
    HolderKind,
    HolderResult,
    Refusal,
    Refused,
    RegistryStatus,
    Room,
    Terminal,
    TerminalKind,
)
from engine.campus.secrets import same_terminal, terminal_row
from engine.campus.shared import connection
from engine.service import Engine
from ledger.account import Account
from ledger.status import AccountStatus
from ledger.types import AccountFlag, AccountKind

# Lock classes for pg_advisory_xact_lock(int, int) (SQL_ADVISORY_LOCK): the two-key space
# never meets the store's one-key account-id locks. Cards (engine/campus/cards.py) take theirs.
CARD_LOCK: Final = 0x0CA4D
TERMINAL_LOCK: Final = 0x7E4A1


# -- SQL ---------------------------------------------------------------------------------------

SQL_TERMINAL = """
SELECT terminal_id, merchant_id, ledger, kind, account_id, mac_key, mac_key_enc
FROM terminals WHERE terminal_id = $1 ORDER BY ledger LIMIT 1
"""

SQL_HOLDER = """
SELECT id, ledger, name, kind, purse_account_id, subsidy_account_id
FROM holders WHERE ledger = $1 AND id = $2
"""
SQL_INSERT_HOLDER = """
INSERT INTO holders (ledger, id, name, kind, purse_account_id, subsidy_account_id, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (ledger, id) DO NOTHING
RETURNING id
"""
# Serialise creators of the same card number / terminal id across ledgers (no global index).
SQL_ADVISORY_LOCK = "SELECT pg_advisory_xact_lock($1, hashtext(x)) FROM unnest($2::text[]) x"
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


# -- rows --------------------------------------------------------------------------------------


def _holder(r: asyncpg.Record) -> Holder:
    return Holder(
        id=r["id"],
        ledger=r["ledger"],
        name=r["name"],
        kind=HolderKind(r["kind"]),
        purse_account_id=r["purse_account_id"],
        subsidy_account_id=r["subsidy_account_id"],
    )


def _holder_result(h: Holder, name: str, kind: HolderKind) -> HolderResult:
    same = h.name == name and h.kind == kind
    return HolderResult(
        RegistryStatus.EXISTS if same else RegistryStatus.EXISTS_WITH_DIFFERENT_FIELDS, h
    )


# -- holders -----------------------------------------------------------------------------------

async def create_holder(
    engine: Engine, *, holder_id: str, ledger: int, name: str, kind: HolderKind
) -> HolderResult | Refused:
    """Register a holder and create its cash and subsidy purses (``purse``/``subsidy``
    with ``debits_must_not_exceed_credits``), and the ledger's subsidy fund if it has none yet
    (the campus's subsidy budget: subsidies only ever pay from it, they never create it).
    Idempotent: the same holder again answers ``exists``; one whose name or kind differs
    ``exists_with_different_fields``."""
    async with connection(engine) as conn:
        r = await conn.fetchrow(SQL_HOLDER, ledger, holder_id)
    if r is not None:
        return _holder_result(_holder(r), name, kind)
    purse_id, subsidy_id = holder_account_ids(ledger, holder_id)
    fund_id = fund_account_id(ledger)
    no_overdraft = (AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,)
    statuses = await engine.store.create_accounts([
        Account(id=purse_id, ledger=ledger, kind=AccountKind.PURSE, code=PURSE_CODE,
                flags=no_overdraft, holder_id=holder_id, name=name),
        Account(id=subsidy_id, ledger=ledger, kind=AccountKind.SUBSIDY, code=SUBSIDY_CODE,
                flags=no_overdraft, holder_id=holder_id, name=name),
        Account(id=fund_id, ledger=ledger, kind=AccountKind.FUND, code=FUND_CODE,
                name="subsidy fund"),
    ])
    for aid, st in zip((purse_id, subsidy_id, fund_id), statuses, strict=True):
        if st not in (AccountStatus.CREATED, AccountStatus.EXISTS):
            return Refused(Refusal.ACCOUNT_ID_TAKEN, f"account {aid} exists: {st}")
    async with connection(engine) as conn:
        inserted = await conn.fetchval(SQL_INSERT_HOLDER, ledger, holder_id, name, str(kind),
                                       purse_id, subsidy_id, time.time_ns())
        if inserted is None:  # a concurrent create won
            r = await conn.fetchrow(SQL_HOLDER, ledger, holder_id)
            assert r is not None
            return _holder_result(_holder(r), name, kind)
    return HolderResult(
        RegistryStatus.CREATED,
        Holder(holder_id, ledger, name, kind, purse_id, subsidy_id),
    )

# -- terminals and rooms -----------------------------------------------------------------------

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
        await conn.execute(SQL_ADVISORY_LOCK, TERMINAL_LOCK, [terminal_id])
        r = await conn.fetchrow(SQL_TERMINAL, terminal_id)
        if r is not None:
            if same_terminal(terminal_row(r, box), want):
                return RegistryStatus.EXISTS
            return RegistryStatus.EXISTS_WITH_DIFFERENT_FIELDS
        account_kind = await conn.fetchval(SQL_ACCOUNT_KIND, ledger, account_id)
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

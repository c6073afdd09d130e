"""Card numbers and terminal ids: unique across ledgers, and where each belongs.

``card_numbers`` and ``terminal_ids`` (migration 0026) hold one row per value with its ledger,
keyed by the value: their primary keys are the uniqueness, on one PostgreSQL and on a Citus
cluster alike (reference tables there). A creator *claims* the value first, in the
transaction that creates the card or terminal: a plain insert, which waits for a concurrent
claimer of the same value and then either owns the value or fails on the key (inside a
savepoint, so the transaction goes on and finds the owner). Two creators are serialised by the
value itself wherever they run, with no advisory lock (one held on one node only). A plain
insert, not ``ON CONFLICT``: Citus treats an upsert into a reference table as a write that
must exclude every other write to it, cluster-wide, until commit (200 terminals registered
at once waited past the pool's bound); inserts of different values run side by side. A
creation refused after its claim takes the claim back in the same transaction.
Anything that finds a card or terminal by the value alone asks here for its ledger first and
then reads that ledger only.
"""

from __future__ import annotations

from typing import Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Connection = asyncpg.Connection | PoolConnectionProxy

SQL_CLAIM_CARD: Final = "INSERT INTO card_numbers (card_no, ledger) VALUES ($1, $2)"
SQL_CARD_LEDGER: Final = "SELECT ledger FROM card_numbers WHERE card_no = $1"
# Row locks in number order: a card's changes are serialised on its number, as its creation.
SQL_LOCK_CARDS: Final = """
SELECT card_no, ledger FROM card_numbers WHERE card_no = ANY($1::text[])
ORDER BY card_no FOR UPDATE
"""
SQL_UNCLAIM_CARD: Final = "DELETE FROM card_numbers WHERE card_no = $1 AND ledger = $2"
SQL_CLAIM_TERMINAL: Final = "INSERT INTO terminal_ids (terminal_id, ledger) VALUES ($1, $2)"
SQL_TERMINAL_LEDGER: Final = "SELECT ledger FROM terminal_ids WHERE terminal_id = $1"
SQL_TERMINAL_LEDGERS: Final = """
SELECT terminal_id, ledger FROM terminal_ids WHERE terminal_id = ANY($1::text[])
"""
SQL_UNCLAIM_TERMINAL: Final = "DELETE FROM terminal_ids WHERE terminal_id = $1 AND ledger = $2"


async def claim_card(conn: Connection, card_no: str, ledger: int) -> int | None:
    """Claim ``card_no`` for ``ledger`` (inside the creating transaction): None if claimed now,
    else the ledger that owns it (maybe ``ledger`` itself: the card exists there)."""
    return await _claim(conn, SQL_CLAIM_CARD, SQL_CARD_LEDGER, card_no, ledger)


async def _claim(conn: Connection, claim: str, owner_of: str, value: str, ledger: int
                 ) -> int | None:
    owner: int | None = await conn.fetchval(owner_of, value)
    if owner is not None:
        return owner
    try:
        async with conn.transaction():  # a savepoint: a concurrent claim may win the key
            await conn.execute(claim, value, ledger)
        return None
    except asyncpg.UniqueViolationError:
        owner = await conn.fetchval(owner_of, value)
        assert owner is not None, "claims are never taken back once committed"
        return owner


async def unclaim_card(conn: Connection, card_no: str, ledger: int) -> None:
    """Take back a claim of this transaction (its creation was refused)."""
    await conn.execute(SQL_UNCLAIM_CARD, card_no, ledger)


async def card_ledger(conn: Connection, card_no: str) -> int | None:
    """The ledger of the card with this number, or None."""
    ledger: int | None = await conn.fetchval(SQL_CARD_LEDGER, card_no)
    return ledger


async def lock_cards(conn: Connection, card_nos: list[str]) -> dict[str, int]:
    """Lock the numbers (those that exist) for the transaction; their ledgers."""
    rows = await conn.fetch(SQL_LOCK_CARDS, sorted(set(card_nos)))
    return {r["card_no"]: r["ledger"] for r in rows}


async def claim_terminal(conn: Connection, terminal_id: str, ledger: int) -> int | None:
    """Claim ``terminal_id`` for ``ledger``: None if claimed now, else its owner's ledger."""
    return await _claim(conn, SQL_CLAIM_TERMINAL, SQL_TERMINAL_LEDGER, terminal_id, ledger)


async def unclaim_terminal(conn: Connection, terminal_id: str, ledger: int) -> None:
    """Take back a claim of this transaction (the registration was refused)."""
    await conn.execute(SQL_UNCLAIM_TERMINAL, terminal_id, ledger)


async def terminal_ledgers(conn: Connection, terminal_ids: list[str]) -> dict[str, int]:
    """The ledger of each of these terminals that is registered."""
    rows = await conn.fetch(SQL_TERMINAL_LEDGERS, list(set(terminal_ids)))
    return {r["terminal_id"]: r["ledger"] for r in rows}

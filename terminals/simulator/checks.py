"""The ledger against the answers: every account of the simulation's ledger compared with the
books kept from the answers (one set-based read), nothing left pending, debits equal to
credits. Every difference is a problem for the report."""

from __future__ import annotations

from typing import Final

import asyncpg
import msgspec

from engine.service import Engine
from ledger.types import AccountKind
from terminals.simulator.books import Books, Stats
from terminals.simulator.world import World

SQL_LEDGER_ACCOUNTS: Final = """
SELECT id, kind, debits_posted, credits_posted, debits_pending, credits_pending
FROM accounts WHERE ledger = $1
"""


class Check(msgspec.Struct, frozen=True):
    """What the ledger said."""

    accounts: int
    mismatched: int
    pending: int
    zero_sum: bool


def _signed(r: asyncpg.Record) -> int:
    d, c = r["debits_posted"], r["credits_posted"]
    return int(c - d if AccountKind(r["kind"]).credit_normal else d - c)


async def check_ledger(engine: Engine, world: World, books: Books, stats: Stats) -> Check:
    """Compare every account of the simulation's ledger with the books (one set-based read),
    check that nothing is pending and that debits equal credits."""
    async with engine.store.pool.acquire() as conn:
        rows = await conn.fetch(SQL_LEDGER_ACCOUNTS, world.ledger)
    live = {r["id"]: r for r in rows}
    mismatched = 0
    holder_accounts: set[int] = set()
    for h in world.holders:
        holder_accounts |= {h.purse, h.subsidy}
        got = sum(_signed(live[a]) for a in (h.purse, h.subsidy) if a in live)
        if got != h.total:
            mismatched += 1
            stats.problem(f"holder {h.holder_id}: purses hold {got}, expected {h.total}")
    for aid, r in live.items():
        if aid not in holder_accounts and _signed(r) != books.balance[aid]:
            mismatched += 1
            stats.problem(f"account {aid} ({r['kind']}): balance {_signed(r)}, "
                          f"expected {books.balance[aid]}")
    for aid in books.balance.keys() - live.keys():
        mismatched += 1
        stats.problem(f"account {aid} is missing from the ledger")
    pending = sum(1 for r in rows if r["debits_pending"] or r["credits_pending"])
    if pending:
        stats.problem(f"{pending} accounts still have pending amounts")
    zero_sum = (
        sum(r["debits_posted"] for r in rows) == sum(r["credits_posted"] for r in rows)
        and sum(r["debits_pending"] for r in rows) == sum(r["credits_pending"] for r in rows)
    )
    if not zero_sum:
        stats.problem("the ledger's debits and credits differ")
    return Check(len(rows), mismatched, pending, zero_sum)

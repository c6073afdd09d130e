"""The checks the fault tests rely on must be able to fail: each kind of damage they look for
is done to a real ledger here, and each must be reported."""

from __future__ import annotations

import random
import uuid

import asyncpg
import msgspec

from engine.service import Engine
from ledger.account import Account
from ledger.transfer import Transfer
from tests.faults.harness import (
    OK,
    check_books,
    check_ledger,
    new_book,
    plan_requests,
    scratch_database,
)

SQL_SKEW = "UPDATE accounts SET credits_posted = credits_posted + 1 WHERE ledger = $1 AND id = $2"
SQL_PHANTOM = """
INSERT INTO transfers (ledger, id, debit_account_id, credit_account_id, amount, code, flags,
                       timestamp)
VALUES ($1, $2, $3, $4, 5, 1, 0, $5)
"""
SQL_LAST_TIMESTAMP = "SELECT max(timestamp) FROM transfers WHERE ledger = $1"


async def test_the_ledger_checks_catch_damage(admin_dsn: str) -> None:
    async with scratch_database(admin_dsn) as dsn:
        engine = Engine(dsn)
        await engine.start()
        try:
            book = new_book(ledger=1, first_id=1, purses=4, merchants=2)
            await engine.store.create_accounts(
                [msgspec.convert(a, Account) for a in book.accounts()]
            )
            plans = plan_requests(book, random.Random(1), 60)
            answers: dict[str, str] = {}
            for p in plans:
                res = await engine.batcher.submit([msgspec.convert(t, Transfer) for t in p.body])
                answers.update((r.id, r.status) for r in res)
        finally:
            await engine.stop()
        # No opening top-ups: meals from the unfunded purses were refused, which is fine for
        # the checks (they compare the tables with the answers), and a clean ledger passes.
        rep = await check_ledger(dsn, book, plans, answers, final=False)
        assert rep.problems() == []
        assert rep.stored == sum(1 for s in answers.values() if s in OK)
        assert (await check_books(dsn, book.ledger))[0] == []

        lost = dict(answers)
        lost[str(uuid.uuid4())] = "created"  # acknowledged, never stored
        rep = await check_ledger(dsn, book, plans, lost, final=False)
        assert len(rep.lost) == 1

        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(SQL_SKEW, book.ledger, book.merchants[0])
            last = await conn.fetchval(SQL_LAST_TIMESTAMP, book.ledger)
            phantom = uuid.uuid4()
            await conn.execute(
                SQL_PHANTOM, book.ledger, phantom, book.bank, book.purses[0], last + 10
            )
        finally:
            await conn.close()
        rep = await check_ledger(dsn, book, plans, answers, final=False)
        assert str(phantom) in rep.phantom
        assert any(str(book.merchants[0]) in e for e in rep.balance_errors)
        assert rep.audit_errors  # a row no audited batch covers
        problems, _ = await check_books(dsn, book.ledger)
        assert any("debits" in p for p in problems) and any("audited" in p for p in problems)

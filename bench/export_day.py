"""Benchmark ``onecard export`` on a busy day, and a bulk loader for days with chosen times.

``python -m bench.export_day --dsn DSN --transfers N`` loads one campus day of N posted
transfers into a fresh ledger with COPY (audit chain, clock and balances written consistently,
so ``onecard verify`` passes on it), then times the export of that day and prints the seconds.
The target is 1,000,000 transfers exported in at most 30 s.

:func:`load_ledger` is also what tests use to put transfers at chosen instants (a business-day
boundary, a month end) without waiting for the clock: it writes exactly what the engine would
have written for those transfers, batch by batch.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Final

import asyncpg
import msgspec

from engine import limits
from engine.calendar import campus_tz, day_window, local_date
from engine.db.migrate import migrate
from engine.finance.export import export_day
from engine.store import now_ns
from ledger import audit
from ledger.types import AccountKind, TransferCode, TransferFlags

# Transfers per audit batch when loading: the engine's own largest batch.
LOAD_BATCH: Final = limits.MAX_BATCH_TRANSFERS
EXPORT_TARGET_S: Final = 30.0

_TWO_PHASE: Final = int(
    TransferFlags.PENDING | TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING
)
_TRANSFER_COLUMNS: Final = (
    "id", "ledger", "debit_account_id", "credit_account_id", "amount", "pending_id", "code",
    "flags", "timeout_s", "user_data", "timestamp",
)  # the order of ledger.audit.Row
_ACCOUNT_COLUMNS: Final = (
    "ledger", "id", "kind", "code", "flags", "holder_id", "name", "created_at"
)

SQL_NEW_LEDGER = "INSERT INTO ledgers (ledger, last_timestamp, chain_head) VALUES ($1, $2, $3)"
SQL_SET_CLOCK = "UPDATE ledgers SET last_timestamp = $2, chain_head = $3 WHERE ledger = $1"
SQL_AUDIT_BATCH = """
INSERT INTO audit_batches (ledger, first_timestamp, last_timestamp, transfer_count, prev_head,
                           head)
VALUES ($1, $2, $3, $4, $5, $6)
"""
# Live fields from the loaded transfers: one set-based statement (the ledger is fresh).
SQL_SET_BALANCES = """
UPDATE accounts a SET debits_posted = s.d, credits_posted = s.c
FROM (
    SELECT v.id, sum(v.d)::bigint AS d, sum(v.c)::bigint AS c
    FROM transfers t,
         LATERAL (VALUES (t.debit_account_id, t.amount, 0::bigint),
                         (t.credit_account_id, 0::bigint, t.amount)) AS v(id, d, c)
    WHERE t.ledger = $1
    GROUP BY v.id
) s
WHERE a.ledger = $1 AND a.id = s.id
"""
SQL_NEXT_IDS = """
SELECT (SELECT coalesce(max(ledger), 0) + 1 FROM ledgers) AS ledger,
       (SELECT coalesce(max(id), 0) + 1 FROM accounts) AS account
"""


class LoadAccount(msgspec.Struct, frozen=True, kw_only=True):
    """An account to load."""

    id: int
    kind: AccountKind
    code: int = 1
    flags: int = 0
    holder_id: str | None = None
    name: str | None = None


class LoadTransfer(msgspec.Struct, frozen=True, kw_only=True):
    """A posted transfer to load at a chosen engine timestamp (ns)."""

    id: uuid.UUID
    debit_account_id: int
    credit_account_id: int
    amount: int
    code: int
    timestamp: int
    user_data: str | None = None


def transfer_rows(ledger: int, transfers: Iterable[LoadTransfer]) -> list[audit.Row]:
    """Transfers as stored rows (``ledger.audit.Row``)."""
    return [
        (t.id, ledger, t.debit_account_id, t.credit_account_id, t.amount, None, t.code, 0, 0,
         t.user_data, t.timestamp)
        for t in transfers
    ]


async def load_ledger(
    conn: asyncpg.Connection,
    ledger: int,
    accounts: Sequence[LoadAccount],
    rows: Iterable[audit.Row],
    *,
    created_at: int,
) -> int:
    """Load a fresh ledger: accounts (created at ``created_at``) and posted transfer ``rows``
    in timestamp order, with the audit chain, clock and live balances the engine would have
    written. One transaction; rows are consumed ``LOAD_BATCH`` at a time, so a generator keeps
    memory bounded. Returns the number of transfers; ValueError for a row the engine could not
    have written (unknown account, unposted flags, bad amount, timestamps not increasing).
    """
    known = {a.id for a in accounts}
    last = created_at
    head = audit.GENESIS
    count = 0
    async with conn.transaction():
        await conn.execute(SQL_NEW_LEDGER, ledger, 0, audit.GENESIS)
        await conn.copy_records_to_table(
            "accounts",
            columns=_ACCOUNT_COLUMNS,
            records=[
                (ledger, a.id, str(a.kind), a.code, a.flags, a.holder_id, a.name, created_at)
                for a in accounts
            ],
        )
        for batch in _batches(rows):
            for r in batch:
                if r[2] not in known or r[3] not in known:
                    raise ValueError(f"cannot load transfer {r[0]}: unknown account")
                if r[1] != ledger or r[10] <= last or r[4] <= 0 or r[7] & _TWO_PHASE:
                    raise ValueError(f"cannot load transfer {r[0]}: fields or order invalid")
                if r[2] == r[3]:
                    raise ValueError(f"cannot load transfer {r[0]}: accounts must differ")
                last = r[10]
            new = audit.extend(head, batch)
            await conn.copy_records_to_table("transfers", columns=_TRANSFER_COLUMNS, records=batch)
            await conn.execute(
                SQL_AUDIT_BATCH, ledger, batch[0][10], batch[-1][10], len(batch), head, new
            )
            head = new
            count += len(batch)
        await conn.execute(SQL_SET_BALANCES, ledger)
        await conn.execute(SQL_SET_CLOCK, ledger, last, head)
    return count


def _batches(rows: Iterable[audit.Row]) -> Iterator[list[audit.Row]]:
    batch: list[audit.Row] = []
    for r in rows:
        batch.append(r)
        if len(batch) == LOAD_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def busy_day(
    ledger: int, first_account: int, day: date, transfers: int, *, seed: int = 1
) -> tuple[list[LoadAccount], Iterator[audit.Row]]:
    """A plausible campus day: top-ups first, then meals, hot water, refunds; all posted."""
    purses = max(10, min(20_000, transfers // 50))
    ids = iter(range(first_account, first_account + purses + 64))
    clearing, fund, water, power = next(ids), next(ids), next(ids), next(ids)
    merchants = [next(ids) for _ in range(40)]
    holders = [next(ids) for _ in range(purses)]
    accounts = [
        LoadAccount(id=clearing, kind=AccountKind.CLEARING, name="bank"),
        LoadAccount(id=fund, kind=AccountKind.FUND, name="subsidy fund"),
        LoadAccount(id=water, kind=AccountKind.UTILITY, code=2, name="hot water"),
        LoadAccount(id=power, kind=AccountKind.UTILITY, code=3, name="electricity"),
        *(LoadAccount(id=m, kind=AccountKind.MERCHANT, name=f"window {m}") for m in merchants),
        *(LoadAccount(id=h, kind=AccountKind.PURSE, flags=1) for h in holders),
    ]
    return accounts, _busy_rows(ledger, day, transfers, seed, clearing, water, merchants, holders)


def _busy_rows(
    ledger: int,
    day: date,
    transfers: int,
    seed: int,
    clearing: int,
    water: int,
    merchants: list[int],
    holders: list[int],
) -> Iterator[audit.Row]:
    rnd = random.Random(seed)
    start, end = day_window(day, campus_tz())
    step = (end - start - 2) // max(transfers, 1)
    purses = len(holders)
    for i in range(transfers):
        ts = start + 1 + i * step
        tid = uuid.UUID(int=rnd.getrandbits(128), version=4)
        holder = holders[i % purses]
        if i < purses:  # everyone tops up first, so no purse ever goes negative
            yield (tid, ledger, clearing, holder, 1_000_000, None, 4, 0, 0, f"bank-{i}", ts)
        elif i % 50 == 0:
            m = merchants[i % len(merchants)]
            yield (tid, ledger, m, holder, 300, None, int(TransferCode.REFUND), 0, 0, None, ts)
        elif i % 20 == 0:
            yield (tid, ledger, holder, water, rnd.randrange(50, 500), None, 2, 0, 0, None, ts)
        else:
            m = merchants[i % len(merchants)]
            yield (tid, ledger, holder, m, rnd.randrange(300, 2_500), None, 1, 0, 0, None, ts)


async def run(dsn: str, *, transfers: int = 1_000_000) -> dict[str, float]:
    """Load a day of ``transfers`` into a fresh ledger and time its export (seconds)."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        ids = await conn.fetchrow(SQL_NEXT_IDS)
        assert ids is not None
        ledger, first_account = ids["ledger"], ids["account"]
        tz = campus_tz()
        day = local_date(now_ns(), tz) - timedelta(days=1)
        accounts, rows = busy_day(ledger, first_account, day, transfers)
        t1 = time.perf_counter()
        await load_ledger(conn, ledger, accounts, rows, created_at=day_window(day, tz)[0])
        t2 = time.perf_counter()
        await conn.execute("ANALYZE transfers")  # as autovacuum would after a day like this
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    assert pool is not None
    try:
        with tempfile.TemporaryDirectory() as out:
            t3 = time.perf_counter()
            result = await export_day(pool, day, Path(out), tz=tz, ledgers=[ledger])
            t4 = time.perf_counter()
    finally:
        await pool.close()
    if not result.ok or result.postings != transfers:
        raise RuntimeError(f"export of {transfers} transfers wrong: {result.problems[:3]}")
    return {
        "transfers": float(transfers),
        "ledger": float(ledger),
        "load_s": t2 - t1,  # generating the rows included
        "export_s": t4 - t3,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.export_day --dsn DSN [--transfers N]``."""
    p = argparse.ArgumentParser(prog="python -m bench.export_day", description=__doc__)
    p.add_argument("--dsn", required=True, help="PostgreSQL DSN (a fresh ledger is added)")
    p.add_argument("--transfers", type=int, default=1_000_000)
    args = p.parse_args(argv)
    r = asyncio.run(run(args.dsn, transfers=args.transfers))
    fast = r["export_s"] <= EXPORT_TARGET_S
    verdict = "ok" if fast else f"OVER the {EXPORT_TARGET_S:.0f} s target"
    n, lg = int(r["transfers"]), int(r["ledger"])
    print(f"ledger {lg}: {n} transfers generated and loaded in {r['load_s']:.1f} s")
    print(f"export: {r['export_s']:.2f} s ({verdict})")
    return 0 if fast else 1


if __name__ == "__main__":
    sys.exit(main())

"""Database and ledger commands: ``migrate`` and ``snapshot`` (contract §3)."""

from __future__ import annotations

import argparse
from typing import Final

import asyncpg

from engine.access import sealing, secretbox
from engine.cli.base import Command, no_arguments
from engine.db.migrate import migrate
from engine.db.pool import create_pool
from engine.store import Store


async def _migrate(args: argparse.Namespace, dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        applied = await migrate(conn)
        # the migration path of secrets at rest: clear PINs and MAC keys sealed under the key
        sealed = await sealing.prepare(conn, secretbox.default_box())
    finally:
        await conn.close()
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    if sealed.pins or sealed.mac_keys:
        print(f"sealed {sealed.pins} PINs and {sealed.mac_keys} MAC keys")
    return 0


async def _snapshot(args: argparse.Namespace, dsn: str) -> int:
    pool = await create_pool(dsn, max_size=2)
    try:
        store = Store(pool)
        for ledger in await store.ledgers():
            ts, count = await store.snapshot(ledger)
            print(f"ledger {ledger}: {count} accounts at timestamp {ts}")
    finally:
        await pool.close()
    return 0


MIGRATE: Final = Command("migrate", "apply database migrations", no_arguments, _migrate)
SNAPSHOT: Final = Command("snapshot", "record balance snapshots now", no_arguments, _snapshot)

"""The cross-process window of "one transfer id, one transfer" (engine/batcher.py's docstring).

Two engine processes on one scratch database; for each of ``--pairs`` fresh ids, process 1
posts it into ledger A and process 2 into ledger B, ``delta`` ms later (each offset in
DELTAS_MS in turn). Prints, per offset, how many ids were stored twice. Within one process the
batcher makes this impossible; across processes nothing orders two ledgers' writers.
``--load``: each process also keeps committing 500-transfer batches into a third ledger.
Usage: python scripts/id_window.py [--dsn MAINTENANCE_DSN] [--pairs 26] [--load]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.databases import scratch_database  # noqa: E402
from engine.service import Engine  # noqa: E402
from ledger.account import Account  # noqa: E402
from ledger.transfer import Transfer  # noqa: E402
from ledger.types import AccountKind  # noqa: E402

DELTAS_MS = [-20, -10, -5, -3, -2, -1, 0, 1, 2, 3, 5, 10, 20]
PERIOD_S = 0.06  # between two ids
SQL_STORED = "SELECT id, count(*) AS n FROM transfers WHERE id = ANY($1::uuid[]) GROUP BY id"


def _top_up(ledger: int, tid: uuid.UUID) -> Transfer:
    # ledger L has a clearing account 10L+1 and a purse 10L+2
    return Transfer(id=tid, ledger=ledger, debit_account_id=10 * ledger + 1,
                    credit_account_id=10 * ledger + 2, amount=1, code=4)


def _child(dsn: str, me: int, ids: list[uuid.UUID], start: float, load: bool) -> None:
    asyncio.run(_post(dsn, me, ids, start, load))


async def _post(dsn: str, me: int, ids: list[uuid.UUID], start: float, load: bool) -> None:
    engine = Engine(dsn)
    await engine.start(run_migrations=False)
    done = asyncio.Event()

    async def loader() -> None:
        while not done.is_set():
            await engine.batcher.submit([_top_up(me + 2, uuid.uuid4()) for _ in range(500)])

    async def one(i: int) -> None:
        delta = DELTAS_MS[i % len(DELTAS_MS)] / 1000 if me == 2 else 0.0
        await asyncio.sleep(max(0.0, start + i * PERIOD_S + delta - time.time()))
        await engine.batcher.submit([_top_up(me, ids[i])])

    loaders = [asyncio.create_task(loader()) for _ in range(4 if load else 0)]
    await asyncio.gather(*(one(i) for i in range(len(ids))))
    done.set()
    await asyncio.gather(*loaders)
    await engine.stop()


async def measure(admin_dsn: str, pairs: int, load: bool) -> None:
    async with scratch_database(admin_dsn, "window", prefix="onecard_window") as dsn:
        engine = Engine(dsn)
        await engine.start(run_migrations=False)
        for ledger in (1, 2, 3, 4):
            await engine.store.create_accounts([
                Account(id=10 * ledger + 1, ledger=ledger, kind=AccountKind.CLEARING, code=4),
                Account(id=10 * ledger + 2, ledger=ledger, kind=AccountKind.PURSE, code=10)])
        await engine.stop()
        ids = [uuid.uuid4() for _ in range(pairs * len(DELTAS_MS))]
        start = time.time() + 4  # both processes started and connected by then
        ctx: Any = mp.get_context("spawn")
        procs = [ctx.Process(target=_child, args=(dsn, me, ids, start, load)) for me in (1, 2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        conn = await asyncpg.connect(dsn)
        try:
            twice = {r["id"] for r in await conn.fetch(SQL_STORED, ids) if r["n"] > 1}
        finally:
            await conn.close()
    print(f"{len(ids)} ids, {len(twice)} stored twice (load: {load})")
    for k, d in enumerate(DELTAS_MS):
        mine = ids[k :: len(DELTAS_MS)]
        print(f"  offset {d:+4d} ms: {sum(i in twice for i in mine)}/{len(mine)} stored twice")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dsn", default=os.environ.get("ONECARD_TEST_DSN",
                                                   "postgresql://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--pairs", type=int, default=26, help="ids per offset")
    p.add_argument("--load", action="store_true")
    a = p.parse_args()
    asyncio.run(measure(a.dsn, a.pairs, a.load))


if __name__ == "__main__":
    main()

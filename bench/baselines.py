"""Yardsticks measured in the same run, on the same server: a naive poster (one database
transaction per transfer: the engine's own store without group commit) and ``pgbench -N``."""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import time
from typing import Final

import msgspec

from bench.databases import database_of, scratch_database
from bench.fixture import Campus
from bench.loop import Bar, Request, closed_loop
from bench.machine import CpuProbe
from bench.measure import Stats
from bench.mix import Mix
from engine.db.pool import create_pool
from engine.store import Store
from ledger.types import AccountFlags

PGBENCH: Final = "/usr/bin/pgbench"
PGBENCH_THREADS: Final = 2
PGBENCH_INIT_TIMEOUT_S: Final = 600.0
_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_LAT = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_STD = re.compile(r"^latency stddev = ([0-9.]+) ms", re.MULTILINE)


class PgbenchResult(msgspec.Struct, kw_only=True):
    """What ``pgbench -N`` reported."""

    tps: float
    latency_avg_ms: float | None
    latency_stddev_ms: float | None
    clients: int
    threads: int
    duration_s: int
    scale: int
    command: str


# The naive poster: what one writes first. One transaction per transfer: lock both accounts in
# id order, check the overdraft rule, insert the transfer, move the balances, commit.
SQL_NAIVE_LOCK = """
SELECT id, flags, debits_posted, debits_pending, credits_posted FROM accounts
WHERE ledger = $1 AND id = ANY($2::bigint[]) ORDER BY id FOR UPDATE
"""
SQL_NAIVE_INSERT = """
INSERT INTO transfers (ledger, id, debit_account_id, credit_account_id, amount, code, flags,
                       timeout_s, user_data, timestamp)
VALUES ($1, $2, $3, $4, $5, $6, 0, 0, $7, $8)
ON CONFLICT DO NOTHING
"""
SQL_NAIVE_MOVE = """
UPDATE accounts a SET debits_posted = a.debits_posted + m.d,
                      credits_posted = a.credits_posted + m.c
FROM (VALUES ($2::bigint, $4::bigint, 0::bigint),
             ($3::bigint, 0::bigint, $4::bigint)) AS m(id, d, c)
WHERE a.ledger = $1 AND a.id = m.id
"""
_NO_OVERDRAFT: Final = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)


async def naive_poster(
    dsn: str,
    campus: Campus,
    *,
    clients: int,
    duration: float,
    warmup: float,
    seed: int,
    bar: Bar,
) -> Stats:
    """``clients`` concurrent posters, each committing one plain transfer per transaction with
    hand-written SQL (no batching, no audit chain, no holds): the design the batcher replaced.
    Statuses are the subset it can tell: created, exists, exceeds_credits, *_not_found."""
    pool = await create_pool(dsn, max_size=clients)
    clock = itertools.count(time.time_ns())  # unique per ledger, as the schema requires
    ledger = campus.ledger
    try:

        def worker(stream: int) -> Request:
            mix = Mix(campus, seed=seed, stream=stream, plain=True)

            async def one() -> tuple[int, list[str]]:
                t = mix.transfer()
                async with pool.acquire() as conn, conn.transaction():
                    rows = await conn.fetch(
                        SQL_NAIVE_LOCK, ledger, sorted({t.debit_account_id, t.credit_account_id})
                    )
                    acc = {r["id"]: r for r in rows}
                    dr, cr = acc.get(t.debit_account_id), acc.get(t.credit_account_id)
                    if dr is None or cr is None:
                        return 1, ["debit_account_not_found" if dr is None
                                   else "credit_account_not_found"]
                    if dr["flags"] & _NO_OVERDRAFT and (
                        dr["debits_posted"] + dr["debits_pending"] + t.amount
                        > dr["credits_posted"]
                    ):
                        return 1, ["exceeds_credits"]
                    done = await conn.execute(
                        SQL_NAIVE_INSERT, ledger, t.id, t.debit_account_id,
                        t.credit_account_id, t.amount, t.code, t.user_data, next(clock),
                    )
                    if done.endswith(" 0"):
                        return 1, ["exists"]
                    await conn.execute(
                        SQL_NAIVE_MOVE, ledger, t.debit_account_id, t.credit_account_id, t.amount
                    )
                return 1, ["created"]

            return one

        return await closed_loop(
            f"naive (1 tx per transfer) c={clients}",
            [worker(50_000 + i) for i in range(clients)],
            duration=duration,
            warmup=warmup,
            bar=bar,
            cpu=CpuProbe(database=database_of(dsn), own="poster (python)"),
        )
    finally:
        await pool.close()


async def unbatched_engine(
    dsn: str,
    campus: Campus,
    *,
    clients: int,
    duration: float,
    warmup: float,
    seed: int,
    bar: Bar,
) -> Stats:
    """``clients`` concurrent posters, each committing one transfer per transaction through
    ``Store.post_batch`` (the same rules, clock, locks, audit chain and writes as a batch of
    one): what onecard would do without the batcher."""
    pool = await create_pool(dsn, max_size=clients)
    try:
        store = Store(pool)
        ledger = campus.ledger

        def worker(stream: int) -> Request:
            mix = Mix(campus, seed=seed, stream=stream)

            async def one() -> tuple[int, list[str]]:
                out = await store.post_batch(ledger, [mix.transfer()])
                return 1, [out.statuses[0].value]

            return one

        return await closed_loop(
            f"engine unbatched (Store.post_batch per transfer) c={clients}",
            [worker(60_000 + i) for i in range(clients)],
            duration=duration,
            warmup=warmup,
            bar=bar,
            cpu=CpuProbe(database=database_of(dsn), own="poster (python)"),
        )
    finally:
        await pool.close()


async def _run(*argv: str, limit_s: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(limit_s):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {text[-2000:]}")
    return text


async def pgbench(
    maintenance_dsn: str,
    *,
    clients: int,
    duration: float,
    scale: int,
    keep: bool = False,
) -> PgbenchResult:
    """``pgbench -N`` (simple update, synchronous commit as configured) on a scratch database
    initialised with ``pgbench -i``."""
    exe = shutil.which("pgbench") or PGBENCH
    seconds = max(1, round(duration))
    async with scratch_database(maintenance_dsn, "pgbench", keep=keep, schema=False) as url:
        await _run(exe, "-i", "-q", "-s", str(scale), url, limit_s=PGBENCH_INIT_TIMEOUT_S)
        argv = [
            exe, "-N", "-n", "-c", str(clients), "-j", str(PGBENCH_THREADS),
            "-T", str(seconds), url,
        ]
        out = await _run(*argv, limit_s=seconds + 120.0)
    tps = _TPS.search(out)
    if tps is None:
        raise RuntimeError(f"no tps in pgbench output: {out[-2000:]}")
    lat, std = _LAT.search(out), _STD.search(out)
    return PgbenchResult(
        tps=float(tps.group(1)),
        latency_avg_ms=float(lat.group(1)) if lat else None,
        latency_stddev_ms=float(std.group(1)) if std else None,
        clients=clients,
        threads=PGBENCH_THREADS,
        duration_s=seconds,
        scale=scale,
        command=" ".join([*argv[:-1], "<scratch db>"]),
    )

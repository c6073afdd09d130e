"""CPU an idle ``onecard serve`` uses with many ledgers (issue 18: the hold expirer once asked
every ledger every second, half a core with 10,000 ledgers, forever).

Creates a scratch database with ``--ledgers`` ledgers of one account each (no holds), starts
the server on it (HTTP only), waits ``--warmup`` seconds (the day's first snapshots of every
ledger are taken at start: a one-off burst, not idle work), then samples for ``--seconds`` the
CPU time of the server process and of its PostgreSQL backends (``/proc``, same machine).
Usage: python scripts/idle_cpu.py [--dsn MAINTENANCE_DSN] [--ledgers 10000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.databases import scratch_database  # noqa: E402
from engine.service import create_pool  # noqa: E402
from engine.store import Store  # noqa: E402
from ledger.account import Account  # noqa: E402
from ledger.types import AccountKind  # noqa: E402

SQL_BACKENDS = "SELECT pid FROM pg_stat_activity WHERE datname = $1"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def measure(admin_dsn: str, ledgers: int, seconds: float, warmup: float) -> None:
    async with scratch_database(admin_dsn, "idle", prefix="onecard_idle") as dsn:
        pool = await create_pool(dsn)
        store = Store(pool)
        accounts = [Account(id=i, ledger=i, kind=AccountKind.CLEARING, code=4)
                    for i in range(1, ledgers + 1)]
        for k in range(0, ledgers, 1000):  # an advisory lock per account id: in chunks
            await store.create_accounts(accounts[k : k + 1000])
        await pool.close()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ONECARD_ADMIN_TOKEN": "a",
               "ONECARD_READ_TOKEN": "r"}
        argv = [sys.executable, "-m", "engine.cli", "serve", "--dsn", dsn, "--http",
                f"127.0.0.1:{free_port()}", "--no-iso"]
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await asyncio.sleep(warmup)
            await sample(admin_dsn, dsn.rsplit("/", 1)[1], proc.pid, ledgers, seconds)
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)


async def sample(admin_dsn: str, database: str, server: int, ledgers: int,
                 seconds: float) -> None:
    admin = await asyncpg.connect(admin_dsn)
    last: dict[int, float] = {}
    backends = 0.0
    s0, t0 = cpu_s(server), time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:  # backends come and go: polled
            for r in await admin.fetch(SQL_BACKENDS, database):
                try:
                    now = cpu_s(r["pid"])
                except FileNotFoundError:
                    continue
                backends += now - last.get(r["pid"], now)
                last[r["pid"]] = now
            await asyncio.sleep(0.5)
    finally:
        await admin.close()
    took = time.monotonic() - t0
    own = cpu_s(server) - s0
    print(f"idle {took:.0f} s with {ledgers:,} ledgers: server {100 * own / took:.1f}% of a "
          f"core, its PostgreSQL backends {100 * backends / took:.1f}%, "
          f"total {100 * (own + backends) / took:.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dsn", default=os.environ.get("ONECARD_TEST_DSN",
                                                   "postgresql://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--ledgers", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=90.0)
    a = p.parse_args()
    asyncio.run(measure(a.dsn, a.ledgers, a.seconds, a.warmup))


if __name__ == "__main__":
    main()

"""Measure ``onecard backup`` and ``onecard restore`` on an embedded database of a given size
(the figures in the README's "Backups and recovery").

Loads ``--transfers`` posted transfers over ``--accounts`` purses into the embedded PostgreSQL
of ``DIR/source`` with the bench's loader (the rows the engine would have written, so
``verify`` holds), then times, each as the real command in a subprocess: ``backup``, ``restore``
to the end of the archive and ``restore --until`` a moment, both replaying the WAL written
after the backup (``--wal-rows``), and ``verify`` of the restored copy.
Everything is left in DIR for inspection; remove it afterwards (as root the
clusters live under /var/lib/onecard: ``DIR/*/embedded-cluster`` names them).

Usage: python scripts/measure_backup.py DIR [--transfers 1000000] [--accounts 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg

from bench.scale import load_large
from engine.db.embedded import EmbeddedPostgres
from engine.db.migrate import migrate


class _QuietBar:
    """What ``load_large`` reports progress to."""

    def task(self, description: str, total: float) -> int:
        print(description, flush=True)
        return 0

    def update(self, task: int, **fields: Any) -> None:
        pass


def _timed(*args: str) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "engine.cli", *args], check=False,
                         capture_output=True, text=True)
    took = time.perf_counter() - t0
    print(res.stdout + res.stderr, flush=True)
    if res.returncode != 0:
        raise SystemExit(f"onecard {args[0]} failed (exit {res.returncode})")
    return took


async def _load(dsn: str, transfers: int, accounts: int) -> tuple[float, int]:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    options = SimpleNamespace(accounts=accounts, transfers=transfers, seed=1, random_ids=False)
    _, seconds, size = await load_large(dsn, options, _QuietBar())  # type: ignore[arg-type]
    return seconds, size


async def _archived(conn: asyncpg.Connection, segment: str) -> bool:
    last = await conn.fetchval("SELECT last_archived_wal FROM pg_stat_archiver")
    return (last or "") >= segment


async def _after_backup(dsn: str, rows: int) -> tuple[str, int]:
    """Write WAL after the backup (a table of ``rows`` rows), note the moment, write one more
    row, and wait until the archive has it all; (the moment, WAL bytes written)."""
    conn = await asyncpg.connect(dsn)
    try:
        start = await conn.fetchval("SELECT pg_current_wal_lsn()")
        await conn.execute(f"CREATE TABLE after_backup AS SELECT g, md5(g::text) AS h "
                           f"FROM generate_series(1, {rows}) g")
        until = (await conn.fetchval("SELECT clock_timestamp()")).isoformat()
        await asyncio.sleep(0.1)
        await conn.execute("INSERT INTO after_backup VALUES (0, 'after the moment')")
        wal = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", start)
        segment = await conn.fetchval("SELECT pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + 600
        while not await _archived(conn, segment):
            if time.monotonic() > deadline:
                raise SystemExit("the archiver did not archive the last segment in 10 min")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    return until, int(wal)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--transfers", type=int, default=1_000_000)
    p.add_argument("--accounts", type=int, default=100_000)
    p.add_argument("--wal-rows", type=int, default=1_000_000,
                   help="rows written after the backup, replayed by the restores")
    a = p.parse_args()
    source = a.dir / "source"
    pg = EmbeddedPostgres(source)
    dsn = pg.start(timeout_s=300)
    try:
        load_s, size = asyncio.run(_load(dsn, a.transfers, a.accounts))
        print(f"loaded {a.transfers:,} transfers in {load_s:.0f}s; database {size / 2**20:,.0f} "
              f"MiB", flush=True)
        backup_s = _timed("backup", "--data-dir", str(source), "--out", str(a.dir / "backup"))
        until, wal = asyncio.run(_after_backup(dsn, a.wal_rows))
    finally:
        pg.stop()
    end_s = _timed("restore", "--from", str(a.dir / "backup"),
                   "--data-dir", str(a.dir / "restored-end"))
    until_s = _timed("restore", "--from", str(a.dir / "backup"), "--until", until,
                     "--data-dir", str(a.dir / "restored-until"))
    verify_s = _timed("verify", "--data-dir", str(a.dir / "restored-until"), "--stop-embedded")
    print(f"database {size / 2**20:,.0f} MiB: backup {backup_s:.1f}s; then {wal / 2**20:,.0f} "
          f"MiB of WAL: restore {end_s:.1f}s, restore --until {until_s:.1f}s, "
          f"verify {verify_s:.1f}s")


if __name__ == "__main__":
    main()

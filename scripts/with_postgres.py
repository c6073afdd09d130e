"""Run a command with ``ONECARD_TEST_DSN`` pointing at a reachable PostgreSQL.

Uses ``$ONECARD_TEST_DSN`` when set, else the server on 127.0.0.1:5432 when it answers, else
starts onecard's embedded PostgreSQL in a temporary directory and stops it afterwards.
Usage: python scripts/with_postgres.py -- COMMAND [ARGS...]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile

import asyncpg

LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"


async def _reachable(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    env = dict(os.environ)
    if env.get("ONECARD_TEST_DSN"):
        return subprocess.call(argv, env=env)
    if asyncio.run(_reachable(LOCAL)):
        print(f"with_postgres: using the server at {LOCAL}", flush=True)
        env["ONECARD_TEST_DSN"] = LOCAL
        return subprocess.call(argv, env=env)
    from engine.db.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="onecard-test-pg-") as tmp:
        print("with_postgres: no server on 127.0.0.1:5432; starting embedded one", flush=True)
        with EmbeddedPostgres(tmp) as dsn:
            env["ONECARD_TEST_DSN"] = dsn
            return subprocess.call(argv, env=env)


if __name__ == "__main__":
    sys.exit(main())

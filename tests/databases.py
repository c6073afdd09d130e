"""Scratch databases on the test server: made fresh, dropped afterwards (the bench's helpers,
which do the same for its workloads)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from bench import databases as bench_databases
from bench.databases import with_database

database_name = bench_databases.database_of
__all__ = ["database_name", "scratch_database", "with_database"]


@contextlib.asynccontextmanager
async def scratch_database(
    admin_dsn: str, *, prefix: str = "onecard_scratch"
) -> AsyncIterator[str]:
    """A fresh, empty database on the test server (not migrated), dropped afterwards."""
    async with bench_databases.scratch_database(admin_dsn, "t", schema=False, prefix=prefix) as url:
        yield url

"""Reading tables of any size in bounded memory (server-side cursors)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from engine import limits

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]


async def stream(
    conn: Conn, sql: str, *args: object, chunk: int | None = None
) -> AsyncIterator[list[asyncpg.Record]]:
    """The rows of ``sql`` in chunks through a server-side cursor (needs a transaction), so a
    table of any size is read with ``chunk`` (default ``limits.STREAM_CHUNK_ROWS``) rows in
    memory at a time."""
    n = chunk or limits.STREAM_CHUNK_ROWS
    cur = await conn.cursor(sql, *args)
    while True:
        rows = await cur.fetch(n)
        if not rows:
            return
        yield rows
        if len(rows) < n:
            return

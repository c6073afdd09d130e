"""The engine's asyncpg pools: session defaults, limits and a cheap release."""

from __future__ import annotations

import logging
from typing import Final

import asyncpg

from engine import limits

log = logging.getLogger(__name__)


# Two session settings on a Citus node; a no-op where they are unknown (a plain PostgreSQL:
# current_setting(..., true) is NULL there).
# - Every query of pg_class is filtered through relation_is_a_known_shard() to hide shards from
#   applications; asyncpg's type introspection (once per connection for each array or
#   composite type it meets) then took 7-10 s on a coordinator. The engine never lists
#   relations: its sessions see them unfiltered.
# - A statement that visits every shard (a lookup by account id alone, an admin listing) may
#   open up to 16 connections to each worker by default, per session: a few engines' pools
#   then exhausted the workers' connection slots and every session waited for one (four
#   simulated campuses could not even create their holders). The engine's statements are
#   small: one connection per worker and session runs them.
SQL_SHOW_SHARDS = """
SELECT set_config('citus.override_table_visibility', 'off', false),
       set_config('citus.max_adaptive_executor_pool_size', '1', false)
WHERE current_setting('citus.override_table_visibility', true) IS NOT NULL
"""


# The engine never relies on the server's zone; campus days are computed in Python.
SQL_SESSION: Final = "SET TIME ZONE 'UTC';" + SQL_SHOW_SHARDS


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.execute(SQL_SESSION)


async def _reset_connection(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    # RESET ALL` on every release: a round trip and server work per batch, per read. The engine
    # leaves no session state behind (transactions are managed; locks are transaction locks,
    # except the migration lock, released in a `finally`; settings are session defaults), so
    # only an open transaction, which would be a bug, is rolled back.
    if conn.is_in_transaction():
        log.error("a pooled connection came back inside a transaction; rolling back")
        await conn.execute("ROLLBACK")


async def create_pool(dsn: str, *, max_size: int = limits.DB_POOL_MAX) -> asyncpg.Pool:
    """An asyncpg pool with the engine's limits."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min(limits.DB_POOL_MIN, max_size),
        max_size=max_size,
        timeout=limits.DB_CONNECT_TIMEOUT_S,
        command_timeout=limits.DB_COMMAND_TIMEOUT_S,
        init=_init_connection,
        # Session defaults (a SET would survive only until someone resets the connection).
        # A JIT compile (~40 ms) costs many times what the engine's statements take to run.
        server_settings={"jit": "off", "timezone": "UTC"},
        reset=_reset_connection,
    )
    assert pool is not None
    return pool

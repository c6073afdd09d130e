"""Apply the numbered SQL files in ``migrations/`` once each, under an advisory lock.

Each applied file is recorded with its SHA-256; a file changed after it was applied is an
error (fix forward with a new file, never edit history). On a Citus coordinator (the
``citus`` extension in the target database) the tables are then distributed by ledger
(engine/db/distribute.py); on a plain PostgreSQL nothing more happens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from importlib import resources

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from engine.db.distribute import (
    DistributionError,
    check_coordinator,
    distribute,
    has_citus,
    is_started,
)
from engine.limits import MIGRATION_LOCK_KEY

_CREATE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text PRIMARY KEY,
    sha256     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
_APPLIED = "SELECT name, sha256 FROM schema_migrations"
_RECORD = "INSERT INTO schema_migrations (name, sha256) VALUES ($1, $2)"


class MigrationError(RuntimeError):
    """An applied migration no longer matches its file, or a file failed to apply."""


def migration_files() -> list[tuple[str, str]]:
    """(name, sql) of every migration, in order."""
    root = resources.files("migrations")
    files = sorted((p for p in root.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name, p.read_text(encoding="utf-8")) for p in files]


async def migrate(conn: asyncpg.Connection | PoolConnectionProxy) -> list[str]:
    """Bring the schema up to date; returns the names applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_CREATE)
        citus = await has_citus(conn)
        if citus:
            await _on_cluster(conn, check_coordinator)
        applied = {r["name"]: r["sha256"] for r in await conn.fetch(_APPLIED)}
        done: list[str] = []
        for name, sql in migration_files():
            digest = hashlib.sha256(sql.encode()).hexdigest()
            if name in applied:
                if applied[name] != digest:
                    raise MigrationError(f"migration {name} changed after it was applied")
                continue
            try:
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(_RECORD, name, digest)
            except asyncpg.PostgresError as e:
                raise MigrationError(f"migration {name} failed: {e}") from e
            done.append(name)
            # On a cluster already distributed, a table this file added joins it before the
            # next file runs (which may reference it); a fresh schema is distributed at the end.
            if citus and await is_started(conn):
                await _on_cluster(conn, distribute)
        if citus:
            await _on_cluster(conn, distribute)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def _on_cluster(
    conn: asyncpg.Connection | PoolConnectionProxy,
    step: Callable[[asyncpg.Connection | PoolConnectionProxy], Awaitable[object]],
) -> None:
    """Run a Citus step; its failure is the migration's."""
    try:
        await step(conn)
    except (asyncpg.PostgresError, DistributionError) as e:
        raise MigrationError(f"distributing the schema over Citus failed: {e}") from e

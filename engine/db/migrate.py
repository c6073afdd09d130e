"""Apply the numbered SQL files in ``migrations/`` once each, under an advisory lock.

Each applied file is recorded with its SHA-256; a file changed after it was applied is an
error (fix forward with a new file, never edit history).
"""

from __future__ import annotations

import hashlib
from importlib import resources

import asyncpg
from asyncpg.pool import PoolConnectionProxy

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
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)

"""Scratch databases: each run builds fresh ones on the server the maintenance DSN names."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Final

import asyncpg

from engine.db.migrate import migrate

DEFAULT_DSN: Final = "postgresql://postgres@127.0.0.1:5432/postgres"


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name`` (URI form; query parameters kept)."""
    base, _, query = dsn.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


@contextlib.asynccontextmanager
async def scratch_database(
    maintenance_dsn: str,
    tag: str,
    *,
    keep: bool = False,
    schema: bool = True,
    prefix: str = "onecard_bench",
) -> AsyncIterator[str]:
    """A fresh database (migrated when ``schema``), dropped afterwards unless ``keep``."""
    name = f"{prefix}_{tag}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    conn = await asyncpg.connect(maintenance_dsn)
    try:
        # DDL takes no parameters; the name is ours (letters, digits and hex only).
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = with_database(maintenance_dsn, name)
    try:
        if schema:
            c = await asyncpg.connect(url)
            try:
                await migrate(c)
            finally:
                await c.close()
        yield url
    finally:
        if not keep:
            conn = await asyncpg.connect(maintenance_dsn)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()


def database_of(dsn: str) -> str:
    """The database name in a URI DSN."""
    return dsn.partition("?")[0].rpartition("/")[2]

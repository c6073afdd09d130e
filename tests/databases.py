"""Scratch databases on the test server: made fresh, dropped afterwards."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import asyncpg


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name`` (query parameters such as a socket host kept)."""
    base, _, query = dsn.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


def database_name(dsn: str) -> str:
    """The database a DSN names."""
    return dsn.partition("?")[0].rpartition("/")[2]


@contextlib.asynccontextmanager
async def scratch_database(
    admin_dsn: str, *, prefix: str = "onecard_scratch"
) -> AsyncIterator[str]:
    """A fresh, empty database on the test server (not migrated), dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        # DDL takes no parameters; the name is ours (letters, digits and hex only).
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield with_database(admin_dsn, name)
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

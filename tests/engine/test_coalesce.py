"""engine.db.coalesce on a real PostgreSQL: concurrent asks share statements, split by ledger
and batch size; a failure answers its own batch; the connection is kept while work comes."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from engine.db.coalesce import Coalescer, Connection
from engine.service import Engine


@pytest.fixture
async def pool(engine: Engine) -> asyncpg.Pool:
    return engine.store.pool


async def test_coalescer_batches_splits_and_answers_in_order(pool: asyncpg.Pool) -> None:
    sizes: list[int] = []

    async def run(conn: Connection, ledger: int, items: list[int]) -> list[int]:
        sizes.append(len(items))
        rows = await conn.fetch("SELECT x * 2 + $1 AS y FROM unnest($2::int[]) x", ledger, items)
        return [r["y"] for r in rows]

    c: Coalescer[int, int] = Coalescer(lambda: pool, run, max_batch=8, linger_s=0)
    got = await asyncio.gather(*(c.ask(i % 2, i) for i in range(40)))
    assert got == [i * 2 + i % 2 for i in range(40)]
    assert max(sizes) <= 8 and sum(sizes) == 40
    assert c.statements == len(sizes) < 40


async def test_coalescer_failure_answers_its_batch_only(pool: asyncpg.Pool) -> None:
    async def run(conn: Connection, ledger: int, items: list[int]) -> list[int]:
        if ledger == 13:
            await conn.fetch("SELECT 1 / 0")
        return [await conn.fetchval("SELECT $1::int", i) for i in items]

    c: Coalescer[int, int] = Coalescer(lambda: pool, run, linger_s=0)
    results = await asyncio.gather(c.ask(13, 1), c.ask(14, 2), c.ask(13, 3),
                                   return_exceptions=True)
    assert isinstance(results[0], asyncpg.DivisionByZeroError)
    assert isinstance(results[2], asyncpg.DivisionByZeroError)
    assert results[1] == 2  # the other ledger's batch, on the same connection
    assert c.acquired == 1
    assert await c.ask(14, 5) == 5


async def test_coalescer_without_a_pool_answers_everyone(engine: Engine) -> None:
    closed = await asyncpg.create_pool(engine.dsn, min_size=0, max_size=1)
    assert closed is not None
    await closed.close()

    async def run(conn: Connection, ledger: int, items: list[int]) -> list[int]:
        return items

    c: Coalescer[int, int] = Coalescer(lambda: closed, run)
    results = await asyncio.gather(*(c.ask(1, i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, asyncpg.InterfaceError) for r in results)


async def test_coalescer_keeps_its_connection_while_work_keeps_coming(pool: asyncpg.Pool) -> None:
    async def run(conn: Connection, ledger: int, items: list[int]) -> list[int]:
        return [await conn.fetchval("SELECT current_setting('jit')") == "off"] * len(items)

    c: Coalescer[int, bool] = Coalescer(lambda: pool, run, linger_s=0.2,
                                        session="SET jit = off")
    for _ in range(5):
        assert await c.ask(1, 0) is True  # the session statement ran on the connection
        await asyncio.sleep(0.01)
    assert c.acquired == 1 and c.statements == 5
    await asyncio.sleep(0.3)  # the linger ran out: the connection went back
    assert await c.ask(1, 0) is True
    assert c.acquired == 2

"""The running engine: database pool, store, batcher and background tasks, started and stopped
as one unit. The HTTP API and the terminal gateway both talk to an ``Engine``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from engine import limits, metrics
from engine.batcher import Batcher
from engine.db.distribute import is_distributed
from engine.db.migrate import migrate
from engine.db.pool import create_pool
from engine.expiry import run_expirer
from engine.store import Store

log = logging.getLogger(__name__)


def tune_gc() -> None:
    """Set the process's garbage collection for the engine's allocation pattern (see
    ``limits.GC_THRESHOLDS``), and exempt everything loaded so far from collection scans."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*limits.GC_THRESHOLDS)


async def supervise(
    name: str,
    loop: Callable[[], Coroutine[Any, Any, None]],
    *,
    restart_s: float = limits.BACKGROUND_RESTART_S,
) -> None:
    """Run a background loop until it returns or is cancelled; restart it after an error."""
    while True:
        try:
            await loop()
            return
        except Exception:
            log.exception("%s failed; restarting in %.1fs", name, restart_s)
        await asyncio.sleep(restart_s)


class Engine:
    """Pool + store + batcher + hold expirer."""

    def __init__(self, dsn: str, *, expirer_interval_s: float = limits.EXPIRER_INTERVAL_S):
        self.dsn = dsn
        self.expirer_interval_s = expirer_interval_s
        self._pool: asyncpg.Pool | None = None
        self._store: Store | None = None
        self._batcher: Batcher | None = None
        self._expirer: asyncio.Task[None] | None = None

    @property
    def store(self) -> Store:
        """The store (only after ``start``)."""
        assert self._store is not None, "engine not started"
        return self._store

    @property
    def batcher(self) -> Batcher:
        """The batcher (only after ``start``)."""
        assert self._batcher is not None, "engine not started"
        return self._batcher

    async def start(self, *, run_migrations: bool = True) -> None:
        """Connect, migrate, start the committer and the expirer. On a Citus coordinator
        the store takes the cluster's paths (engine/db/distribute.py)."""
        self._pool = await create_pool(self.dsn)
        if run_migrations:
            async with self._pool.acquire() as conn:
                applied = await migrate(conn)
                if applied:
                    log.info("applied migrations: %s", ", ".join(applied))
        async with self._pool.acquire() as conn:
            distributed = await is_distributed(conn)
        if distributed:
            log.info("on a Citus cluster: each batch is written on the worker of its ledger")
        self._store = Store(self._pool, distributed=distributed)
        self._batcher = Batcher(self._store)
        self._batcher.start()
        store = self._store
        self._expirer = asyncio.create_task(
            supervise("expirer", lambda: run_expirer(store, interval_s=self.expirer_interval_s)),
            name="onecard-expirer",
        )

    async def stop(self) -> None:
        """Drain the queue, stop background work, close the pool."""
        if self._expirer is not None:
            self._expirer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expirer
        if self._batcher is not None:
            await self._batcher.stop()
        if self._pool is not None:
            await self._pool.close()

    async def ready(self) -> bool:
        """True when the database answers within a short time."""
        if self._pool is None:
            return False
        try:
            async with asyncio.timeout(1.0), self._pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        except Exception:
            return False
        metrics.DB_POOL_SIZE.set(self._pool.get_size())
        metrics.DB_POOL_IDLE.set(self._pool.get_idle_size())
        return True

"""Read coalescing: concurrent one-row requests answered by one set-based statement.

The batcher's group commit shares one transaction among the transfers that arrive while the
previous one commits; a :class:`Coalescer` does the same for the statements around it: the
campus's hot-path reads (cards, purses, today's spending, earlier attempts, balances after)
and the terminal gateway's answer memory. A request is one ``ask``; a statement serves every
request of a ledger that gathered while the previous statement ran.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from engine import limits

_I = TypeVar("_I")
_R = TypeVar("_R")
Connection = asyncpg.Connection | PoolConnectionProxy


class Coalescer(Generic[_I, _R]):
    """Turns concurrent one-item requests into one set-based statement per ledger.

    ``run(conn, ledger, items)`` answers a batch of items in order. While one statement runs,
    the next items gather (the batcher's group commit, in small), so under load one round trip
    serves many requests and the cost per request falls as the load rises. Only one statement
    is in flight per coalescer, on one pool connection that is held while work keeps coming
    and ``linger_s`` after: a pool release costs a round trip of its own (asyncpg resets the
    session). ``session`` (if any) runs once on each connection taken.

    A failed statement answers its batch with the exception; a connection that failed is
    released and the next batch takes a fresh one; when no connection can be had, everything
    waiting is answered with that error.
    """

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        run: Callable[[Connection, int, list[_I]], Awaitable[list[_R]]],
        *,
        max_batch: int = limits.COALESCE_MAX_BATCH,
        acquire_timeout_s: float | None = limits.DB_ACQUIRE_TIMEOUT_S,
        linger_s: float = limits.COALESCE_LINGER_S,
        session: str | None = None,
        name: str = "onecard-coalescer",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be positive")
        self._pool = pool
        self._run = run
        self._max = max_batch
        self._acquire_timeout_s = acquire_timeout_s
        self._linger_s = linger_s
        self._session = session
        self._name = name
        self._pending: dict[int, list[tuple[_I, asyncio.Future[_R]]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # set when work arrives while the flush task lingers
        self.statements = 0  # statements run (tests and metrics read it)
        self.acquired = 0  # connections taken from the pool (tests read it)

    async def ask(self, ledger: int, item: _I) -> _R:
        """Queue ``item`` for ``ledger`` and wait for its result (the answer of the shared
        statement that ran it: a row read, or whether a row was written)."""
        fut: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(ledger, []).append((item, fut))
        if self._task is None:
            self._wake = asyncio.Event()  # of the running loop, whichever that is now
            self._task = asyncio.create_task(self._flush(), name=self._name)
        else:
            self._wake.set()
        return await fut

    async def _more(self) -> bool:
        """Whether there is work, waiting up to the linger for some when there is none."""
        if not self._pending and self._linger_s > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._linger_s):
                    await self._wake.wait()
        return bool(self._pending)

    def _take(self) -> tuple[int, list[tuple[_I, asyncio.Future[_R]]]]:
        ledger = next(iter(self._pending))
        queue = self._pending.pop(ledger)
        if len(queue) > self._max:
            # the rest goes to the back of the line: other ledgers' requests go first
            self._pending[ledger] = queue[self._max :]
            queue = queue[: self._max]
        return ledger, queue

    async def _flush(self) -> None:
        try:
            while self._pending:
                try:
                    async with self._pool().acquire(timeout=self._acquire_timeout_s) as conn:
                        self.acquired += 1
                        if self._session is not None:
                            await conn.execute(self._session)
                        while await self._more():
                            ledger, batch = self._take()
                            try:
                                self.statements += 1
                                results = await self._run(conn, ledger, [i for i, _ in batch])
                            except Exception as e:
                                _settle(batch, exc=e)
                                if isinstance(e, asyncpg.PostgresError) and not conn.is_closed():
                                    continue  # the statement failed, the connection did not
                                break
                            _settle(batch, results=results)
                except Exception as e:  # no connection to be had: everyone waiting hears why
                    waiting, self._pending = self._pending, {}
                    for queue in waiting.values():
                        _settle(queue, exc=e)
        finally:
            self._task = None


def _settle(
    batch: list[tuple[Any, asyncio.Future[Any]]],
    *,
    results: Sequence[Any] | None = None,
    exc: BaseException | None = None,
) -> None:
    """Answer every future of ``batch`` (a caller that went away has a done future)."""
    if results is not None and len(results) != len(batch):
        exc, results = AssertionError("a coalesced statement answered the wrong count"), None
    for n, (_, fut) in enumerate(batch):
        if fut.done():
            continue
        if results is not None:
            fut.set_result(results[n])
        else:
            fut.set_exception(exc or RuntimeError("no result"))

"""Per-key asyncio locks: a holder's terminal payments take turns within this process, from
reading today's spending until the batcher has answered, so two of them never both pass the
daily limit on the same remembered sum (likewise a room's meter advices)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable


class KeyedLocks:
    """Mutual exclusion per key (FIFO), free for a key nobody else holds: waiters are queued
    only when the key is contended, and the key's entry goes with its last user."""

    def __init__(self) -> None:
        self._queues: dict[Hashable, deque[asyncio.Future[None]]] = {}

    def hold(self, key: Hashable) -> _Held:
        """``async with locks.hold(key):`` runs the block while holding ``key``."""
        return _Held(self, key)

    async def acquire(self, key: Hashable) -> None:
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = deque()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if not fut.cancelled():  # the key was handed over just as we were cancelled
                self.release(key)
            raise

    def release(self, key: Hashable) -> None:
        queue = self._queues[key]
        while queue:
            fut = queue.popleft()
            if not fut.done():  # a waiter that was cancelled meanwhile is skipped
                fut.set_result(None)  # the key passes to it without ever being free
                return
        del self._queues[key]

    def __len__(self) -> int:
        return len(self._queues)


class _Held:
    __slots__ = ("_key", "_locks")

    def __init__(self, locks: KeyedLocks, key: Hashable) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        await self._locks.acquire(self._key)

    async def __aexit__(self, *exc: object) -> None:
        self._locks.release(self._key)

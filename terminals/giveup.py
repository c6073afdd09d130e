"""Giving up a money-moving request: its 96 made true before it is sent (contract §5 v4).

A request whose deadline passed while its work went on, or whose work failed without saying
what it did, is given up: its 96 is stored as its answer together with the request's own
reversal (``AnswerMemory.claim``), and whatever the work posted, before or after, is taken back
exactly once (``Campus.withdraw``). ``sweep`` completes, when a gateway starts, the undo that a
process which died in between left to do.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final
from uuid import UUID

import msgspec

from engine import limits
from engine.campus import Campus
from terminals.answers import Answer, AnswerMemory, given_up
from terminals.flight import Flight, landing
from terminals.iso8583 import Message, ResponseCode
from terminals.operations import Operation, original_key, rrn_for

if TYPE_CHECKING:
    import asyncpg

__all__ = ["GiveUps"]

log = logging.getLogger(__name__)

# Requests given up since $1 (engine ns): the reversals a request made of itself.
SQL_GIVEN_UP: Final = """
SELECT ledger, original_key FROM reversals
WHERE key = original_key AND created_at >= $1
ORDER BY created_at LIMIT $2
"""



class GiveUps:
    """The give-ups of one gateway and the undo of what they posted, by request key.

    ``reply`` builds the answer to a message (the gateway's, with fields 12/13 in campus time);
    ``memory`` is the gateway's answer memory, set when it starts.
    """

    def __init__(self, campus: Campus, reply: Callable[[Message, ResponseCode], Message]) -> None:
        self._campus = campus
        self._reply = reply
        self.memory: AnswerMemory | None = None
        # given-up requests whose postings are being taken back (``_settle``), by key
        self.settling: dict[UUID, asyncio.Task[None]] = {}

    async def sweep(self, pool: asyncpg.Pool) -> int:
        """Take back what the requests given up in the last GATEWAY_SWEEP_WINDOW_S may still
        have posted; returns how many there were.

        A give-up stores its 96 and its reversal first and takes the postings back after; a
        process that died in between (or stopped before the database came back) left that
        undo to do. It is idempotent, so every start simply does it again for the recent ones.
        A completion's hold is not released here (its key is not stored): it expires by itself.
        """
        since = time.time_ns() - int(limits.GATEWAY_SWEEP_WINDOW_S * 1_000_000_000)
        delay = limits.GATEWAY_GIVE_UP_RETRY_S
        while True:
            try:
                async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
                    rows = await conn.fetch(SQL_GIVEN_UP, since, limits.GATEWAY_SWEEP_MAX)
                break
            except Exception as e:
                log.warning("gateway: sweep postponed (%s)", e)
            await asyncio.sleep(delay)
            delay = min(2 * delay, limits.GATEWAY_GIVE_UP_RETRY_MAX_S)
        await asyncio.gather(*(self.withdraw(r["ledger"], r["original_key"]) for r in rows))
        if rows:
            log.info("gateway: swept %d given-up requests", len(rows))
        return len(rows)

    async def give_up(self, flight: Flight, why: str) -> Answer | None:
        """The answer to a money-moving request whose deadline passed while its work went on,
        or whose work failed without saying what it did (``why``, for the log): a ``96`` that
        is true, or the answer already stored for the request.

        The 96 is stored as the request's answer together with the request's own reversal, in
        one statement (AnswerMemory.claim), unless an answer is stored already: then that one
        is sent, it is the truth. Once the claim is stored the work still going on cannot move
        money for good: what it posted already is taken back by ``_settle``; what it posts
        later is undone by its own read of the reversal memory after posting (Campus), and
        ``_settle`` takes back again whatever is left once the work has landed; each undo has
        derived ids, so the money comes back exactly once. In this process only one answer is
        ever stored per key (``Flight.verdict``), so the late work cannot replace the 96.

        If the claim is not stored within GATEWAY_GIVE_UP_WAIT_S of the give-up (the database
        is away), it is retried in the background until it is, and then the postings are taken
        back. The 96 is sent meanwhile only if nothing but it can be stored for the key any
        more (the work found no stored answer and had not started storing its own); otherwise
        the connection is closed unanswered: the gateway does not know the truth yet, and the
        terminal's retransmission will get the stored answer. The one thing this cannot rule
        out is the same key in flight in another gateway process while the database is away.
        A work that failed has landed: all it posted is there for ``_settle`` to take back.

        Should the process die after the claim and before the undo, the undo is completed by
        the retransmission of the request (``_execute`` finds the stored 96) or by the sweep
        when a gateway starts (``sweep``).
        """
        if flight.verdict is None:
            log.warning("gateway: %s %s: given up (96, taken back)", flight.key, why)
            response = msgspec.structs.replace(
                self._reply(flight.msg, ResponseCode.SYSTEM_ERROR), rrn=rrn_for(flight.key)
            )
            if flight.fresh:
                flight.promise = Answer(flight.digest, response, True)
            flight.given_up = True
            flight.verdict = asyncio.create_task(self._claim(flight, response))
            self.settle_later(flight)
        now = asyncio.get_running_loop().time()
        if flight.answer_by is None:
            flight.answer_by = now + limits.GATEWAY_GIVE_UP_WAIT_S
        verdict = flight.verdict
        await landing(verdict, flight.answer_by - now)
        if verdict.done() and not verdict.cancelled() and verdict.exception() is None:
            return verdict.result()
        return flight.promise

    async def _claim(self, flight: Flight, response: Message) -> Answer:
        """Store ``response`` (the 96) with the request's own reversal, retried until stored."""
        assert self.memory is not None
        term = flight.term
        delay = limits.GATEWAY_GIVE_UP_RETRY_S
        while True:
            try:
                return await self.memory.claim(
                    term.ledger, flight.key, term.terminal_id, flight.digest, response
                )
            except Exception as e:
                log.warning("gateway: the 96 of %s is not stored yet (%s); retrying", flight.key, e)
            await asyncio.sleep(delay)
            delay = min(2 * delay, limits.GATEWAY_GIVE_UP_RETRY_MAX_S)

    def settle_later(self, flight: Flight) -> None:
        """Start taking back what a given-up request posted (once per key at a time)."""
        if flight.key in self.settling:
            return
        task = asyncio.create_task(self._settle(flight))
        self.settling[flight.key] = task
        task.add_done_callback(functools.partial(self._settled, flight.key))

    def _settled(self, key: UUID, task: asyncio.Task[None]) -> None:
        if self.settling.get(key) is task:
            del self.settling[key]
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("gateway: taking back %s failed", key, exc_info=exc)

    async def _settle(self, flight: Flight) -> None:
        """Once the 96 is the stored answer: take back what the request posted, and again once
        its work has landed (its own undo may have met a database error), each retried until
        done. Nothing when another answer was stored first: that one is the truth."""
        hold_key = None
        if flight.op is Operation.COMPLETION:
            hold_key = original_key(flight.term, flight.msg)
        ledger, key, task = flight.term.ledger, flight.key, flight.task
        if flight.verdict is None:  # a retransmission found the stored 96
            await self.withdraw(ledger, key, hold_key)
            return
        if not given_up(await flight.verdict):
            return
        await self.withdraw(ledger, key, hold_key)
        if task is not None and not task.done():
            await asyncio.wait([task])
            await self.withdraw(ledger, key, hold_key)

    async def withdraw(self, ledger: int, key: UUID, hold_key: UUID | None = None) -> None:
        delay = limits.GATEWAY_GIVE_UP_RETRY_S
        while not await self._campus.withdraw(ledger, key=key, hold_key=hold_key):
            await asyncio.sleep(delay)
            delay = min(2 * delay, limits.GATEWAY_GIVE_UP_RETRY_MAX_S)

    async def stop(self, grace_s: float, *, flights: Iterable[Flight]) -> None:
        """Give the undo in progress ``grace_s``, then stop it (the retransmission or the next
        start's sweep completes it) along with the claims still waiting for the database."""
        if self.settling:
            await asyncio.wait(list(self.settling.values()), timeout=grace_s)
        late: list[asyncio.Task[Any]] = [*self.settling.values()]
        late += [f.verdict for f in flights if f.verdict is not None]
        for t in late:
            t.cancel()
        if late:
            await asyncio.wait(late)

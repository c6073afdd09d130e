"""Single flight: one execution, and one stored answer, per request key in a gateway.

A request's answer is the one stored for its key (terminals/answers.py), or its work's
(terminals/work.py), stored before it is sent, or the stored 96 of a give-up
(terminals/giveup.py). Copies of one request in flight at once share one execution; a waiter
stops waiting at the deadline without ever cancelling the execution (``landing``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING

from terminals.answers import Answer, AnswerMemory, given_up
from terminals.flight import Flight, landing
from terminals.iso8583 import ResponseCode
from terminals.operations import MOVES_MONEY, NOT_REMEMBERED, message_key, request_digest
from terminals.work import work

if TYPE_CHECKING:
    from uuid import UUID

    from engine.campus import Campus, Terminal
    from terminals.giveup import GiveUps
    from terminals.iso8583 import Message
    from terminals.operations import Operation
    from terminals.replies import Replier

__all__ = ["SingleFlight"]

log = logging.getLogger(__name__)


class SingleFlight:
    """The requests of one gateway in flight, by key (``by_key``), and how many callers wait
    on them (``inflight``). ``memory`` is the gateway's answer memory, set when it starts."""

    def __init__(
        self, campus: Campus, replier: Replier, give_ups: GiveUps, *, request_timeout_s: float
    ) -> None:
        self._campus = campus
        self._replier = replier
        self._give_ups = give_ups
        self.request_timeout_s = request_timeout_s
        self.memory: AnswerMemory | None = None
        self.by_key: dict[UUID, Flight] = {}
        self.inflight = 0

    async def answer(self, term: Terminal, op: Operation, msg: Message) -> Message | None:
        """The answer to ``msg`` (an ``op`` past the gateway's checks), or None when it is not
        known whether the request moved money (the connection is then closed unanswered)."""
        assert msg.stan is not None and msg.transmission_dt is not None
        key = message_key(term.terminal_id, msg.stan, msg.transmission_dt)
        digest = request_digest(msg)
        flight = self.by_key.get(key)
        if flight is None:
            flight = Flight(term, op, key, digest, msg)
            flight.task = asyncio.create_task(self._execute(flight))
            self.by_key[key] = flight
            flight.task.add_done_callback(functools.partial(self._landed, key))
        task = flight.task
        assert task is not None
        self.inflight += 1
        try:
            # The flight is never awaited directly: a timed-out or disconnected caller must
            # not cancel posting half-way; it finishes and stores its answer for the
            # retransmission. (One future and one timer per request, which is what
            # wait_for(shield(...)) costs several times over.)
            if not flight.given_up:
                await landing(task, self.request_timeout_s)
            if task.done():
                if task.cancelled() or task.exception() is not None:  # logged once, by _landed
                    if flight.op in MOVES_MONEY:
                        return None  # whether it moved money is not known: no answer
                    return self._replier.reply(msg, ResponseCode.SYSTEM_ERROR)
                answer = task.result()
            elif flight.op in MOVES_MONEY:
                answer = await self._give_ups.give_up(flight, "still at work at the deadline")
            else:
                log.warning("gateway: no answer for %s within %.1f s", key,
                            self.request_timeout_s)
                return self._replier.reply(msg, ResponseCode.SYSTEM_ERROR)
        finally:
            self.inflight -= 1
        if answer is None:
            return None  # not known whether it moved money: no answer rather than a wrong one
        if answer.digest != digest:
            return self._replier.reply(msg, ResponseCode.DUPLICATE_DIFFERENT)
        return answer.response

    def _landed(self, key: UUID, task: asyncio.Task[Answer | None]) -> None:
        flight = self.by_key.get(key)
        verdict = None if flight is None else flight.verdict
        if verdict is not None and not verdict.done():
            # Answered with a 96 whose claim is not stored yet (the database is away): the
            # flight stays, so that a retransmission gets that 96 rather than a new execution.
            verdict.add_done_callback(functools.partial(self._forget, key, flight))
        else:
            self.by_key.pop(key, None)
        # Retrieved here, not by the waiters: they may all have timed out or gone away.
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("gateway: request %s failed", key, exc_info=exc)

    def _forget(self, key: UUID, flight: Flight | None, _: object) -> None:
        if self.by_key.get(key) is flight:
            del self.by_key[key]

    async def _execute(self, flight: Flight) -> Answer | None:
        """The answer to ``flight``'s request: the one stored for its key, or the work's (stored
        before it is sent unless it is a plain 96 or a 94, see ``NOT_REMEMBERED``), or the
        stored 96 of a give-up; None when it is not known whether the request moved money (the
        connection is then closed unanswered, and the retransmission learns the truth).

        A money-moving request whose work fails without saying what it did
        (``terminals.work.work``) is given up like one whose deadline passed
        (``GiveUps.give_up``), so its 96 is true before it is sent. If its stored answer cannot
        be looked up, an earlier attempt of the same message may have moved money and been
        answered: a 96 could be false, so there is no answer.
        If the work's own answer cannot be stored, the retransmission recomputes it from the
        ledger (every transfer id is derived from the key): no answer either.
        """
        assert self.memory is not None, "gateway not started"
        term, key, digest = flight.term, flight.key, flight.digest
        withdrawable = flight.op in MOVES_MONEY
        try:
            stored = await self.memory.lookup(term.ledger, key)
        except Exception as e:
            if not withdrawable:
                raise
            log.warning("gateway: answer of %s not looked up (%s); no answer", key, e)
            return None if flight.verdict is None else await flight.verdict
        if stored is not None:
            if given_up(stored) and withdrawable:
                self._give_ups.settle_later(flight)  # idempotent; completes one a crash cut short
            return stored
        if flight.verdict is not None:  # given up while we looked: it is the answer
            return await flight.verdict
        flight.fresh = True
        response = await work(self._campus, self._replier, flight)
        if flight.verdict is None:  # nobody gave up: this is the key's answer
            if response is None:
                return await self._give_ups.give_up(flight, "failed without saying what it did")
            if response.response_code in NOT_REMEMBERED:
                return Answer(digest, response, False)
            flight.verdict = asyncio.create_task(
                self.memory.remember(term.ledger, key, term.terminal_id, digest, response)
            )
        try:  # given up meanwhile: the late work's answer is not stored, the 96 is the answer
            return await flight.verdict
        except Exception as e:  # only storing the work's own answer can fail
            if not withdrawable:
                raise
            log.warning("gateway: answer of %s not stored (%s); no answer", key, e)
            return None

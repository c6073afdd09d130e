"""Single flight: one execution per request key in a gateway, and waiting on it unharmed.

Two copies of one request in flight at once share one execution (``Flight``); a waiter gives
up waiting after a deadline without ever cancelling the execution (``landing``), which
finishes and stores its answer for the retransmission.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uuid import UUID

    from engine.campus import Terminal
    from terminals.answers import Answer
    from terminals.iso8583 import Message
    from terminals.operations import Operation

__all__ = ["Flight", "landing"]


class Flight:
    """One execution of a request key in this gateway, and who stores its answer.

    ``verdict`` is the one task in this process that stores the key's answer: the work's own
    answer (``AnswerMemory.remember``), or the 96 of a give-up (``AnswerMemory.claim``,
    terminals/answers.py), whichever starts first; the other then takes the verdict's answer
    instead of storing its own, so the late work can never replace a 96 with an approval.
    ``fresh``: the work found no answer stored for the key. ``promise``: the 96 a give-up may
    send before its claim is stored (only when the claim is then certain to store it: the work
    was fresh and had not started storing its own answer). ``given_up``: the deadline passed or
    the work failed, and the verdict is the 96's claim (a retransmission then waits for that,
    not for the work; the flight stays registered until the claim is stored, see
    ``Gateway._landed``). ``answer_by``: when the waiters of a give-up stop waiting for the
    verdict to be stored (one moment for all of them, however each came to wait).
    """

    __slots__ = (
        "answer_by", "digest", "fresh", "given_up", "key", "msg", "op", "promise", "task", "term",
        "verdict",
    )

    def __init__(
        self, term: Terminal, op: Operation, key: UUID, digest: bytes, msg: Message
    ) -> None:
        self.term = term
        self.op = op
        self.key = key
        self.digest = digest
        self.msg = msg
        self.task: asyncio.Task[Answer | None] | None = None
        self.verdict: asyncio.Task[Answer] | None = None
        self.fresh = False
        self.given_up = False
        self.promise: Answer | None = None
        self.answer_by: float | None = None  # loop time: give-up waiters answer by then


async def landing(flight: asyncio.Future[Any], timeout_s: float) -> None:
    """Wait until ``flight`` is done or ``timeout_s`` has passed, whichever is first, without
    ever cancelling it (cancelling the waiter leaves the flight running)."""
    if flight.done():
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    flight.add_done_callback(wake)
    timer = loop.call_later(timeout_s, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        flight.remove_done_callback(wake)

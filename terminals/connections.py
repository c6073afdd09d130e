"""One terminal connection of the gateway: a reader and a writer, answers in request order.

2-byte length frames, pipelining up to a per-connection bound, an idle timeout, a write
timeout. A connection is *unverified* until one of its frames carries a good MAC for a known
terminal (the gateway calls ``frame_verified`` then): it must get there within a short
first-frame deadline, and until then a newcomer may take its slot (engine/slots.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Final, Protocol

from prometheus_client import Counter

from engine import metrics
from engine.slots import PeerSlots
from terminals.framing import FrameError, frame, read_frame

__all__ = ["GATEWAY_UNVERIFIED_DROPPED", "Connection", "ConnectionHost", "frame_verified"]

log = logging.getLogger(__name__)

GATEWAY_UNVERIFIED_DROPPED: Final = Counter(
    "onecard_gateway_unverified_dropped_total",
    "Connections closed before any frame of theirs had a good MAC: evicted to make room for a "
    "newcomer, or past the first-frame deadline.",
    ["reason"],
    registry=metrics.REGISTRY,
)

# Set by each connection's reader; every answer task it starts inherits it. ``Gateway._decide``
# calls it once a frame's MAC verified for a known terminal, which marks the connection verified
# at that moment (not when the answer is ready: a slow first purchase must not run into the
# first-frame deadline).
_ON_VERIFIED: Final[ContextVar[Callable[[], None] | None]] = ContextVar(
    "onecard_gateway_on_verified", default=None
)


def frame_verified() -> None:
    """Mark the connection whose frame is being answered verified (its MAC was good)."""
    callback = _ON_VERIFIED.get()
    if callback is not None:
        callback()


class ConnectionHost(Protocol):
    """What a connection needs of its gateway (terminals/gateway.py)."""

    first_frame_timeout_s: float
    max_frame_bytes: int
    idle_timeout_s: float
    write_timeout_s: float
    max_inflight_per_connection: int

    async def answer(self, payload: bytes) -> bytes | None:
        """The framed-payload answer to one request payload, or None to close."""
        ...


class Connection:
    """One terminal connection: a reader that dispatches frames and a writer that sends the
    answers in request order; at most ``max_inflight_per_connection`` unanswered frames.

    Unverified (evictable, see ``Gateway._on_connect``) until a frame's MAC verifies, which
    must happen within ``first_frame_timeout_s`` of the connection opening."""

    def __init__(
        self,
        gateway: ConnectionHost,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer_slots: PeerSlots[Connection],
    ) -> None:
        self.gateway = gateway
        self._peer_slots = peer_slots
        self.reader = reader
        self.writer = writer
        self._slots = asyncio.Semaphore(gateway.max_inflight_per_connection)
        self._out: asyncio.Queue[asyncio.Task[bytes | None] | None] = asyncio.Queue()
        self._read_task: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.verified = False

    def stop_reading(self) -> None:
        """Read no further frame; answers to frames already read are still sent."""
        if self._read_task is not None:
            self._read_task.cancel()

    def abort(self) -> None:
        """Drop the connection now (a stop whose grace ran out)."""
        self.writer.transport.abort()

    async def run(self) -> None:
        """Serve the connection until EOF, an error, the idle timeout, the first-frame
        deadline, an eviction or the gateway's stop."""
        self._deadline = asyncio.get_running_loop().call_later(
            self.gateway.first_frame_timeout_s, self._unverified_too_long
        )
        self._read_task = asyncio.create_task(self._read_loop())
        write_task = asyncio.create_task(self._write_loop())
        try:
            await asyncio.wait({self._read_task})
            self._out.put_nowait(None)
            await write_task
        finally:
            self._deadline.cancel()
            self._read_task.cancel()
            write_task.cancel()
            while not self._out.empty():
                pending = self._out.get_nowait()
                if pending is not None:
                    pending.cancel()  # the shielded flight behind it still finishes
            self.writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(self.gateway.write_timeout_s):
                    await self.writer.wait_closed()

    def _on_verified(self) -> None:
        if not self.verified:
            self.verified = True
            self._peer_slots.settle(self)
            if self._deadline is not None:
                self._deadline.cancel()

    def _unverified_too_long(self) -> None:
        if not self.verified:
            GATEWAY_UNVERIFIED_DROPPED.labels("first_frame_deadline").inc()
            self._peer_slots.leave(self)  # the slot is free now, not after pending answers
            self.abort()

    async def _read_loop(self) -> None:
        gw = self.gateway
        _ON_VERIFIED.set(self._on_verified)  # for the answer tasks started below
        while True:
            await self._slots.acquire()
            try:
                async with asyncio.timeout(gw.idle_timeout_s):
                    payload = await read_frame(self.reader, max_len=gw.max_frame_bytes)
            except (TimeoutError, FrameError, ConnectionError) as e:
                # FrameError leaves the stream position unknown: only closing is safe.
                log.debug("gateway: closing connection (%s)", type(e).__name__)
                return
            if payload is None:
                return
            self._out.put_nowait(asyncio.create_task(gw.answer(payload)))

    async def _write_loop(self) -> None:
        while (task := await self._out.get()) is not None:
            try:
                data = await task
            finally:
                self._slots.release()
            if data is None:
                break  # the answer is "close": nothing after it is sent
            try:
                self.writer.write(frame(data))
                async with asyncio.timeout(self.gateway.write_timeout_s):
                    await self.writer.drain()
            except (ConnectionError, TimeoutError):
                break
        if self._read_task is not None:
            self._read_task.cancel()

"""The HTTP edge: uvicorn with the deadlines and caps it lacks, and signals left to the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator

import uvicorn
from litestar.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from engine import limits

log = logging.getLogger(__name__)



class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 connection (the C parser, httptools) with the deadlines it lacks.

    uvicorn only times out idle keep-alive connections: a client that connects and sends
    nothing, trickles its head a byte at a time, stalls in its body or never reads its answers
    would hold its connection (and with enough of them, the connection cap) forever. A request
    must be read whole within ``REQUEST_READ_TIMEOUT_S`` of the connection opening or of the
    previous answer, and its head must fit in ``MAX_HEAD_BYTES``; a peer that stops reading
    answers is dropped after ``WRITE_STALL_TIMEOUT_S``. Pipelined requests are read one ahead
    at most (uvicorn pauses reading while one waits).
    """

    _read_timer: asyncio.TimerHandle | None = None
    _stall_timer: asyncio.TimerHandle | None = None
    _in_head = True  # bytes now arriving belong to a request head
    _head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # httptools has no cap on a head: one that keeps coming is refused, not buffered
        too_big = self._in_head and self._head_bytes > limits.MAX_HEAD_BYTES
        if too_big and not self.transport.is_closing():
            self.send_400_response("Request head too large.")

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm_read()  # the request is complete: from here on the time is ours
        self._in_head, self._head_bytes = True, 0  # what comes next is the next head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        read_whole = cycle is not None and not cycle.response_complete and not cycle.more_body
        if not self.transport.is_closing() and not read_whole:
            self._arm_read()  # waiting for the next request (or the rest of a pipelined one)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(limits.WRITE_STALL_TIMEOUT_S, self._drop)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        super().connection_lost(exc)

    def _arm_read(self) -> None:
        self._disarm_read()
        self._read_timer = self.loop.call_later(limits.REQUEST_READ_TIMEOUT_S, self._drop)

    def _disarm_read(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _drop(self) -> None:
        # abort, not close: a graceful close would wait for a stalled peer to read its buffer
        self.transport.abort()


class HttpServer(uvicorn.Server):
    """uvicorn, minus its signal handling.

    uvicorn re-raises a captured SIGTERM after it shuts down, which kills the process before
    the engine drains its queue and before the embedded PostgreSQL is stopped. The engine owns
    the signals instead and asks uvicorn to exit.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def request_exit(self) -> None:
        """Stop accepting and let in-flight requests finish."""
        self.should_exit = True


def http_server(app: ASGIApp, host: str, port: int) -> HttpServer:
    """A uvicorn server for ``app`` on ``host:port`` with the engine's limits, in the running
    event loop; ``serve()`` runs it until ``request_exit()``."""
    return HttpServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="none",
            lifespan="off",
            access_log=False,
            log_level="warning",
            http=GuardedHttpProtocol,
            limit_concurrency=limits.MAX_HTTP_CONNECTIONS,
            timeout_keep_alive=limits.KEEP_ALIVE_S,
            timeout_graceful_shutdown=limits.GRACEFUL_SHUTDOWN_S,
        )
    )

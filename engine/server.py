"""``onecard serve``: the engine, the HTTP API and the terminal gateway in one event loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Generator

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from engine import limits
from engine.api import create_app
from engine.campus import DEFAULT_TZ, Campus
from engine.config import tokens_from_env
from engine.service import Engine
from engine.snapshots import run_alongside

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


class _Server(uvicorn.Server):
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


async def serve(dsn: str, args: argparse.Namespace) -> None:
    """Run until SIGINT/SIGTERM; then stop accepting, drain the queue, answer it, exit."""
    admin, read = tokens_from_env(args.data_dir)
    engine = Engine(dsn)
    await engine.start()
    # One Campus for both doors: its card and terminal caches must see a report-lost made over
    # HTTP before the next swipe at a terminal.
    campus = Campus(engine, tz=os.environ.get("ONECARD_TZ") or DEFAULT_TZ)
    app = create_app(engine, admin_token=admin, read_token=read)
    app.state.campus = campus
    host, port = args.http
    server = _Server(
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
    gateway = None
    if not args.no_iso:
        # The composition root is the one place the engine reaches up to the terminal edge.
        from terminals.gateway import Gateway

        gateway = Gateway(engine, campus=campus)
        await gateway.start(*args.iso, sweep=True)
        log.info("terminal gateway on %s:%d", *args.iso)
    log.info("HTTP API on http://%s:%d (OpenAPI at /openapi.json)", host, port)
    # Both doors close at once on a signal: the gateway stops accepting and answers what it
    # has read while uvicorn does the same; the engine drains its queue after both.
    stopping: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        server.request_exit()
        if gateway is not None and not stopping:
            stopping.append(asyncio.create_task(gateway.stop(), name="onecard-gateway-stop"))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await run_alongside(server.serve(), engine.store)  # + end-of-day snapshots
    finally:
        if stopping:
            await stopping[0]
        elif gateway is not None:
            await gateway.stop()
        await engine.stop()
        await asyncio.sleep(0)

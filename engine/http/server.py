"""The HTTP edge: uvicorn with the deadlines and caps it lacks, and signals left to the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Generator
from typing import Final

import uvicorn
from litestar.types import ASGIApp
from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from engine import limits, metrics
from engine.slots import PeerSlots, peer_of

log = logging.getLogger(__name__)


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head that is over the cap."""


HTTP_EVICTED: Final = Counter(
    "onecard_http_evicted_connections_total",
    "Connections still waiting for a request head, dropped to make room for a newcomer.",
    registry=metrics.REGISTRY,
)
HTTP_REFUSED: Final = Counter(
    "onecard_http_refused_connections_total",
    "Connections closed at once: their peer was at its cap with nothing of its own to evict.",
    registry=metrics.REGISTRY,
)

# The connection slots of each running server (uvicorn shares one ServerState between the
# connections of a server and gives the protocol nothing else that is per server).
_SLOTS: Final[weakref.WeakKeyDictionary[ServerState, PeerSlots[GuardedHttpProtocol]]] = (
    weakref.WeakKeyDictionary()
)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 connection (the C parser, httptools) with the deadlines it lacks.

    uvicorn only times out idle keep-alive connections: a client that connects and sends
    nothing, trickles its head a byte at a time, stalls in its body or never reads its answers
    would hold its connection (and with enough of them, the connection cap) forever. A request
    must be read whole within ``REQUEST_READ_TIMEOUT_S`` of the connection opening or of the
    previous answer, and its head must fit in ``MAX_HEAD_BYTES``; a peer that stops reading
    answers is dropped after ``WRITE_STALL_TIMEOUT_S``. Pipelined requests are read one ahead
    at most (uvicorn pauses reading while one waits).

    Connection slots (engine/slots.py): a connection waiting for a request head is evictable,
    so a flood of silent or half-sent heads cannot make honest newcomers 503; a peer holds at
    most ``max_connections_per_peer``. The total is uvicorn's ``limit_concurrency``: uvicorn
    answers 503 to a head that arrives while that many connections are open, so evicting
    keeps one below it and only a server busy with requests on every connection says 503.
    """

    max_connections_per_peer: int = limits.HTTP_MAX_CONNECTIONS_PER_PEER  # a subclass may lower
    _slots: PeerSlots[GuardedHttpProtocol] | None = None
    _read_timer: asyncio.TimerHandle | None = None
    _stall_timer: asyncio.TimerHandle | None = None
    _in_head = True  # bytes now arriving belong to a request head
    _head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read()
        slots = _SLOTS.get(self.server_state)
        if slots is None:
            total = None if self.limit_concurrency is None else self.limit_concurrency - 1
            slots = PeerSlots(max_total=total, max_per_peer=self.max_connections_per_peer)
            _SLOTS[self.server_state] = slots
        self._slots = slots
        peer = peer_of(self.client[0] if self.client else None)
        admitted, victim = slots.admit(self, peer, overflow=True)
        if victim is not None:
            victim._evict()
        if not admitted:
            HTTP_REFUSED.inc()
            transport.close()

    def data_received(self, data: bytes) -> None:
        # A head is fed to the parser no further than the cap: one that has not ended by then
        # is too large, however its bytes were split into reads (httptools buffers a head's
        # header values without a limit of its own).
        while self._in_head and len(data) > (room := limits.MAX_HEAD_BYTES - self._head_bytes):
            if room <= 0:
                self.send_400_response("Request head too large.")
                return
            self._head_bytes += room
            super().data_received(data[:room])
            data = data[room:]
            if self.transport.is_closing():
                return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._slots is not None:
            self._slots.settle(self)  # a request is here: no longer a slot to take
        # A head that began inside a read, right after a pipelined request, was not counted
        # from its first byte: its parsed size (never more than its bytes) bounds it too.
        if self._parsed_head_bytes() > limits.MAX_HEAD_BYTES:
            raise _HeadTooLarge  # the parser stops; uvicorn answers 400 and closes
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
        idle = cycle is not None and cycle.response_complete and self._in_head
        if idle and self._slots is not None and not self.transport.is_closing():
            self._slots.unsettle(self)  # waiting for a head again: evictable, as the newest

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
        if self._slots is not None:
            self._slots.leave(self)
        super().connection_lost(exc)

    def _parsed_head_bytes(self) -> int:
        # The fewest bytes the parsed head can have taken: "METHOD URL HTTP/x.y" and a line
        # end, "name:value" and a line end per header, and the empty line.
        size = len(self.parser.get_method()) + len(self.url) + 11 + 1
        for name, value in self.headers:
            size += len(name) + len(value) + 2
        return size

    def _evict(self) -> None:
        # Its slot is taken now (uvicorn counts connections for its 503 from this set), not
        # when the abort's connection_lost runs.
        HTTP_EVICTED.inc()
        self.connections.discard(self)
        self._drop()

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

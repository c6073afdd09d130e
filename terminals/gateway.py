"""The ISO 8583 terminal gateway (contract §5): an asyncio TCP server in front of the campus.

Every frame runs the contract's checks in order, the first failure answering: format (``30``),
terminal and MAC (``63``), merchant id (``03``), then the business rules of
``engine.campus.Campus``, whose Outcome becomes field 39. Every answer carries a MAC except
the unknown-terminal ``63`` (and a ``30`` to a frame that names no known terminal); a frame
that does not decode is answered from what ``iso8583.salvage`` reads of it (fields 7, 11, 41).

Idempotency: a request's key is derived from terminal id + STAN + field 7 (``message_key``);
the campus derives every transfer id from it, so the ledger never posts a request twice, and
each financial answer is stored before it is sent (terminals/answers.py), so a retransmission
gets the identical answer and a different message under the same key gets ``94``. Two copies
of one request in flight at once share one execution (terminals/flight.py).

A ``96`` means that no money moved for that request, ever (contract §5 v4): a money-moving
request whose deadline passes or whose work fails is given up before it is answered
(terminals/giveup.py). When the gateway cannot tell whether a money-moving request moved money
(its answer memory is away) it closes the connection unanswered rather than send a 96 that
may be false. Overload (a full batcher queue or too many requests in flight) answers ``96`` at
once. Connections, their bounds and the first-frame deadline: terminals/connections.py.

The parts: operations.py (what a request is), work.py (the campus call and its answer),
replies.py, answers.py, flight.py, giveup.py, connections.py; this module runs the life cycle
and decides one frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Final
from zoneinfo import ZoneInfo

from prometheus_client import Counter, Gauge, Histogram

from engine import limits, metrics
from engine.calendar import campus_tz_name
from engine.campus import Campus
from engine.db.pool import create_pool
from engine.service import Engine
from engine.slots import PeerSlots, peer_of
from terminals.answers import AnswerMemory
from terminals.connections import GATEWAY_UNVERIFIED_DROPPED, Connection, frame_verified
from terminals.giveup import GiveUps
from terminals.iso8583 import (
    FormatError,
    Message,
    ResponseCode,
    decode_message,
    encode_message,
    encode_message_unmac,
    salvage,
)
from terminals.operations import (
    Operation,
    classify,
    is_request_mti,
)
from terminals.replies import Replier, Reply
from terminals.single_flight import SingleFlight

if TYPE_CHECKING:
    import asyncpg

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

GATEWAY_RESPONSES: Final = Counter(
    "onecard_gateway_responses_total",
    "Terminal answers sent, by response MTI and field 39.",
    ["mti", "code"],
    registry=metrics.REGISTRY,
)
GATEWAY_SECONDS: Final = Histogram(
    "onecard_gateway_request_seconds",
    "Time from a complete frame to its answer being ready.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=metrics.REGISTRY,
)
GATEWAY_CONNECTIONS: Final = Gauge(
    "onecard_gateway_connections", "Open terminal connections.", registry=metrics.REGISTRY
)
GATEWAY_REFUSED: Final = Counter(
    "onecard_gateway_refused_connections_total",
    "Connections closed at once because the gateway was full or stopping.",
    registry=metrics.REGISTRY,
)


class Gateway:
    """The terminal gateway over a started Engine. ``start``/``stop`` bracket its life."""

    def __init__(
        self,
        engine: Engine,
        *,
        campus: Campus | None = None,
        tz: str | None = None,
        max_connections: int = limits.GATEWAY_MAX_CONNECTIONS,
        max_connections_per_peer: int = limits.GATEWAY_MAX_CONNECTIONS_PER_PEER,
        first_frame_timeout_s: float = limits.GATEWAY_FIRST_FRAME_TIMEOUT_S,
        max_frame_bytes: int = limits.GATEWAY_MAX_FRAME_BYTES,
        idle_timeout_s: float = limits.GATEWAY_IDLE_TIMEOUT_S,
        write_timeout_s: float = limits.GATEWAY_WRITE_TIMEOUT_S,
        max_inflight_per_connection: int = limits.GATEWAY_MAX_INFLIGHT_PER_CONNECTION,
        max_inflight: int = limits.GATEWAY_MAX_INFLIGHT,
        request_timeout_s: float = limits.GATEWAY_REQUEST_TIMEOUT_S,
    ) -> None:
        """Configure the gateway; ``campus`` defaults to a Campus over ``engine`` in ``tz``
        (default ``$ONECARD_TZ``, else Asia/Shanghai)."""
        self.engine = engine
        self.tz = campus_tz_name(tz)
        if campus is None:
            campus = Campus(engine, tz=self.tz)
        self.campus = campus
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.first_frame_timeout_s = first_frame_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.idle_timeout_s = idle_timeout_s
        self.write_timeout_s = write_timeout_s
        self.max_inflight_per_connection = max_inflight_per_connection
        self.max_inflight = max_inflight
        self.request_timeout_s = request_timeout_s
        self._server: asyncio.Server | None = None
        self._pool: asyncpg.Pool | None = None
        self._memory: AnswerMemory | None = None
        self._connections: dict[asyncio.Task[None], Connection] = {}
        self._peer_slots: PeerSlots[Connection] = PeerSlots(
            max_total=max_connections, max_per_peer=max_connections_per_peer
        )
        # the answer builder (fields 12/13 in campus time), one per gateway
        self._replier = Replier(ZoneInfo(self.tz))
        self._reply = self._replier.reply
        self._giveups = GiveUps(self.campus, self._reply)
        self._flights = SingleFlight(
            self.campus, self._replier, self._giveups, request_timeout_s=request_timeout_s
        )
        self._sweeper: asyncio.Task[int] | None = None
        self._stopping = False
        self._counters: dict[tuple[str, str | None], Counter] = {}

    # -- life cycle ------------------------------------------------------------------------

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 8583,
        *,
        sweep: bool = False,
        reuse_port: bool = False,
    ) -> None:
        """Open the answer memory's pool and start listening on ``host:port`` (0: any).

        ``sweep`` (``onecard serve`` sets it): also take back, in the background, whatever the
        requests given up lately may still have posted (see ``sweep``). ``reuse_port``: bind
        with SO_REUSEPORT, so that the gateways of several processes share the port and the
        kernel spreads the connections among them (``onecard serve --gateway-workers``)."""
        self._pool = await create_pool(self.engine.dsn, max_size=limits.GATEWAY_DB_POOL_MAX)
        self._memory = AnswerMemory(self._pool)
        self._giveups.memory = self._flights.memory = self._memory
        self._stopping = False
        self._server = await asyncio.start_server(
            self._on_connect, host, port, backlog=limits.GATEWAY_LISTEN_BACKLOG,
            reuse_port=reuse_port,
        )
        if sweep:
            self._sweeper = asyncio.create_task(self.sweep(), name="onecard-gateway-sweep")

    async def sweep(self) -> int:
        """Take back what the requests given up lately may still have posted (see
        ``GiveUps.sweep``); returns how many there were."""
        assert self._pool is not None, "gateway not started"
        return await self._giveups.sweep(self._pool)


    @property
    def port(self) -> int:
        """The TCP port listened on (after ``start``)."""
        assert self._server is not None, "gateway not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        """Open terminal connections."""
        return len(self._connections)

    async def stop(self, *, grace_s: float = limits.GATEWAY_STOP_GRACE_S) -> None:
        """Stop accepting, stop reading, answer what was read, then close everything."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections.values()):
            conn.stop_reading()
        tasks = list(self._connections)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for t in late:
                self._connections[t].abort()
                t.cancel()
            if late:
                await asyncio.wait(late)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        flights = self._flights.by_key
        if flights:  # work whose connection went away still finishes and is stored
            await asyncio.wait([f.task for f in flights.values() if f.task], timeout=grace_s)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self._giveups.stop(grace_s, flights=self._flights.by_key.values())
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        conn = Connection(self, reader, writer, peer_slots=self._peer_slots)
        peer = peer_of(peername[0] if isinstance(peername, tuple) else None)
        admitted, victim = (False, None) if self._stopping else self._peer_slots.admit(conn, peer)
        if victim is not None:  # its slot is this newcomer's now
            GATEWAY_UNVERIFIED_DROPPED.labels("evicted").inc()
            victim.abort()
        if not admitted:  # full of verified terminals (or of this peer's), or stopping
            GATEWAY_REFUSED.inc()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = conn
        GATEWAY_CONNECTIONS.set(len(self._connections))
        try:
            await conn.run()
        finally:
            self._peer_slots.leave(conn)
            self._connections.pop(task, None)
            GATEWAY_CONNECTIONS.set(len(self._connections))

    # -- one frame -------------------------------------------------------------------------

    async def answer(self, payload: bytes) -> bytes | None:
        """The framed-payload answer to one request payload, or None to close the connection.

        Never raises for anything a peer can send.
        """
        t0 = time.perf_counter()
        try:
            reply = await self._decide(payload)
        except Exception:
            log.exception("gateway: unexpected error; closing the connection")
            return None
        if reply is None:
            return None
        msg = reply.message
        data = (
            encode_message_unmac(msg)
            if reply.mac_key is None
            else encode_message(msg, reply.mac_key)
        )
        counter = self._counters.get((msg.mti, msg.response_code))
        if counter is None:  # a labelled child per (MTI, code): looked up once, not per answer
            counter = GATEWAY_RESPONSES.labels(msg.mti, msg.response_code or "")
            self._counters[(msg.mti, msg.response_code)] = counter
        counter.inc()
        GATEWAY_SECONDS.observe(time.perf_counter() - t0)
        return data

    async def _decide(self, payload: bytes) -> Reply | None:
        try:
            decoded = decode_message(payload)
        except FormatError as e:
            log.debug("gateway: undecodable frame (%s)", e.reason)
            if not is_request_mti(payload[:4]):
                return None  # nothing to pair an answer with: a clean close
            salvaged = salvage(payload)  # fields 7, 11 and 41, as far as they can be read
            assert salvaged is not None, "a request MTI is four digits"
            return await self._format_error(salvaged)
        msg = decoded.message
        if not is_request_mti(msg.mti.encode()):
            return None  # an answer MTI sent to us: a confused peer
        try:
            op = classify(msg)
        except FormatError as e:
            log.debug("gateway: format error (%s)", e.reason)
            return await self._format_error(msg)
        assert msg.terminal_id is not None
        try:
            term = await self.campus.terminal(msg.terminal_id)
        except Exception:
            # Without the terminal there is no key to MAC a 96 with; closing tells the
            # terminal to try again just as well.
            log.warning("gateway: terminal lookup failed", exc_info=True)
            return None
        if term is None:
            return Reply(self._reply(msg, ResponseCode.MAC_FAILURE), None)
        if not decoded.verify(term.mac_key):
            return Reply(self._reply(msg, ResponseCode.MAC_FAILURE), term.mac_key)
        frame_verified()  # a terminal's own frame: its connection is no longer evictable
        if msg.merchant_id != term.merchant_id:
            return Reply(self._reply(msg, ResponseCode.INVALID_MERCHANT), term.mac_key)
        if op is Operation.SIGN_ON:
            return Reply(self._reply(msg, ResponseCode.APPROVED), term.mac_key)
        if self._overloaded():
            return Reply(self._reply(msg, ResponseCode.SYSTEM_ERROR), term.mac_key)
        answer = await self._flights.answer(term, op, msg)
        if answer is None:
            return None  # not known whether it moved money: no answer rather than a wrong one
        return Reply(answer, term.mac_key)

    async def _format_error(self, msg: Message) -> Reply | None:
        """The 30 to a malformed frame (decoded, or what ``salvage`` read of it), echoing what
        it could read, MACed whenever field 41 names a known terminal (contract §5: every
        answer to a known terminal carries a MAC; only 41 tells whose key that is)."""
        key = None
        if msg.terminal_id is not None:
            try:
                term = await self.campus.terminal(msg.terminal_id)
            except Exception:
                # Maybe a known terminal: an unMACed answer would break the rule, and closing
                # tells the terminal to try again just as well (as for a well-formed frame).
                log.warning("gateway: terminal lookup failed", exc_info=True)
                return None
            key = None if term is None else term.mac_key
        return Reply(self._reply(msg, ResponseCode.FORMAT_ERROR), key)

    def _overloaded(self) -> bool:
        batcher = self.engine.batcher
        return self._flights.inflight >= self.max_inflight or batcher.queued >= batcher.max_queued

"""Connection floods without credentials, over real TCP, against both doors with their caps
scaled down (issue 18, finding 7), and the HTTP head cap however a head arrives (finding 8).

Idle terminal connections that never send a byte, and HTTP connections that never finish a
request head, must not lock out the terminals and clients that do: a newcomer takes the slot of
a connection that has proved nothing yet (engine/slots.py), unproven terminal connections are
closed at a short first-frame deadline, and one peer address has a cap of its own. Honest
latency during each flood is printed (the figure in the README's Reliability table).

The stack runs in this process (the real HTTP edge protocol, the real gateway, the real campus
and engine on a scratch database) because the caps are constructor parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from engine import limits
from engine.campus import Campus as CampusRules
from engine.http.app import create_app
from engine.http.server import GuardedHttpProtocol
from engine.service import Engine
from terminals.client import TerminalClient
from terminals.framing import frame, read_frame
from terminals.gateway import Gateway
from terminals.iso8583 import Message, decode_message, encode_message
from tests.faults.harness import (
    ADMIN_TOKEN,
    READ,
    READ_TOKEN,
    REPO_ROOT,
    Book,
    Campus,
    Pos,
    new_book,
    open_book,
    open_campus,
    scratch_database,
    serve_app,
)

SLOTS = 64  # the total cap of each door in these tests (4096 and 1024 in production)
PER_PEER = 8  # the per-peer cap where a test is about it (512 in production)
FIRST_FRAME_S = 1.0  # the gateway's first-frame deadline here (10 s in production)
MARGIN_S = 3.0  # how late a deadline may be enforced on a loaded machine
ATTACKER_ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
FLOOD = 2 * SLOTS + 32  # attacking connections kept up at once: far beyond the slots
HONEST_P99_S = 3.0  # generous: a bound on starvation, not a speed claim (figures printed)
CAMPUS_LEDGER = 18
BOOK_LEDGER = 1818
BOOK_FIRST_ID = 1_818_000_001
PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@dataclass
class Stack:
    """The engine, an HTTP app over it, a campus set up through it, and gateways on demand."""

    engine: Engine
    rules: CampusRules
    app: Any
    campus: Campus
    book: Book
    gateways: list[Gateway] = field(default_factory=list)

    async def gateway(self, **caps: Any) -> Gateway:
        """A started gateway over the stack's campus with ``caps`` (Gateway parameters)."""
        gw = Gateway(self.engine, campus=self.rules, **caps)
        await gw.start("127.0.0.1", 0)
        self.gateways.append(gw)
        return gw

    def http(
        self, *, per_peer: int = limits.HTTP_MAX_CONNECTIONS_PER_PEER, slots: int = SLOTS
    ) -> contextlib.AbstractAsyncContextManager[str]:
        """The HTTP edge (GuardedHttpProtocol) on a free port with its caps scaled down."""
        scaled = {"max_connections_per_peer": per_peer}
        protocol = type("ScaledHttp", (GuardedHttpProtocol,), scaled)
        # uvicorn answers 503 at ``limit_concurrency`` open connections: SLOTS usable ones
        return serve_app(self.app, http=protocol, limit_concurrency=slots + 1)


@pytest.fixture(scope="module")
async def stack(admin_dsn: str) -> AsyncIterator[Stack]:
    async with scratch_database(admin_dsn) as dsn:
        engine = Engine(dsn)
        await engine.start()
        try:
            rules = CampusRules(engine)
            app = create_app(engine, admin_token=ADMIN_TOKEN, read_token=READ_TOKEN)
            app.state.campus = rules
            async with (
                serve_app(app, http=GuardedHttpProtocol) as url,
                httpx.AsyncClient(base_url=url, timeout=30) as c,
            ):
                campus = await open_campus(c, CAMPUS_LEDGER, terminals=4, holders=8)
                book = new_book(BOOK_LEDGER, BOOK_FIRST_ID, purses=2, merchants=1)
                await open_book(c, book)
            s = Stack(engine, rules, app, campus, book)
            yield s
            for gw in s.gateways:
                await gw.stop(grace_s=2)
        finally:
            await engine.stop()


# -- helpers ---------------------------------------------------------------------------------


async def _connect(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server ends the connection (EOF or reset) within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def _gone(reader: asyncio.StreamReader) -> bool:
    """Whether the server has ended the connection already (without waiting)."""
    return reader.at_eof() or reader.exception() is not None


async def _exchange(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], msg: Message, key: bytes
) -> Message:
    """One MACed request on a raw connection (any source address); its decoded answer."""
    reader, writer = conn
    writer.write(frame(encode_message(msg, key)))
    await writer.drain()
    async with asyncio.timeout(5):
        payload = await read_frame(reader)
    assert payload is not None, "the gateway closed the connection without answering"
    return decode_message(payload).message


def _terminal(gw: Gateway, pos: Pos) -> TerminalClient:
    return TerminalClient(
        "127.0.0.1",
        gw.port,
        terminal_id=pos.terminal_id,
        merchant_id=pos.merchant_id,
        mac_key=pos.key,
        timeout_s=10,
    )


def _figures(name: str, latencies: list[float], extra: str = "") -> float:
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    p50, p99 = statistics.median(latencies), q[98]
    print(
        f"\n{name}: honest p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms over {len(latencies)} requests{extra}"
    )
    return p99


async def _attack(port: int, source: str, opening: bytes, stop: asyncio.Event) -> int:
    """One attacking connection, reopened as soon as the server ends it (evicted, or cut at a
    deadline), sending ``opening`` (maybe nothing) and then nothing more; returns how many
    times it connected."""
    opened = 0
    while not stop.is_set():
        try:
            reader, writer = await _connect(port, source)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        opened += 1
        with contextlib.suppress(ConnectionError):
            if opening:
                writer.write(opening)
                await writer.drain()
            while not stop.is_set() and not await _closed_within(reader, 0.2):
                pass
        writer.close()
    return opened


async def _flood_main(port: int, n: int, opening: bytes) -> None:
    """The flood process: ``n`` attacking connections from ATTACKER_ADDRESSES until its stdin
    closes; then prints how many connections it opened."""
    stop = asyncio.Event()
    sources = ATTACKER_ADDRESSES
    tasks = [
        asyncio.create_task(_attack(port, sources[i % len(sources)], opening, stop))
        for i in range(n)
    ]
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    stop.set()
    print(sum(await asyncio.gather(*tasks)), flush=True)


class Flood:
    """FLOOD attacking connections in a process of their own (so that the attacker's work is
    not the honest clients' and the server's event loop), started by ``async with``."""

    def __init__(self, port: int, *, opening: bytes) -> None:
        self.argv = [sys.executable, "-m", __name__, str(port), str(FLOOD), opening.hex()]
        self.opened = 0
        self.started = self.lasted = 0.0
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Flood:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self._proc = proc = await asyncio.create_subprocess_exec(
            *self.argv, cwd=REPO_ROOT, env=env, stdin=PIPE, stdout=PIPE
        )
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            assert await proc.stdout.readline() == b"ready\n"
        self.started = time.monotonic()
        await asyncio.sleep(0.5)  # the flood reaches the server and fills its slots
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        self.lasted = time.monotonic() - self.started
        async with asyncio.timeout(30):
            self.opened = int(await proc.stdout.readline())
            await proc.wait()


# -- the gateway ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_idle_connections_cannot_lock_terminals_out(stack: Stack) -> None:
    """Twice the gateway's slots in connections that never send a byte, then honest terminals:
    they get in, sign on and pay; every idle connection is gone by the first-frame deadline,
    while a verified terminal's connection outlives it."""
    gw = await stack.gateway(max_connections=SLOTS, first_frame_timeout_s=FIRST_FRAME_S)
    opened = time.monotonic()
    idle = [await _connect(gw.port) for _ in range(2 * SLOTS)]
    await asyncio.sleep(0.2)
    assert gw.connections <= SLOTS
    card = stack.campus.holders[0].card_no
    latencies: list[float] = []
    keeper = _terminal(gw, stack.campus.terminals[3])
    keeper_since = time.monotonic()
    await keeper.connect()
    assert (await keeper.request(keeper.sign_on())).response_code == "00"
    for pos in stack.campus.terminals[:3]:
        async with _terminal(gw, pos) as c:
            for msg in [c.sign_on()] + [c.purchase(card, 1) for _ in range(5)]:
                t0 = time.monotonic()
                answer = await c.request(msg)
                latencies.append(time.monotonic() - t0)
                assert answer.response_code == "00", answer
    closed = await asyncio.gather(
        *(
            _closed_within(r, max(0.5, opened + FIRST_FRAME_S + MARGIN_S - time.monotonic()))
            for r, _ in idle
        )
    )
    for _, w in idle:
        w.close()
    _figures(f"gateway, {2 * SLOTS} idle connections on {SLOTS} slots", latencies)
    assert all(closed), f"{closed.count(False)} idle connections outlived the first-frame deadline"
    # verified before its deadline, so not cut by it
    await asyncio.sleep(max(0.0, keeper_since + FIRST_FRAME_S + 0.5 - time.monotonic()))
    assert (await keeper.request(keeper.purchase(card, 1))).response_code == "00"
    await keeper.close()


@pytest.mark.slow
async def test_reconnecting_flood_leaves_terminals_answered(stack: Stack) -> None:
    """A flood from four addresses that reopens every connection the gateway ends, so the
    gateway stays full and churns; terminals that connect meanwhile are answered."""
    gw = await stack.gateway(max_connections=SLOTS, first_frame_timeout_s=FIRST_FRAME_S)
    latencies: list[float] = []
    connects: list[float] = []
    card = stack.campus.holders[1].card_no
    async with Flood(gw.port, opening=b"") as flood:
        for _ in range(4):  # each terminal reconnects, as after a network blip
            for pos in stack.campus.terminals:
                t0 = time.monotonic()
                async with _terminal(gw, pos) as c:
                    connects.append(time.monotonic() - t0)
                    for msg in [c.sign_on()] + [c.purchase(card, 1) for _ in range(4)]:
                        t0 = time.monotonic()
                        answer = await c.request(msg)
                        latencies.append(time.monotonic() - t0)
                        assert answer.response_code == "00", answer
    p99 = _figures(
        f"gateway, {FLOOD} reconnecting idle connections on {SLOTS} slots",
        latencies,
        f"; connect p50 {statistics.median(connects) * 1000:.1f} ms, max "
        f"{max(connects) * 1000:.1f} ms; the flood opened {flood.opened} connections "
        f"({flood.opened / flood.lasted:.0f}/s)",
    )
    assert p99 < HONEST_P99_S, latencies


async def test_gateway_caps_connections_per_peer(stack: Stack) -> None:
    """One address holds at most its cap: beyond it a newcomer takes the place of that
    address's own oldest unverified connection, and is refused when all are verified terminals;
    another address still gets in."""
    gw = await stack.gateway(max_connections=SLOTS, max_connections_per_peer=PER_PEER)
    pos = stack.campus.terminals[0]
    client = _terminal(gw, pos)  # builds the messages; the connections are raw
    verified = [await _connect(gw.port, "127.0.0.1") for _ in range(PER_PEER)]
    for conn in verified:
        assert (await _exchange(conn, client.sign_on(), pos.key)).response_code == "00"
    reader, writer = await _connect(gw.port, "127.0.0.1")
    assert await _closed_within(reader, 2), "a connection beyond its address's cap was kept"
    writer.close()
    other = await _connect(gw.port, "127.0.0.2")
    assert (await _exchange(other, client.sign_on(), pos.key)).response_code == "00"
    # Unverified connections of an address at its cap give way to its newcomers, oldest first.
    idle = [await _connect(gw.port, "127.0.0.3") for _ in range(PER_PEER)]
    await asyncio.sleep(0.1)
    newcomer = await _connect(gw.port, "127.0.0.3")
    assert (await _exchange(newcomer, client.sign_on(), pos.key)).response_code == "00"
    assert await _closed_within(idle[0][0], 2), "the address's oldest idle connection was kept"
    assert not any(_gone(r) for r, _ in idle[1:])
    for _, w in [*verified, other, *idle, newcomer]:
        w.close()


# -- the HTTP edge ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_half_sent_heads_cannot_make_honest_requests_503(stack: Stack) -> None:
    """Connections that send half a request head and wait, reopened as soon as the server ends
    them, from four addresses and far beyond the edge's slots: honest requests, each on a new
    connection, are all answered (not 503) while the flood goes on."""
    latencies: list[float] = []
    statuses: list[int] = []
    fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection per request
    async with stack.http() as url:
        port = int(url.rsplit(":", 1)[1])
        async with (
            Flood(port, opening=PARTIAL_HEAD) as flood,
            httpx.AsyncClient(base_url=url, timeout=10, limits=fresh) as c,
        ):
            for _ in range(100):
                t0 = time.monotonic()
                r = await c.get(f"/v1/accounts/{stack.book.purses[0]}/balance", headers=READ)
                latencies.append(time.monotonic() - t0)
                statuses.append(r.status_code)
    p99 = _figures(
        f"HTTP, {FLOOD} reconnecting half-sent heads on {SLOTS} slots",
        latencies,
        f"; the flood opened {flood.opened} connections ({flood.opened / flood.lasted:.0f}/s)",
    )
    assert statuses == [200] * len(statuses), statuses
    assert p99 < HONEST_P99_S, latencies


async def test_http_caps_connections_per_peer(stack: Stack) -> None:
    """One address holds at most its cap: a newcomer beyond it takes the place of the
    address's oldest connection still waiting for a head, and is closed at once when all of
    them are busy with requests; another address is served meanwhile."""
    async with stack.http(per_peer=PER_PEER) as url:
        port = int(url.rsplit(":", 1)[1])
        busy = [await _connect(port, "127.0.0.1") for _ in range(PER_PEER)]
        body_head = (
            b"POST /v1/transfers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\nContent-Length: 1000\r\n\r\n[{"
        )
        for _, w in busy:  # complete heads, stalled bodies: requests in progress
            w.write(body_head)
        await asyncio.sleep(0.2)
        reader, writer = await _connect(port, "127.0.0.1")
        assert await _closed_within(reader, 2), "a connection beyond its address's cap was kept"
        writer.close()
        async with httpx.AsyncClient(
            base_url=url, timeout=5, transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        ) as other:
            assert (await other.get("/healthz")).status_code == 200
        idle = [await _connect(port, "127.0.0.3") for _ in range(PER_PEER)]
        await asyncio.sleep(0.1)
        async with httpx.AsyncClient(
            base_url=url, timeout=5, transport=httpx.AsyncHTTPTransport(local_address="127.0.0.3")
        ) as newcomer:
            assert (await newcomer.get("/healthz")).status_code == 200
        assert await _closed_within(idle[0][0], 2), "the address's oldest idle connection was kept"
        assert not any(_gone(r) for r, _ in idle[1:])
        for _, w in [*busy, *idle]:
            w.close()


def _head_of(size: int) -> bytes:
    """A complete GET head of exactly ``size`` bytes (padded with one header)."""
    start = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: "
    head = start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    return head


async def _status_of(port: int, head: bytes, *, chunk: int) -> bytes:
    """Send ``head`` in writes of ``chunk`` bytes, each read by the server on its own (a pause
    between writes); the status line answered, or b"" when the server just closed."""
    reader, writer = await _connect(port)
    status = b""
    with contextlib.suppress(ConnectionError):
        for i in range(0, len(head), chunk):
            writer.write(head[i : i + chunk])
            await writer.drain()
            if chunk < len(head):
                await asyncio.sleep(0.005)
        async with asyncio.timeout(5):
            status = await reader.readline()
    writer.close()
    return status


@pytest.mark.parametrize(
    "chunk", [1 << 20, 1000, 97], ids=["one write", "1000-byte writes", "97-byte writes"]
)
async def test_head_cap_holds_however_the_head_arrives(stack: Stack, chunk: int) -> None:
    """A complete head one byte over MAX_HEAD_BYTES is refused (400, or closed) whether it
    arrives in one read or in many; a head of exactly the cap is served either way."""
    cap = limits.MAX_HEAD_BYTES
    async with stack.http() as url:
        port = int(url.rsplit(":", 1)[1])
        assert (await _status_of(port, _head_of(cap), chunk=chunk)).startswith(b"HTTP/1.1 200")
        for size in (cap + 1, cap + 600, 3 * cap):
            status = await _status_of(port, _head_of(size), chunk=chunk)
            assert status.startswith(b"HTTP/1.1 400") or status == b"", (size, status)


async def test_head_cap_holds_for_a_pipelined_head(stack: Stack) -> None:
    """A large head right behind a small request in the same read (its first bytes arrive in
    the middle of a read) is refused too."""
    async with stack.http() as url:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await _connect(port)
        writer.write(_head_of(200) + _head_of(2 * limits.MAX_HEAD_BYTES))
        await writer.drain()
        async with asyncio.timeout(5):
            answers = await reader.read()
        writer.close()
        assert b"HTTP/1.1 400" in answers, answers
        assert answers.count(b"HTTP/1.1 200") <= 1, answers  # only the small one, if any


if __name__ == "__main__":  # the flood process (see Flood)
    asyncio.run(_flood_main(int(sys.argv[1]), int(sys.argv[2]), bytes.fromhex(sys.argv[3])))

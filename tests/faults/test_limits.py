"""Limits and fairness of the HTTP edge, against the real server over real sockets: body and
header size caps, the connection cap, one request at a time per connection (pipelining is
answered in order), idle and read deadlines, and proof that slow or stuck clients cannot starve
the others."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid

import httpx
import pytest

from engine import limits
from engine.limits import (
    KEEP_ALIVE_S,
    MAX_HTTP_CONNECTIONS,
    REQUEST_READ_TIMEOUT_S,
    WRITE_STALL_TIMEOUT_S,
)
from terminals.client import TerminalClient
from terminals.framing import frame
from terminals.iso8583 import encode_message
from tests.faults.conftest import IsoTarget, Target
from tests.faults.harness import ADMIN, ADMIN_TOKEN

pytestmark = pytest.mark.slow

SLOWLORIS = 40  # connections that trickle a request head
STUCK = 4  # connections that pipeline requests and never read the answers
STUCK_REQUESTS = 2000  # each; ~40 MiB of answers, far beyond what socket buffers hold
PROBES = 60  # well-behaved requests measured while they misbehave
FAIR_P95_S = 0.5  # a well-behaved request's 95th percentile latency meanwhile
MARGIN_S = 3.0  # how late the server may be in enforcing a deadline


async def _open(
    target: Target, *, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = target.server.http_port
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _closed_by_server(reader: asyncio.StreamReader, within_s: float) -> float:
    """Seconds until the server closes the connection (reading and discarding everything)."""
    t0 = time.monotonic()
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(within_s):
            while await reader.read(65536):
                pass
    return time.monotonic() - t0


def _head(method: str, path: str, *, length: int | None = None, extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {ADMIN_TOKEN}"]
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


async def test_body_and_header_caps(target: Target) -> None:
    big = b"[" + b"0," * (limits.MAX_BODY_BYTES // 2) + b"0]"
    assert len(big) > limits.MAX_BODY_BYTES
    async with httpx.AsyncClient(base_url=target.url, timeout=30, headers=ADMIN) as c:
        r = await c.post("/v1/transfers", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text

        async def chunks() -> object:  # no Content-Length: the cap must hold while streaming
            for i in range(0, len(big), 65536):
                yield big[i : i + 65536]

        r = await c.post(
            "/v1/transfers", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413, r.text
        assert (await c.get("/healthz")).status_code == 200
    # An oversized head (arriving in pieces, as a slow or hostile client sends it) is refused
    # once the unparsed part passes the cap, not buffered without end.
    reader, writer = await _open(target)
    t0 = time.monotonic()
    writer.write(_head("GET", "/healthz")[:-2])
    with contextlib.suppress(ConnectionError):
        for _ in range(8):
            writer.write(b"X-Filler: " + b"a" * 10_000 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
    status = b""
    with contextlib.suppress(ConnectionError):
        status = await reader.readline()
    writer.close()
    assert status.startswith(b"HTTP/1.1 400") or status == b"", status  # refused, not served
    assert time.monotonic() - t0 < REQUEST_READ_TIMEOUT_S / 2  # by the cap, not the deadline


async def test_pipelined_requests_are_answered_one_at_a_time_in_order(target: Target) -> None:
    reader, writer = await _open(target)
    ids = [str(uuid.uuid4()) for _ in range(50)]
    writer.write(b"".join(_head("GET", f"/v1/transfers/{i}") for i in ids))
    await writer.drain()
    answers: list[str] = []
    async with asyncio.timeout(10):
        while len(answers) < len(ids):
            status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 404"), status
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            answers.append((await reader.readexactly(length)).decode())
    assert [i in a for i, a in zip(ids, answers, strict=True)] == [True] * len(ids)
    writer.close()


async def test_connection_cap(target: Target) -> None:
    """At most MAX_HTTP_CONNECTIONS are open (uvicorn answers 503 at that many, so one fewer
    are served). A newcomer takes the slot of a connection still waiting for its request head
    (issue 18: idle connections must not make honest requests 503); when every connection is
    busy with a request, nothing gives way and the newcomer is answered 503 at once."""
    sources = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")  # each under its peer cap
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for i in range(MAX_HTTP_CONNECTIONS - 1):
            held.append(await _open(target, source=sources[i % len(sources)]))
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=target.url, timeout=5) as c:
            assert (await c.get("/healthz")).status_code == 200  # a slot given up, not a 503
        await asyncio.sleep(0.3)
        gave_way = [r for r, _ in held if r.at_eof() or r.exception() is not None]
        assert len(gave_way) == 1, len(gave_way)  # one idle connection, and only one
    finally:
        for _, w in held:
            w.close()
    await asyncio.sleep(0.5)
    busy: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for i in range(MAX_HTTP_CONNECTIONS - 1):  # complete heads, stalled bodies
            busy.append(await _open(target, source=sources[i % len(sources)]))
            busy[-1][1].write(_head("POST", "/v1/transfers", length=10_000) + b"[{")
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=target.url, timeout=5) as c:
            t0 = time.monotonic()
            with contextlib.suppress(httpx.TransportError):
                r = await c.get("/healthz")
                assert r.status_code == 503, r.status_code  # over the cap: refused at once
            assert time.monotonic() - t0 < 2
    finally:
        for _, w in busy:
            w.close()
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(base_url=target.url, timeout=5) as c:
        assert (await c.get("/healthz")).status_code == 200


async def test_slow_and_stuck_clients_do_not_starve_others(target: Target) -> None:
    """Trickling heads, stalled bodies, silent connections, peers that never read their
    answers and an idle keep-alive connection, all at once: meanwhile well-behaved requests
    stay fast, and the server cuts every misbehaving or idle connection within its deadline."""
    kept = await _open(target)  # one honest request, then an idle keep-alive connection
    kept[1].write(_head("GET", "/healthz"))
    assert (await kept[0].readline()).startswith(b"HTTP/1.1 200")
    idle = asyncio.create_task(_closed_by_server(kept[0], KEEP_ALIVE_S + MARGIN_S))
    silent = [await _open(target) for _ in range(5)]
    slow_body = [await _open(target) for _ in range(5)]
    for _, w in slow_body:
        w.write(_head("POST", "/v1/transfers", length=10_000) + b"[{")
    async with httpx.AsyncClient(base_url=target.url) as c:
        answer_size = len((await c.get("/openapi.json")).content)
    t_start = time.monotonic()
    stuck = [await _open(target) for _ in range(STUCK)]
    for _, w in stuck:  # far more answer bytes than socket buffers hold; never read (yet)
        w.write(_head("GET", "/openapi.json") * STUCK_REQUESTS)
    loris = [await _open(target) for _ in range(SLOWLORIS)]
    stop = asyncio.Event()

    async def trickle(w: asyncio.StreamWriter) -> None:
        head = _head("GET", "/healthz", extra="X-Slow: " + "a" * 200 + "\r\n")
        with contextlib.suppress(ConnectionError):
            for i in range(len(head)):
                if stop.is_set():
                    return
                w.write(head[i : i + 1])
                await w.drain()
                await asyncio.sleep(0.25)

    trickles = [asyncio.create_task(trickle(w)) for _, w in loris]
    cut = [
        asyncio.create_task(_closed_by_server(r, REQUEST_READ_TIMEOUT_S + MARGIN_S))
        for r, _ in [*silent, *slow_body, *loris]
    ]
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=target.url, timeout=5, headers=ADMIN) as c:
        for _ in range(PROBES):
            t0 = time.monotonic()
            r = await c.get(f"/v1/accounts/{target.book.purses[0]}/balance")
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
            await asyncio.sleep(0.05)
    await asyncio.sleep(max(0.0, WRITE_STALL_TIMEOUT_S + MARGIN_S - (time.monotonic() - t_start)))
    stuck_read = [await _read_until_closed(r) for r, _ in stuck]
    cut_after = await asyncio.gather(*cut)
    idle_closed_after = await idle
    kept[1].close()
    stop.set()
    for t in trickles:
        t.cancel()
    for _, w in [*silent, *slow_body, *loris, *stuck]:
        w.close()
    p95 = statistics.quantiles(latencies, n=20)[-1]
    print(
        f"\nfairness: p95 {p95 * 1000:.0f} ms; cut after {max(cut_after):.1f}s; stuck peers "
        f"got {max(stuck_read) >> 20} of {(answer_size * STUCK_REQUESTS) >> 20} MiB"
    )
    assert p95 < FAIR_P95_S, latencies
    assert idle_closed_after < KEEP_ALIVE_S + MARGIN_S  # idle keep-alive closed in time
    assert max(cut_after) < REQUEST_READ_TIMEOUT_S + MARGIN_S, cut_after
    assert min(cut_after) > REQUEST_READ_TIMEOUT_S - 1, cut_after  # not before the deadline
    # Dropped, not served: a peer that reads again later finds the connection gone.
    assert max(stuck_read) < answer_size * STUCK_REQUESTS, "a stuck peer was never dropped"


async def _read_until_closed(reader: asyncio.StreamReader) -> int:
    """Bytes read until the server ends the connection (EOF or reset)."""
    n = 0
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(30):
            while chunk := await reader.read(1 << 20):
                n += len(chunk)
    return n


async def test_slow_and_stuck_terminals_do_not_starve_others(iso_target: IsoTarget) -> None:
    """On the gateway: terminals that trickle a frame, connect and say nothing, or pipeline
    far past the per-connection bound without reading, while honest terminals pay. The honest
    ones stay fast."""
    port = iso_target.port
    campus = iso_target.campus
    t = campus.terminals[3]
    sign_on = TerminalClient(
        "127.0.0.1", port, terminal_id=t.terminal_id, merchant_id=t.merchant_id, mac_key=t.key
    ).sign_on()
    one = frame(encode_message(sign_on, t.key))
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    stuck = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    for _, w in stuck:
        w.write(one * 500)  # 500 pipelined frames, answers never read
    loris = [await asyncio.open_connection("127.0.0.1", port) for _ in range(SLOWLORIS)]
    stop = asyncio.Event()

    async def trickle(w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            for i in range(len(one)):
                if stop.is_set():
                    return
                w.write(one[i : i + 1])
                await w.drain()
                await asyncio.sleep(0.2)

    trickles = [asyncio.create_task(trickle(w)) for _, w in loris]
    latencies: list[float] = []
    for pos in campus.terminals[:3]:
        async with TerminalClient(
            "127.0.0.1",
            port,
            terminal_id=pos.terminal_id,
            merchant_id=pos.merchant_id,
            mac_key=pos.key,
            timeout_s=5,
        ) as c:
            for _ in range(PROBES // 3):
                t0 = time.monotonic()
                ans = await c.request(c.purchase(campus.holders[2].card_no, 1))
                latencies.append(time.monotonic() - t0)
                assert ans.response_code == "00"
                await asyncio.sleep(0.05)
    stop.set()
    for task in trickles:
        task.cancel()
    for _, w in [*silent, *stuck, *loris]:
        w.close()
    p95 = statistics.quantiles(latencies, n=20)[-1]
    print(f"\ngateway fairness: p95 {p95 * 1000:.0f} ms over {len(latencies)} purchases")
    assert p95 < FAIR_P95_S, latencies

"""The engine under test in its own process (``onecard serve``), and a lean HTTP/1.1 client.

The server runs in a separate process so the load generator does not share its event loop.
The client is a minimal keep-alive HTTP/1.1 client over asyncio streams: a general-purpose
client costs more CPU per request than the server's handler, and on a 2-core machine that would
measure the generator rather than the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Final

import msgspec

ADMIN_TOKEN: Final = "bench-admin-token"
READ_TOKEN: Final = "bench-read-token"
START_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 30.0
HTTP_TIMEOUT_S: Final = 30.0
MAX_HEADER_BYTES: Final = 64 * 1024
_CODE_ROOT: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HttpError(Exception):
    """A non-2xx answer or a broken exchange."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class Http:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, host: str, port: int, *, token: str = ADMIN_TOKEN) -> None:
        self.host = host
        self.port = port
        self._auth = f"Authorization: Bearer {token}\r\n".encode()
        self._host_hdr = f"Host: {host}:{port}\r\n".encode()
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        """Open the connection."""
        self._r, self._w = await asyncio.open_connection(self.host, self.port)
        sock = self._w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def close(self) -> None:
        """Close the connection."""
        w, self._r, self._w = self._w, None, None
        if w is not None:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()

    async def request(
        self, method: str, path: str, body: bytes | None = None, *, extra: str = ""
    ) -> tuple[int, bytes]:
        """Send one request (``extra``: more header lines, each ending in CRLF); returns
        (status, body). Reconnects once if the server closed an idle connection."""
        if self._w is None:
            await self.connect()
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host_hdr, self._auth,
                extra.encode()]
        if body is not None:
            head.append(b"Content-Type: application/json\r\n")
            head.append(f"Content-Length: {len(body)}\r\n".encode())
        head.append(b"\r\n")
        if body is not None:
            head.append(body)
        data = b"".join(head)
        try:
            return await self._exchange(data)
        except (ConnectionError, asyncio.IncompleteReadError):
            await self.close()
            await self.connect()
            return await self._exchange(data)

    async def _exchange(self, data: bytes) -> tuple[int, bytes]:
        assert self._r is not None and self._w is not None
        self._w.write(data)
        async with asyncio.timeout(HTTP_TIMEOUT_S):
            raw = await self._r.readuntil(b"\r\n\r\n")
            if len(raw) > MAX_HEADER_BYTES:
                raise HttpError(0, raw[:200])
            lines = raw.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            length = 0
            chunked = False
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            payload = await (self._chunked() if chunked else self._r.readexactly(length))
        if close:
            await self.close()
        return status, payload

    async def _chunked(self) -> bytes:
        assert self._r is not None
        parts: list[bytes] = []
        while True:
            size = int((await self._r.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                await self._r.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self._r.readexactly(size))
            await self._r.readexactly(2)

    async def post_json(self, path: str, body: bytes) -> bytes:
        """POST and return the body of a 200 answer; HttpError otherwise."""
        status, payload = await self.request("POST", path, body)
        if status != 200:
            raise HttpError(status, payload)
        return payload

    async def get(self, path: str) -> bytes:
        """GET and return the body of a 200 answer; HttpError otherwise."""
        status, payload = await self.request("GET", path)
        if status != 200:
            raise HttpError(status, payload)
        return payload


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server(msgspec.Struct, kw_only=True):
    """A running ``onecard serve`` process."""

    host: str
    http_port: int
    iso_port: int | None
    pid: int


@contextlib.asynccontextmanager
async def serve(dsn: str, *, iso: bool = False, gateway_workers: int = 1
                ) -> AsyncIterator[Server]:
    """Run ``onecard serve`` on free ports against ``dsn`` (``gateway_workers``: its terminal
    gateway processes) until the block ends, then stop it with SIGTERM (it drains its queue,
    and stops its workers) and reap it."""
    http_port = free_port()
    iso_port = None
    while iso and iso_port in (None, http_port):  # two calls may give one port
        iso_port = free_port()
    with tempfile.TemporaryDirectory(prefix="onecard-bench-") as data_dir:
        argv = [
            sys.executable, "-c", "import sys; from engine.cli import main; sys.exit(main())",
            "serve", "--dsn", dsn, "--data-dir", data_dir, "--http", f"127.0.0.1:{http_port}",
        ]
        argv += ["--iso", f"127.0.0.1:{iso_port}"] if iso_port else ["--no-iso"]
        if gateway_workers > 1:
            argv += ["--gateway-workers", str(gateway_workers)]
        env = {
            **os.environ,
            # the server runs the code this bench was loaded from, whatever the working
            # directory and whatever copy of onecard is installed
            "PYTHONPATH": os.pathsep.join(
                p for p in (_CODE_ROOT, os.environ.get("PYTHONPATH", "")) if p
            ),
            "ONECARD_ADMIN_TOKEN": ADMIN_TOKEN,
            "ONECARD_READ_TOKEN": READ_TOKEN,
        }
        proc = _spawn(argv, env, os.path.join(data_dir, "serve.log"))
        try:
            await _wait_ready("127.0.0.1", http_port, proc)
            yield Server(host="127.0.0.1", http_port=http_port, iso_port=iso_port, pid=proc.pid)
        finally:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            if proc.returncode not in (0, -15):
                tail = _tail(os.path.join(data_dir, "serve.log"))
                print(f"onecard serve exited {proc.returncode}:\n{tail}", file=sys.stderr)


def _spawn(argv: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def _tail(path: str) -> str:
    with open(path, "rb") as f:
        return f.read()[-3000:].decode(errors="replace")


async def _wait_ready(host: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"onecard serve exited {proc.returncode} before it was ready")
        h = Http(host, port)
        try:
            status, _ = await h.request("GET", "/healthz")
            if status == 200:
                return
        except OSError:
            pass
        finally:
            await h.close()
        await asyncio.sleep(0.1)
    raise RuntimeError("onecard serve did not become ready")


async def server_batch_probe(host: str, port: int) -> tuple[float, float]:
    """(sum, count) of the server's batch size histogram, scraped from /metrics."""
    h = Http(host, port)
    try:
        text = (await h.get("/metrics")).decode()
    finally:
        await h.close()
    s = c = 0.0
    for line in text.splitlines():
        if line.startswith("onecard_batch_transfers_sum "):
            s = float(line.split()[1])
        elif line.startswith("onecard_batch_transfers_count "):
            c = float(line.split()[1])
    return s, c


def rss_mb(pid: int) -> float:
    """Current RSS of a process, MiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):  # peak RSS ("high water mark")
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0

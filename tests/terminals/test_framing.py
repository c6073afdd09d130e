"""Length-prefixed framing over a real TCP socket."""

from __future__ import annotations

import asyncio

import pytest

from terminals.framing import MAX_FRAME_BYTES, FrameError, frame, read_frame

Result = bytes | None | FrameError


async def _server_reads(chunks: list[bytes], *, max_len: int = MAX_FRAME_BYTES) -> list[Result]:
    """Send ``chunks`` to a fresh server, close, and return what read_frame saw."""
    results: list[Result] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    payload = await read_frame(reader, max_len=max_len)
                except FrameError as exc:
                    results.append(exc)
                    return
                results.append(payload)
                if payload is None:
                    return
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.01)  # let the server see partial data
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(5):
            await done.wait()
    finally:
        server.close()
        await server.wait_closed()
    return results


def test_frame_prefixes_big_endian_length() -> None:
    assert frame(b"abc") == b"\x00\x03abc"
    assert frame(b"x" * 300)[:2] == b"\x01\x2c"


@pytest.mark.parametrize("payload", [b"", b"x" * 65536])
def test_frame_rejects(payload: bytes) -> None:
    with pytest.raises(FrameError):
        frame(payload)


async def test_good_frames_then_clean_eof() -> None:
    big = bytes(range(256)) * 4
    assert len(big) == MAX_FRAME_BYTES
    results = await _server_reads([frame(b"abc"), frame(big), frame(b"z")])
    assert results == [b"abc", big, b"z", None]


async def test_frame_split_across_writes() -> None:
    data = frame(b"hello world")
    assert await _server_reads([data[:1], data[1:5], data[5:]]) == [b"hello world", None]


async def test_immediate_eof_is_none() -> None:
    assert await _server_reads([]) == [None]


async def test_oversize_length() -> None:
    results = await _server_reads([(MAX_FRAME_BYTES + 1).to_bytes(2, "big") + b"x" * 10])
    assert isinstance(results[0], FrameError)
    assert "exceeds" in results[0].reason


async def test_custom_max_len() -> None:
    results = await _server_reads([frame(b"12345"), frame(b"123456")], max_len=5)
    assert results[0] == b"12345"
    assert isinstance(results[1], FrameError)


async def test_zero_length() -> None:
    results = await _server_reads([b"\x00\x00"])
    assert isinstance(results[0], FrameError)
    assert "zero" in results[0].reason


async def test_eof_mid_frame() -> None:
    results = await _server_reads([frame(b"ok"), b"\x00\x05ab"])
    assert results[0] == b"ok"
    assert isinstance(results[1], FrameError)
    assert "EOF after 2 of 5" in results[1].reason


async def test_eof_inside_length_prefix() -> None:
    results = await _server_reads([b"\x00"])
    assert isinstance(results[0], FrameError)

"""Length-prefixed framing for the terminal gateway (contract §5).

Every message on the TCP stream is preceded by its length as a 2-byte big-endian integer.
After a FrameError the stream position is unknown, so the only safe reaction is to close
the connection.
"""

from __future__ import annotations

import asyncio
from typing import Final

__all__ = ["LENGTH_PREFIX_BYTES", "MAX_FRAME_BYTES", "FrameError", "frame", "read_frame"]

LENGTH_PREFIX_BYTES: Final = 2
# The largest message of the profile is well under 400 bytes; 1 KiB leaves headroom while
# bounding what a misbehaving peer can make us buffer.
MAX_FRAME_BYTES: Final = 1024
_PREFIX_MAX: Final = (1 << (8 * LENGTH_PREFIX_BYTES)) - 1


class FrameError(ValueError):
    """A frame violates the length-prefix rules; ``reason`` is a short description."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its 2-byte big-endian length.

    Raises FrameError for an empty payload or one too long for the prefix.
    """
    if not payload:
        raise FrameError("empty payload")
    if len(payload) > _PREFIX_MAX:
        raise FrameError(f"payload of {len(payload)} bytes does not fit the length prefix")
    return len(payload).to_bytes(LENGTH_PREFIX_BYTES, "big") + payload


async def read_frame(
    reader: asyncio.StreamReader, *, max_len: int = MAX_FRAME_BYTES
) -> bytes | None:
    """Read one frame and return its payload, or None on a clean EOF between frames.

    Raises FrameError on a zero length, a length above ``max_len``, or EOF inside a frame.
    """
    try:
        prefix = await reader.readexactly(LENGTH_PREFIX_BYTES)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError("EOF inside the length prefix") from None
    length = int.from_bytes(prefix, "big")
    if length == 0:
        raise FrameError("zero-length frame")
    if length > max_len:
        # Refuse before reading: the declared length is attacker-controlled.
        raise FrameError(f"frame of {length} bytes exceeds the maximum of {max_len}")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise FrameError(f"EOF after {len(exc.partial)} of {length} frame bytes") from None

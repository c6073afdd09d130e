"""Passwords as Argon2id hashes (``argon2-cffi``), hashed and checked off the event loop.

One hash costs ~50 ms of CPU and 64 MiB (``limits.ARGON2_*``): it runs in a worker thread, at
most ``MAX_CONCURRENT_PASSWORD_HASHES`` at once, so a burst of logins never stalls the terminals
sharing the event loop. A check against an unknown user still hashes (a dummy hash), so the answer
takes as long whether or not the name exists.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from engine import limits

_HASHER: Final = PasswordHasher(
    time_cost=limits.ARGON2_TIME_COST,
    memory_cost=limits.ARGON2_MEMORY_KIB,
    parallelism=limits.ARGON2_PARALLELISM,
)
_slots: asyncio.Semaphore | None = None
_slots_loop: asyncio.AbstractEventLoop | None = None


class PasswordRejected(ValueError):
    """A password that may not be set (too short, too long, or not text)."""


def check_new_password(password: str, *, min_chars: int) -> None:
    """Raise PasswordRejected unless ``password`` may be set."""
    if len(password) < min_chars:
        raise PasswordRejected(f"a password has at least {min_chars} characters")
    try:
        encoded = password.encode("utf-8")
    except UnicodeEncodeError:
        raise PasswordRejected("a password is text") from None
    if len(encoded) > limits.MAX_PASSWORD_BYTES:
        raise PasswordRejected(f"a password has at most {limits.MAX_PASSWORD_BYTES} bytes")


def hash_now(secret: str) -> str:
    """The Argon2id hash of ``secret`` (blocking: for the CLI and for worker threads)."""
    return _HASHER.hash(secret)


def verify_now(stored: str, secret: str) -> bool:
    """Whether ``secret`` matches the stored hash (blocking). A malformed hash never matches."""
    try:
        return _HASHER.verify(stored, secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@functools.cache
def _dummy() -> str:
    """A hash of nothing anybody knows: checked against when the user does not exist, so that
    answer costs the same time as a wrong password (made on first use, not at import)."""
    return hash_now("onecard: no such user")


def _semaphore() -> asyncio.Semaphore:
    global _slots, _slots_loop
    loop = asyncio.get_running_loop()
    if _slots is None or _slots_loop is not loop:
        _slots = asyncio.Semaphore(limits.MAX_CONCURRENT_PASSWORD_HASHES)
        _slots_loop = loop
    return _slots


async def hash_password(secret: str) -> str:
    """The Argon2id hash of ``secret``, computed in a worker thread."""
    async with _semaphore():
        return await asyncio.to_thread(hash_now, secret)


async def verify_password(stored: str | None, secret: str) -> bool:
    """Whether ``secret`` matches ``stored`` (None: no such user; hashes anyway), in a worker
    thread. A secret too long to be a password never matches (and is not hashed whole)."""
    if len(secret) > limits.MAX_PASSWORD_BYTES:
        secret, stored = secret[: limits.MAX_PASSWORD_BYTES], None
    async with _semaphore():
        ok = await asyncio.to_thread(verify_now, stored or _dummy(), secret)
    return ok and stored is not None

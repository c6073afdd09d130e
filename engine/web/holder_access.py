"""The holders' password store (engine/access, contract §6) behind the /self pages: the login's
``Verifier`` and the activation page's ``Activator``.

The store keeps Argon2id hashes, the one-time activation codes and the lockout (five failures
within 15 minutes lock the holder id for 15 minutes); these adapters only translate its answers
into the pages' outcomes, with the web clock (epoch seconds) as its ``now`` (nanoseconds).
A try refused by the process-wide bound on tries (a spray over many ids) reads as a lock of a
moment: the page asks to wait, and nothing was tried.
"""

from __future__ import annotations

import math
from typing import Final

from engine.access.holders import activate, check_holder_password
from engine.access.lockout import LoginOutcome as StoreOutcome
from engine.service import Engine
from engine.web.auth import Activation, ActivationOutcome, LoginOutcome, Verdict

_NS: Final = 1_000_000_000
_BUSY_S: Final = 1  # a try refused by the process-wide bound: "try again in a moment"


def _ns(now: float) -> int:
    return int(now * _NS)


def _wait_s(locked_until: int, now_ns: int) -> int:
    return max(1, math.ceil((locked_until - now_ns) / _NS))


async def holder_verifier(engine: Engine, subject: str, password: str, *, now: float) -> Verdict:
    """The /self login: the holder's password (engine.access.holders)."""
    at = _ns(now)
    r = await check_holder_password(engine.store.pool, subject, password, now=at)
    if r.outcome is StoreOutcome.OK and r.holder_id:
        return Verdict(LoginOutcome.OK, subject=r.holder_id)
    if r.outcome is StoreOutcome.LOCKED:
        return Verdict(LoginOutcome.LOCKED, retry_after_s=_wait_s(r.locked_until, at))
    if r.outcome is StoreOutcome.RATE_LIMITED:
        return Verdict(LoginOutcome.LOCKED, retry_after_s=_BUSY_S)
    return Verdict(LoginOutcome.WRONG)


async def holder_activator(
    engine: Engine, holder_id: str, code: str, password: str, *, now: float
) -> Activation:
    """/self/activate: the one-time code becomes the holder's first password."""
    at = _ns(now)
    r = await activate(engine.store.pool, holder_id, code, password, now=at)
    if r.outcome is StoreOutcome.OK:
        return Activation(ActivationOutcome.OK)
    if r.outcome is StoreOutcome.REJECTED:
        return Activation(ActivationOutcome.SHORT)
    if r.outcome is StoreOutcome.LOCKED:
        return Activation(ActivationOutcome.LOCKED, retry_after_s=_wait_s(r.locked_until, at))
    if r.outcome is StoreOutcome.RATE_LIMITED:
        return Activation(ActivationOutcome.LOCKED, retry_after_s=_BUSY_S)
    return Activation(ActivationOutcome.WRONG)

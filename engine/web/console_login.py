"""The console's login (``operator_verifier``): the CONSOLE portal's ``auth.Verifier``, asking
the operators' store (engine/access/operators.py: Argon2id hashes, the lockout of contract §7,
the engine's global attempt bound). Imports nothing of the web pages but ``auth``: the web
state installs it."""

from __future__ import annotations

from typing import Final

from engine import limits
from engine.access import operators
from engine.access.lockout import LoginOutcome as AccessOutcome
from engine.service import Engine
from engine.web.auth import LoginOutcome, Verdict

_NS: Final = 1_000_000_000


async def operator_verifier(
    engine: Engine, subject: str, password: str, *, now: float
) -> Verdict:
    """The console's login: an operator's username and password (lockout included)."""
    answer = await operators.check_operator_password(
        engine.store.pool, subject, password, now=int(now * _NS)
    )
    if answer.outcome is AccessOutcome.OK and answer.operator is not None:
        return Verdict(LoginOutcome.OK, subject=answer.operator.username)
    if answer.outcome is AccessOutcome.LOCKED:
        left_s = max(1, -(-(answer.locked_until - int(now * _NS)) // _NS))
        return Verdict(LoginOutcome.LOCKED, retry_after_s=left_s)
    if answer.outcome is AccessOutcome.RATE_LIMITED:  # the whole engine is busy with logins
        return Verdict(LoginOutcome.LOCKED, retry_after_s=limits.WEB_LOGIN_BUSY_RETRY_S)
    return Verdict(LoginOutcome.WRONG)

"""What the login pages ask of whoever keeps the passwords (the roles work, engine/access).

The web foundation checks no password itself: a login form hands the typed id and password to
a ``Verifier`` and starts a session for the subject it returns. The verifier owns password
hashes, operators, holders' activation and the lockout rule (§7: five failures in 15 minutes
lock the id for 15 minutes); the page only says which of its outcomes happened.

Until a verifier is installed for a portal (``state.WebState.verifiers``), every login is
refused: a missing password store never opens a door.
"""

from __future__ import annotations

import enum
from typing import Protocol

import msgspec

from engine.service import Engine


class LoginOutcome(enum.StrEnum):
    """How a login attempt ended."""

    OK = "ok"
    WRONG = "wrong"  # unknown id or wrong password: the page does not say which
    LOCKED = "locked"  # too many failures; the right password does not get in meanwhile


class Verdict(msgspec.Struct, frozen=True):
    """A verifier's answer. ``subject`` (OK only) is the id the session is for, as stored
    (a holder id, an operator's username); ``retry_after_s`` (LOCKED only) is shown."""

    outcome: LoginOutcome
    subject: str | None = None
    retry_after_s: int | None = None


class Verifier(Protocol):
    """Checks a typed id and password at ``now`` (epoch seconds, the web clock)."""

    async def __call__(
        self, engine: Engine, subject: str, password: str, *, now: float
    ) -> Verdict: ...


async def refuse_all(engine: Engine, subject: str, password: str, *, now: float) -> Verdict:
    """The verifier of a portal nobody installed one for."""
    return Verdict(LoginOutcome.WRONG)


class ActivationOutcome(enum.StrEnum):
    """How an activation (``/self/activate``: a one-time code turned into a password) ended."""

    OK = "ok"
    WRONG = "wrong"  # unknown holder, wrong, used or expired code: the page does not say which
    LOCKED = "locked"  # too many failures (the login's lockout)
    SHORT = "short"  # the new password is too short (nothing was tried)


class Activation(msgspec.Struct, frozen=True):
    """An activator's answer; ``retry_after_s`` (LOCKED only) is shown."""

    outcome: ActivationOutcome
    retry_after_s: int | None = None


class Activator(Protocol):
    """Sets a holder's first password with the activation code, at ``now`` (epoch seconds)."""

    async def __call__(
        self, engine: Engine, holder_id: str, code: str, password: str, *, now: float
    ) -> Activation: ...


async def refuse_activation(
    engine: Engine, holder_id: str, code: str, password: str, *, now: float
) -> Activation:
    """The activator of a server nobody installed one for."""
    return Activation(ActivationOutcome.WRONG)

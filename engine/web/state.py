"""The web pages' per-application settings, kept in the Litestar app's state.

Made on first use from the environment, so ``create_app`` needs no new parameter; tests and
the wiring of the password store change the fields of ``web_state(app)`` before serving.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from litestar import Litestar

from engine.web.auth import Activator, Verifier
from engine.web.console_login import operator_verifier
from engine.web.holder_access import holder_activator, holder_verifier
from engine.web.sessions import SessionKind, SessionReads

_KEY = "web"


@dataclass
class WebState:
    """Clock, cookie policy, the login verifier of each portal, and the cached form key."""

    clock: Callable[[], float] = time.time  # epoch seconds; sessions and lockout use it
    # ONECARD_COOKIE_SECURE=1 (behind HTTPS): every cookie gets the Secure attribute
    cookie_secure: bool = False
    # holders log in to /self with their passwords (engine/access/holders.py), operators to
    # /console with theirs (engine/access/operators.py)
    verifiers: dict[SessionKind, Verifier] = field(
        default_factory=lambda: {SessionKind.SELF: holder_verifier,
                                 SessionKind.CONSOLE: operator_verifier}
    )
    csrf_key: bytes | None = None  # loaded from web_keys by the first request that needs it
    # turns a holder's activation code into their first password (/self/activate)
    activator: Activator = holder_activator
    session_reads: SessionReads | None = None  # made by the first page load (its app's pool)


def web_state(app: Litestar) -> WebState:
    """The app's web state, made on first use."""
    state: Any = app.state
    found = state.get(_KEY)
    if found is None:
        found = WebState(cookie_secure=os.environ.get("ONECARD_COOKIE_SECURE", "") == "1")
        state[_KEY] = found
    assert isinstance(found, WebState)
    return found

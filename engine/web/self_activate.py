"""``/self/activate`` (contract §6, §7): a holder turns the one-time code the card office gave
them into their first password (fields ``holder_id``, ``code``, ``password``, ``password2``);
success goes to ``/self/login``. The page only says which of the activator's outcomes
happened (``#error``, ``data-error``): a wrong id and a wrong code read the same.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler

from engine import limits
from engine.web import render
from engine.web.auth import Activation, ActivationOutcome
from engine.web.gate import ACCESS, Access
from engine.web.login import form_field
from engine.web.portal import SELF
from engine.web.state import web_state

MISMATCH = "mismatch"  # the two passwords differ (checked here, nothing is tried)


def _form(
    request: Request[Any, Any, Any], *, holder_id: str, error: str | None, minutes: int = 0,
    status: int = 200,
) -> Response[bytes]:
    return render.page(request, "self_activate.html", status=status, holder_id=holder_id,
                       error=error, minutes=minutes,
                       min_chars=limits.MIN_HOLDER_PASSWORD)


@get("/activate", opt={ACCESS: Access.PUBLIC}, name="self-activate")
async def activate_form(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The activation form."""
    return _form(request, holder_id="", error=None)


@post("/activate", opt={ACCESS: Access.PUBLIC}, name="self-activate-post")
async def activate(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Set the first password; on success, on to the login form."""
    form = await request.form()
    holder_id = form_field(form, "holder_id") or ""
    code = (form_field(form, "code") or "").strip()
    password = form_field(form, "password")
    password2 = form_field(form, "password2")
    if not holder_id or not code or password is None:
        verdict = Activation(ActivationOutcome.WRONG)
    elif not hmac.compare_digest(password.encode("utf-8", "replace"),
                                 (password2 or "").encode("utf-8", "replace")):
        return _form(request, holder_id=holder_id[:64], error=MISMATCH, status=400)
    else:
        state = web_state(request.app)
        verdict = await state.activator(request.app.state.engine, holder_id, code, password,
                                        now=state.clock())
    if verdict.outcome is ActivationOutcome.OK:
        return render.redirect(request, SELF.login)
    minutes = max(1, -(-(verdict.retry_after_s or 0) // 60))
    return _form(request, holder_id=holder_id[:64], error=verdict.outcome.value, minutes=minutes,
                 status=400)


def activation_handlers() -> list[HTTPRouteHandler]:
    """The activation form and its submission (paths relative to /self)."""
    return [activate_form, activate]

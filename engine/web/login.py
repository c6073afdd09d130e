"""Logging in and out of a portal, shared by /self and /console.

``GET {prefix}/login`` shows the form (fields: the portal's id field and ``password``);
``POST {prefix}/login`` asks the portal's verifier (``auth.Verifier``) and, for a verified
subject, starts a new session and goes to ``{prefix}``; otherwise the form again with
``#error`` (``data-error`` = ``wrong`` or ``locked``). ``POST {prefix}/logout`` ends the
session. ``log_in`` and ``log_out`` are the helpers other pages use (e.g. activation).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post
from litestar.datastructures import FormMultiDict
from litestar.handlers import HTTPRouteHandler

from engine import limits
from engine.web import render, sessions
from engine.web.auth import LoginOutcome, Verdict
from engine.web.gate import ACCESS, Access, now
from engine.web.portal import Portal
from engine.web.state import web_state


def form_field(form: FormMultiDict, name: str) -> str | None:
    """A form's one text value of ``name``, at most ``limits.WEB_MAX_FIELD_CHARS`` long; None
    when missing, repeated, a file, too long or holding U+0000 (which no PostgreSQL text
    holds: it would fail the query that looks it up)."""
    values = form.getall(name) if name in form else []
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    value: str = values[0]
    return value if len(value) <= limits.WEB_MAX_FIELD_CHARS and "\x00" not in value else None


async def log_in(request: Request[Any, Any, Any], portal: Portal, subject: str) -> Response[bytes]:
    """Start a session for a verified subject (the browser's old one, if any, ends: a new id
    at every login) and go to the portal's home."""
    state = web_state(request.app)
    session_id, _ = await sessions.start(
        request.app.state.engine.store.pool,
        portal.kind,
        subject,
        now=now(state),
        replacing=request.cookies.get(portal.cookie),
    )
    render.queue_cookie(request, portal.cookie, session_id, path=portal.prefix, max_age=None)
    return render.redirect(request, portal.home)


async def log_out(request: Request[Any, Any, Any], portal: Portal) -> Response[bytes]:
    """End the browser's session (if any), forget its cookie, go to the login form."""
    session_id = request.cookies.get(portal.cookie)
    if session_id:
        await sessions.end(request.app.state.engine.store.pool, session_id)
    render.queue_cookie(request, portal.cookie, "", path=portal.prefix, max_age=0)
    return render.redirect(request, portal.login)


def _login_page(
    request: Request[Any, Any, Any], portal: Portal, *, subject: str, verdict: Verdict | None
) -> Response[bytes]:
    error, minutes = None, 0
    if verdict is not None:
        error = verdict.outcome.value
        minutes = max(1, -(-(verdict.retry_after_s or 0) // 60))  # whole minutes, rounded up
    return render.page(
        request, "login.html", portal=portal, subject=subject, error=error, minutes=minutes
    )


def login_handlers(portal: Portal) -> list[HTTPRouteHandler]:
    """The login form, its submission and the logout of ``portal`` (paths relative to it)."""

    @get("/login", opt={ACCESS: Access.PUBLIC}, name=f"{portal.kind}-login")
    async def login_form(request: Request[Any, Any, Any]) -> Response[bytes]:
        # Shown even to a browser with a session: sending it on to that session's home would
        # show a holder someone else's account if that someone had planted their cookie.
        return _login_page(request, portal, subject="", verdict=None)

    @post("/login", opt={ACCESS: Access.PUBLIC}, status_code=200, name=f"{portal.kind}-login-post")
    async def login_submit(request: Request[Any, Any, Any]) -> Response[bytes]:
        form = await request.form()
        subject = form_field(form, portal.subject_field)
        password = form_field(form, "password")
        if not subject or not password:
            verdict = Verdict(LoginOutcome.WRONG)
        else:
            state = web_state(request.app)
            verify = state.verifiers[portal.kind]
            verdict = await verify(request.app.state.engine, subject, password, now=state.clock())
        if verdict.outcome is LoginOutcome.OK and verdict.subject:
            return await log_in(request, portal, verdict.subject)
        if verdict.outcome is LoginOutcome.OK:  # a verifier's bug: no subject, no door
            verdict = Verdict(LoginOutcome.WRONG)
        return _login_page(request, portal, subject=subject or "", verdict=verdict)

    @post("/logout", opt={ACCESS: Access.LOGOUT}, status_code=303, name=f"{portal.kind}-logout")
    async def logout(request: Request[Any, Any, Any]) -> Response[bytes]:
        return await log_out(request, portal)

    return [login_form, login_submit, logout]

"""What runs before and after every handler of a portal: its session, its form token, its
login requirement, and the headers and cookies of its answer.

A handler says what it needs in its ``opt`` (``ACCESS``):
- ``Access.SESSION`` (the default): a live session; a GET without one goes to the login page,
  and its forms carry the session's token;
- ``Access.PUBLIC``: no session needed (the login form); its forms carry a token bound to a
  pre-session cookie;
- ``Access.LOGOUT``: the session's token when there is a session; with none there is nothing
  to protect, so nothing is checked.
Every POST's ``csrf`` field is checked here, before its handler runs: a wrong or missing one is
403 and the handler never runs, so nothing changes. A portal's handlers set no
``before_request`` of their own (Litestar keeps one per route: it would replace this one).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, Final

from litestar import Request, Response

from engine.web import csrf, render, sessions
from engine.web.errors import Refusal, WebError
from engine.web.portal import Portal
from engine.web.sessions import Session
from engine.web.state import WebState, web_state

PORTAL: Final = "web_portal"  # opt: the handler's portal (set by its router)
ACCESS: Final = "web_access"  # opt: the handler's Access
_SESSION: Final = "web_session"  # request.state: the live session or None
# The methods that change something; each must carry the form token.
_UNSAFE: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Access(enum.StrEnum):
    """What a portal handler needs (see the module's docstring)."""

    SESSION = "session"
    PUBLIC = "public"
    LOGOUT = "logout"


def portal_of(request: Request[Any, Any, Any]) -> Portal:
    """The portal of the request's handler."""
    portal = request.route_handler.opt[PORTAL]
    assert isinstance(portal, Portal)
    return portal


def current_session(request: Request[Any, Any, Any]) -> Session | None:
    """The request's live session (after the gate), or None."""
    found = request.state.get(_SESSION)
    return found if isinstance(found, Session) else None


def now(state: WebState) -> datetime:
    """The web clock as an aware datetime."""
    return datetime.fromtimestamp(state.clock(), UTC)


async def gate(request: Request[Any, Any, Any]) -> Response[bytes] | None:
    """The portals' before_request hook."""
    portal = portal_of(request)
    state = web_state(request.app)
    access = Access(request.route_handler.opt.get(ACCESS, Access.SESSION))
    session = await _session(request, portal, state)
    request.state[_SESSION] = session
    if access is Access.PUBLIC:
        token = await _anonymous_token(request, portal, state)
    else:
        token = csrf.session_token(session.csrf) if session else None
    if request.method in _UNSAFE:
        sent = await _sent_token(request)
        checked = access is not Access.LOGOUT or session is not None
        if checked and not csrf.matches(sent, token):
            raise WebError(403, Refusal.CSRF)
    if session is None and access is Access.SESSION:
        return render.redirect(request, portal.login)  # a GET: unsafe methods failed above
    request.state[render.CSRF_TOKEN] = token or ""
    return None


async def after(response: Response[Any]) -> Response[Any]:
    """The portals' after_request hook: the security headers on every answer, whatever built
    it. (Litestar passes it no request, so cookies are set by ``render.page``/``redirect``,
    with which portal handlers answer.)"""
    for name, value in render.SECURITY_HEADERS.items():
        response.headers[name] = value
    response.headers.setdefault("Cache-Control", render.NO_STORE)
    return response


async def _session(
    request: Request[Any, Any, Any], portal: Portal, state: WebState
) -> Session | None:
    session_id = request.cookies.get(portal.cookie)
    if not session_id:
        return None
    reads = state.session_reads
    if reads is None:
        engine = request.app.state.engine
        reads = state.session_reads = sessions.SessionReads(lambda: engine.store.pool)
    found = await reads.find(portal.kind, session_id, now=now(state))
    if found is None:  # over or unknown: the browser forgets it
        render.queue_cookie(request, portal.cookie, "", path=portal.prefix, max_age=0)
    return found


async def _anonymous_token(
    request: Request[Any, Any, Any], portal: Portal, state: WebState
) -> str | None:
    """The token of this browser's pre-login forms; a browser without a pre-session cookie
    gets one on a GET (a POST without it has no valid token)."""
    pre = request.cookies.get(portal.pre_cookie)
    if not pre:
        if request.method in _UNSAFE:
            return None
        pre = csrf.new_pre_session()
        render.queue_cookie(request, portal.pre_cookie, pre, path=portal.prefix, max_age=None)
    if state.csrf_key is None:
        state.csrf_key = await csrf.load_key(request.app.state.engine.store.pool)
    return csrf.anonymous_token(state.csrf_key, portal.kind.value, pre)


async def _sent_token(request: Request[Any, Any, Any]) -> str | None:
    """The form's one ``csrf`` value (the form is parsed once; the handler reads it again)."""
    form = await request.form()
    values = form.getall(csrf.FIELD) if csrf.FIELD in form else []
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    value: str = values[0]
    return value

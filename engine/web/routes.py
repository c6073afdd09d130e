"""The web pages as route handlers for ``create_app``: a router per portal and the stylesheet."""

from __future__ import annotations

from collections.abc import Sequence

from litestar import Router
from litestar.handlers import HTTPRouteHandler

from engine.web.console import console_handlers
from engine.web.errors import html_errors
from engine.web.gate import PORTAL, after, gate
from engine.web.login import login_handlers
from engine.web.portal import CONSOLE, SELF, Portal
from engine.web.self_activate import activation_handlers
from engine.web.self_forms import form_handlers
from engine.web.self_pages import page_handlers
from engine.web.static import stylesheet

__all__ = ["html_errors", "portal_router", "route_handlers"]


def portal_router(portal: Portal, handlers: Sequence[HTTPRouteHandler]) -> Router:
    """A portal's pages: its login and logout, then ``handlers`` (paths relative to the
    portal's prefix), all behind the gate (session, form token, headers)."""
    return Router(
        portal.prefix,
        route_handlers=[*login_handlers(portal), *handlers],
        before_request=gate,
        after_request=after,
        opt={PORTAL: portal},
        include_in_schema=False,
    )


def route_handlers() -> list[Router | HTTPRouteHandler]:
    """Everything the web pages add to the app."""
    return [
        portal_router(SELF, [*activation_handlers(), *page_handlers(), *form_handlers()]),
        portal_router(CONSOLE, console_handlers()),
        stylesheet,
    ]

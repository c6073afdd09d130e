"""Error pages of the web pages (403, 404, 405, 500, 503, ...) in the page's language.

``html_errors`` wraps the app's exception handlers: under /self, /console and /static an error
is a page; elsewhere the API's JSON answer is unchanged. The status is the one the API's own
handler chooses (so a database that went away is 503 with Retry-After here too, and a bug is
500 and logged by it), and only malformed input the framework refused can be a 4xx: bad
input is never a 500.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap

from engine.web import render
from engine.web.i18n import N_
from engine.web.portal import is_web_path, portal_of_path

log = logging.getLogger(__name__)

Handler = Callable[[Request[Any, Any, Any], Any], Response[Any]]


class Refusal(enum.StrEnum):
    """Why a page refused a request (its ``data-reason``)."""

    CSRF = "csrf"  # the form's token is missing or wrong, or its session is over
    FORBIDDEN = "forbidden"  # the role may not (console, §6)
    NOT_FOUND = "not_found"  # unknown, or someone else's (a session reaches only its own)


class WebError(Exception):
    """Raised by a page handler to answer an error page."""

    def __init__(self, status: int, reason: Refusal) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


_TITLES: Final[dict[int | Refusal, str]] = {
    Refusal.CSRF: N_("This form has expired"),
    400: N_("The request was not understood"),
    403: N_("Not allowed"),
    404: N_("Page not found"),
    405: N_("Not allowed here"),
    413: N_("Too large"),
    500: N_("Something went wrong"),
    503: N_("Busy right now"),
}
_MESSAGES: Final[dict[int | Refusal, str]] = {
    400: N_("Please go back and check what you entered."),
    403: N_("You may not do this."),
    404: N_("There is nothing at this address, or it is not yours."),
    405: N_("This address does not take that kind of request."),
    413: N_("What you sent is too large."),
    500: N_("This is our fault, not yours. Please try again later."),
    503: N_("The service is busy or restarting. Please try again in a moment."),
    Refusal.CSRF: N_(
        "This form has expired, or your session has ended. Reload the page and try again."
    ),
}


def error_page(
    request: Request[Any, Any, Any], status: int, *, reason: Refusal | None = None
) -> Response[bytes]:
    """The error page of ``status``; rendering it can never fail into a bare 500."""
    generic = 500 if status >= 500 else 400
    title = _TITLES.get(reason or status) or _TITLES.get(status, _TITLES[generic])
    message = _MESSAGES.get(reason or status) or _MESSAGES.get(status, _MESSAGES[generic])
    portal = portal_of_path(request.url.path)
    try:
        return render.page(
            request,
            "error.html",
            status=status,
            code=status,
            reason=(reason or "").__str__(),
            title=title,
            message=message,
            login_url=portal.login if portal else None,
        )
    except Exception:
        log.exception("the error page of %s failed", status)
        response = Response(f"{status}\n".encode(), status_code=status, media_type="text/plain")
        return render.finish(request, response)


def _on_web_error(request: Request[Any, Any, Any], exc: WebError) -> Response[bytes]:
    return error_page(request, exc.status, reason=exc.reason)


def _wrap(api_handler: Handler) -> Handler:
    def handler(request: Request[Any, Any, Any], exc: Any) -> Response[Any]:
        answer = api_handler(request, exc)  # the API's status choice (and its logging)
        if not is_web_path(request.scope.get("path", "")):
            return answer
        page = error_page(request, answer.status_code or 500)
        retry_after = answer.headers.get("Retry-After")
        if retry_after is not None:
            page.headers["Retry-After"] = retry_after
        if isinstance(exc, HTTPException) and exc.status_code == 405 and exc.headers:
            page.headers.update(exc.headers)  # Allow
        return page

    return handler


def html_errors(handlers: Mapping[type[Exception], Handler]) -> ExceptionHandlersMap:
    """The app's exception handlers, answering pages under the web prefixes."""
    wrapped: ExceptionHandlersMap = {cls: _wrap(h) for cls, h in handlers.items()}
    wrapped[WebError] = _on_web_error
    return wrapped

"""How the JSON API answers an error (contract §4): ``{"error": code, "detail": text}`` with
the status the contract names. Malformed input is a 400, the database away a 503, never a 500.

Handlers raise ``ApiError``; the framework's own refusals (``HTTPException``), a body nested
too deeply and anything unexpected are mapped here (``EXCEPTION_HANDLERS``).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Any, Final

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from engine import faults, limits
from engine.batcher import Unavailable

log = logging.getLogger(__name__)

# The database went away under a request (engine/faults.py) or the batcher could not reach it:
# the client may retry (the transfer id makes a write idempotent), so these answer 503, never 500.
DATABASE_AWAY: Final[tuple[type[BaseException], ...]] = (*faults.DATABASE_AWAY, Unavailable)


class ErrorCode(enum.StrEnum):
    """The ``error`` field of an error response."""

    INVALID_BODY = "invalid_body"
    INVALID_PARAMETER = "invalid_parameter"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TOO_LARGE = "too_large"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class Error(msgspec.Struct, frozen=True):
    """An error answer."""

    error: ErrorCode
    detail: str


class ApiError(Exception):
    """Raised by handlers to answer an error."""

    def __init__(self, status: int, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


_STATUS_CODES = {
    400: ErrorCode.INVALID_BODY,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.TOO_LARGE,
    503: ErrorCode.UNAVAILABLE,
}


def _error(status: int, code: ErrorCode, detail: str) -> Response[Error]:
    headers = {"Retry-After": str(limits.RETRY_AFTER_S)} if status == 503 else None
    return Response(Error(code, detail), status_code=status, headers=headers)


def _on_api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[Error]:
    return _error(exc.status, exc.code, exc.detail)


def _on_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Error]:
    status = exc.status_code
    code = _STATUS_CODES.get(
        status, ErrorCode.INVALID_BODY if status < 500 else ErrorCode.UNAVAILABLE
    )
    detail = exc.detail
    if isinstance(exc, ValidationException) and exc.extra:
        detail = f"{detail}: {exc.extra}"
    return _error(status, code, str(detail))


def _on_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[Error]:
    # The database went away under us: 503 (the detail names the error class, not its text,
    # which may carry connection details); anything else is our bug.
    if isinstance(exc, Unavailable):
        return _error(503, ErrorCode.UNAVAILABLE, str(exc))
    if isinstance(exc, DATABASE_AWAY):
        log.warning("database unavailable: %s", type(exc).__name__)
        return _error(503, ErrorCode.UNAVAILABLE, f"database unavailable ({type(exc).__name__})")
    log.error("unhandled error", exc_info=exc)
    return Response(Error(ErrorCode.INTERNAL, "internal error"), status_code=500)


def _on_too_deep(_: Request[Any, Any, Any], exc: RecursionError) -> Response[Error]:
    # The framework decodes a JSON body generically before validating it; a body nested
    # deeper than the decoder's recursion limit (e.g. 100,000 "[") is malformed input.
    return _error(400, ErrorCode.INVALID_BODY, "the body is nested too deeply")


Handler = Callable[[Request[Any, Any, Any], Any], Response[Error]]

# The app wraps these so that pages under /self and /console answer HTML (engine/web/errors.py).
EXCEPTION_HANDLERS: Final[dict[type[Exception], Handler]] = {
    ApiError: _on_api_error,
    HTTPException: _on_http_exception,
    RecursionError: _on_too_deep,
    Exception: _on_unexpected,
}

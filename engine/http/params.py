"""Reading a request's path and query: ASCII numbers and ids, RFC 3339 times, the engine.

Every refusal is an ``ApiError`` 400 ``invalid_parameter``: malformed input is never a 500.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any, Final
from uuid import UUID

from litestar import Request

from engine.calendar import EPOCH, utc_from_ns
from engine.http.errors import ApiError, ErrorCode
from engine.service import Engine
from ledger.types import INT64_MAX

# Numbers in paths and queries are ASCII digits only: Python's int() also takes other scripts'
# digits (int("\u0661") == 1: an Arabic-Indic one in a path would read account 1), signs,
# spaces and underscores; str.isdigit() even takes "\u00b2", which int() then refuses (a 500).
# Nineteen digits hold every int64.
_ASCII_INT: Final = re.compile(r"[0-9]{1,19}")
# A transfer id in a path: the two forms a JSON body accepts (hyphenated, or 32 hex digits).
# uuid.UUID() alone also takes braces, "urn:uuid:", "+", "_" and other scripts' digits.
_UUID_TEXT: Final = re.compile(
    r"[0-9A-Fa-f]{8}(-?)[0-9A-Fa-f]{4}\1[0-9A-Fa-f]{4}\1[0-9A-Fa-f]{4}\1[0-9A-Fa-f]{12}"
)
# RFC 3339 date-time with an offset (datetime.fromisoformat alone also takes ISO week dates,
# the basic format and a U+0000 inside the time).
_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def rfc3339(ns: int) -> str:
    """Engine (wall-clock) nanoseconds as RFC 3339 UTC with microseconds."""
    return utc_from_ns(ns).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ascii_int(raw: str) -> int | None:
    """``raw`` as a non-negative int if it is 1..19 ASCII digits, else None."""
    return int(raw) if _ASCII_INT.fullmatch(raw) else None


def parse_rfc3339(value: str) -> int:
    """RFC 3339 (with offset) to engine nanoseconds; raises ApiError(400) otherwise."""
    value = value.replace(" ", "+")  # an unescaped '+' in a query string reads as a space
    try:
        dt = (datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
              if _RFC3339.fullmatch(value) else None)
    except ValueError:
        dt = None
    if dt is None or dt.tzinfo is None:
        raise ApiError(400, ErrorCode.INVALID_PARAMETER, f"not an RFC 3339 time: {value!r}")
    ns = ((dt - EPOCH) // timedelta(microseconds=1)) * 1000 + 999  # through that microsecond
    if not 0 <= ns <= INT64_MAX:
        raise ApiError(400, ErrorCode.INVALID_PARAMETER, f"time out of range: {value!r}")
    return ns


def parse_account_id(raw: str) -> int:
    """An account id from a path; raises ApiError(400) unless it is 1..INT64_MAX in ASCII."""
    aid = parse_ascii_int(raw)
    if aid is None or not 0 < aid <= INT64_MAX:
        raise ApiError(400, ErrorCode.INVALID_PARAMETER, f"not an account id: {raw!r}")
    return aid


def int_param(request: Request[Any, Any, Any], name: str, default: int, lo: int, hi: int) -> int:
    """Query parameter ``name`` in lo..hi (``default`` when absent); else ApiError(400)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = parse_ascii_int(raw)
    if value is None or not lo <= value <= hi:
        raise ApiError(400, ErrorCode.INVALID_PARAMETER, f"{name} must be in {lo}..{hi}")
    return value


def parse_transfer_id(raw: str) -> UUID:
    """A transfer id from a path; raises ApiError(400) unless it is a UUID in ASCII hex."""
    if not _UUID_TEXT.fullmatch(raw):
        raise ApiError(400, ErrorCode.INVALID_PARAMETER, f"not a UUID: {raw!r}")
    return UUID(raw)


def engine_of(request: Request[Any, Any, Any]) -> Engine:
    """The app's engine."""
    engine: Engine = request.app.state.engine
    return engine

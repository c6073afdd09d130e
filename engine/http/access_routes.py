"""HTTP routes of people, roles and keys (contract §6): activation codes, residents and the
operator log. Who may call them is in engine/http/auth.py's table; errors use the app's shape
(raised as Litestar's HTTP exceptions, which app.py maps onto ``{"error", "detail"}``)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import msgspec
from litestar import Request, delete, get, post
from litestar.exceptions import ClientException, NotFoundException
from litestar.params import FromPath, JSONBody

from engine import limits
from engine.access import oplog
from engine.access.holders import issue_activation
from engine.access.refused import Refused
from engine.access.residents import ResidentStatus, add_resident, remove_resident
from engine.http.params import engine_of, rfc3339
from ledger.account import HolderId
from ledger.types import INT64_MAX

T = TypeVar("T")
_ROOM_ID: Final = re.compile(r"[\x20-\x7e]{1,28}")  # field 102 (ans..28), as in POST /v1/rooms
_HOLDER_ID: Final = re.compile(r"[^\x00]{1,64}")  # the holders table's CHECK


class ActivationOut(msgspec.Struct, frozen=True):
    """``POST /v1/holders/{holder_id}/activation``: the one-time code, shown this once."""

    holder_id: str
    code: str
    expires_at: str  # RFC 3339


class ResidentIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/rooms/{room_id}/residents`` body."""

    holder_id: HolderId


class ResidentOut(msgspec.Struct, frozen=True):
    """A residence and what was done to it."""

    room_id: str
    holder_id: str
    status: ResidentStatus


class LogEntryOut(msgspec.Struct, frozen=True):
    """One operator log entry."""

    id: int
    at: str  # RFC 3339
    actor: str
    role: str
    action: str
    target: str
    outcome: str


class LogPageOut(msgspec.Struct, frozen=True):
    """``GET /v1/operator-log``: newest first."""

    entries: list[LogEntryOut]
    next_before: int | None


def _ok(result: T | Refused) -> T:
    if isinstance(result, Refused):
        if result.not_found:
            raise NotFoundException(result.detail)
        raise ClientException(f"{result.reason}: {result.detail}")
    return result


def _checked(value: str, name: str, pattern: re.Pattern[str]) -> str:
    if not pattern.fullmatch(value):
        raise ClientException(f"not a {name}: {value!r}")
    return value


@post("/v1/holders/{holder_id:str}/activation", status_code=200)
async def new_activation(request: Request[Any, Any, Any], holder_id: FromPath[str]
                         ) -> ActivationOut:
    """A new 8-digit activation code for the holder, valid 72 hours (the old one is void)."""
    hid = _checked(holder_id, "holder id", _HOLDER_ID)
    a = _ok(await issue_activation(engine_of(request).store.pool, hid))
    return ActivationOut(a.holder_id, a.code, rfc3339(a.expires_at))


@post("/v1/rooms/{room_id:str}/residents", status_code=200)
async def add_room_resident(
    request: Request[Any, Any, Any], room_id: FromPath[str], data: JSONBody[ResidentIn]
) -> ResidentOut:
    """The holder lives in the room (a holder lives in at most one room)."""
    rid = _checked(room_id, "room id", _ROOM_ID)
    hid = _checked(data.holder_id, "holder id", _HOLDER_ID)
    async with engine_of(request).store.pool.acquire() as conn:
        status = _ok(await add_resident(conn, rid, hid))
    return ResidentOut(rid, hid, status)


@delete("/v1/rooms/{room_id:str}/residents/{holder_id:str}", status_code=200)
async def remove_room_resident(
    request: Request[Any, Any, Any], room_id: FromPath[str], holder_id: FromPath[str]
) -> ResidentOut:
    """The holder no longer lives in the room."""
    rid = _checked(room_id, "room id", _ROOM_ID)
    hid = _checked(holder_id, "holder id", _HOLDER_ID)
    async with engine_of(request).store.pool.acquire() as conn:
        status = _ok(await remove_resident(conn, rid, hid))
    return ResidentOut(rid, hid, status)


def _int_query(request: Request[Any, Any, Any], name: str, default: int | None, hi: int
               ) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= hi:
        raise ClientException(f"{name} must be in 1..{hi}")
    return int(raw)


@get("/v1/operator-log")
async def operator_log(request: Request[Any, Any, Any]) -> LogPageOut:
    """The operator log, newest first, ``limit`` at a time, older than entry id ``before``."""
    limit = _int_query(request, "limit", limits.DEFAULT_OPERATOR_LOG_LIMIT,
                       limits.MAX_OPERATOR_LOG_LIMIT)
    before = _int_query(request, "before", None, INT64_MAX)
    assert limit is not None
    async with engine_of(request).store.pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
        entries, next_before = await oplog.page(conn, limit=limit, before=before)
    return LogPageOut(
        [LogEntryOut(e.id, rfc3339(e.at), e.actor, e.role, e.action, e.target, e.outcome)
         for e in entries],
        next_before,
    )


ROUTES: list[Callable[..., Awaitable[Any]] | Any] = [
    new_activation,
    add_room_resident,
    remove_room_resident,
    operator_log,
]

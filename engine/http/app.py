"""The HTTP API (contract §4) on Litestar: thin handlers over the engine.

Who may call what is decided in one place, engine/http/auth.py (the route -> rights table,
the admin and read tokens, API keys, the operator log of writes). Every error is
``{"error": code, "detail": text}`` with the status the contract names; malformed input is a
400, never a 500.
"""

from __future__ import annotations

import enum
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar
from uuid import UUID

import asyncpg
import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.params import FromPath
from litestar.types import ASGIApp, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine import limits, metrics
from engine.batcher import Overloaded, TooManyLedgers, TransferResult, Unavailable
from engine.service import Engine
from engine.store import TransferRecord
from engine.web import routes as web
from ledger.account import Account
from ledger.status import AccountStatus
from ledger.transfer import Transfer, user_data_fits
from ledger.types import INT64_MAX, TransferState, transfer_flag_names

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
log = logging.getLogger(__name__)
_T = TypeVar("_T")

# The database went away under a request: connection refused or lost, the server shutting down,
# restarting or out of connections, a connection whose protocol state died with its backend
# (asyncpg's InternalClientError, seen under pg_terminate_backend). The client may retry (the
# transfer id makes a write idempotent), so these answer 503, never 500.
DATABASE_AWAY: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    Unavailable,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


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


class AccountResult(msgspec.Struct, frozen=True):
    """The answer for one account."""

    id: int
    status: AccountStatus


class TransferView(msgspec.Struct, frozen=True, omit_defaults=True):
    """A stored transfer as shown by the API."""

    id: UUID
    ledger: int
    debit_account_id: int
    credit_account_id: int
    amount: int
    code: int
    flags: list[str]
    timestamp: int
    state: TransferState
    pending_id: UUID | None = None
    timeout_s: int | None = None
    user_data: str | None = None


class Balance(msgspec.Struct, frozen=True):
    """An account's balance, live or as of an instant."""

    account_id: int
    ledger: int
    balance: int
    available: int
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    as_of: str


class Statement(msgspec.Struct, frozen=True):
    """A page of an account's transfers, newest first."""

    transfers: list[TransferView]
    next_before: int | None


# -- helpers -------------------------------------------------------------------------------------


def rfc3339(ns: int) -> str:
    """Engine nanoseconds as RFC 3339 UTC with microseconds."""
    dt = EPOCH + timedelta(microseconds=ns // 1000)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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


def view(rec: TransferRecord) -> TransferView:
    """API view of a stored transfer."""
    t = rec.transfer
    return TransferView(
        id=t.id,
        ledger=t.ledger,
        debit_account_id=t.debit_account_id,
        credit_account_id=t.credit_account_id,
        amount=t.amount,
        code=t.code,
        flags=[str(f) for f in transfer_flag_names(t.flags)],
        timestamp=t.timestamp,
        state=rec.state,
        pending_id=t.pending_id,
        timeout_s=t.timeout_s or None,
        user_data=t.user_data,
    )


def _account_id(raw: str) -> int:
    aid = parse_ascii_int(raw)
    if aid is None or not 0 < aid <= INT64_MAX:
        raise ApiError(400, ErrorCode.INVALID_PARAMETER, f"not an account id: {raw!r}")
    return aid


def _int_param(request: Request[Any, Any, Any], name: str, default: int, lo: int, hi: int) -> int:
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


def _engine(request: Request[Any, Any, Any]) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


# The ledger bodies are decoded here, strictly, straight from the bytes: the framework's own
# decoding is lax and would take "1e3" or 1000.0 as an amount of 1000 fen. Money is an integer,
# so a string, a float or a bool where an integer belongs is a 400. (It is also one decoding
# pass instead of the framework's two.) ``openapi_json`` documents these bodies.
_ACCOUNTS_BODY: Final = msgspec.json.Decoder(list[Account])
_TRANSFERS_BODY: Final = msgspec.json.Decoder(list[Transfer])
_STRICT_BODIES: Final = {"/v1/accounts": list[Account], "/v1/transfers": list[Transfer]}


async def _strict_body(request: Request[Any, Any, Any], decoder: msgspec.json.Decoder[_T]) -> _T:
    raw = await request.body()
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise ApiError(400, ErrorCode.INVALID_BODY, str(e)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, ErrorCode.INVALID_BODY, f"malformed JSON: {e}") from None


async def _submit(engine: Engine, transfers: list[Transfer]) -> list[TransferResult]:
    try:
        return await engine.batcher.submit(transfers)
    except TooManyLedgers as e:  # each ledger is a transaction of the one committer
        raise ApiError(413, ErrorCode.TOO_LARGE, str(e)) from e
    except Overloaded as e:
        raise ApiError(503, ErrorCode.OVERLOADED, str(e)) from e
    except Unavailable as e:
        raise ApiError(503, ErrorCode.UNAVAILABLE, str(e)) from e


# -- ledger routes -------------------------------------------------------------------------------


@post("/v1/accounts", status_code=200)
async def create_accounts(
    request: Request[Any, Any, Any],
) -> list[AccountResult]:
    """Create accounts; one status per account, in request order."""
    data = await _strict_body(request, _ACCOUNTS_BODY)
    if not data:
        raise ApiError(400, ErrorCode.INVALID_BODY, "the list of accounts is empty")
    if len(data) > limits.MAX_ACCOUNTS_PER_REQUEST:
        raise ApiError(413, ErrorCode.TOO_LARGE, f"at most {limits.MAX_ACCOUNTS_PER_REQUEST}")
    for i, a in enumerate(data):
        if "\x00" in (a.name or "") or "\x00" in (a.holder_id or ""):
            raise ApiError(400, ErrorCode.INVALID_BODY, f"[{i}]: U+0000 in name or holder_id")
    statuses = await _engine(request).store.create_accounts(data)
    for s in statuses:
        metrics.ACCOUNTS.labels(s.value).inc()
    return [AccountResult(a.id, s) for a, s in zip(data, statuses, strict=True)]


@post("/v1/transfers", status_code=200)
async def create_transfers(
    request: Request[Any, Any, Any],
) -> list[TransferResult]:
    """Post a batch of transfers; one status per transfer, in request order. At most 8,190
    transfers naming at most 64 ledgers (each ledger is a transaction of the one committer;
    a ledger counts again after an id the request also names in another ledger): 413."""
    data = await _strict_body(request, _TRANSFERS_BODY)
    if not data:
        raise ApiError(400, ErrorCode.INVALID_BODY, "the list of transfers is empty")
    if len(data) > limits.MAX_TRANSFERS_PER_REQUEST:
        raise ApiError(413, ErrorCode.TOO_LARGE, f"at most {limits.MAX_TRANSFERS_PER_REQUEST}")
    for i, t in enumerate(data):
        if not user_data_fits(t.user_data):
            raise ApiError(400, ErrorCode.INVALID_BODY, f"[{i}].user_data exceeds 256 bytes")
        if t.user_data is not None and "\x00" in t.user_data:
            # PostgreSQL text cannot hold U+0000: it would fail the whole group-committed
            # batch, other clients' transfers included.
            raise ApiError(400, ErrorCode.INVALID_BODY, f"[{i}].user_data contains U+0000")
    return await _submit(_engine(request), data)


@get("/v1/transfers/{transfer_id:str}")
async def get_transfer(request: Request[Any, Any, Any], transfer_id: FromPath[str]) -> TransferView:
    """One transfer with its timestamp and state."""
    tid = parse_transfer_id(transfer_id)
    rec = await _engine(request).store.get_transfer(tid)
    if rec is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no transfer {tid}")
    return view(rec)


@get("/v1/accounts/{account_id:str}/balance")
async def get_balance(request: Request[Any, Any, Any], account_id: FromPath[str]) -> Balance:
    """Live balance, or as of ``at`` (RFC 3339) from snapshots plus later transfers."""
    aid = _account_id(account_id)
    store = _engine(request).store
    rec = await store.get_account(aid)
    if rec is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no account {aid}")
    a = rec.state
    at = request.query_params.get("at")
    if at is None:
        as_of = rfc3339(time.time_ns())
    else:
        ns = parse_rfc3339(at)
        b = await store.balance_at(a.ledger, aid, ns)
        a.debits_posted, a.credits_posted = b.debits_posted, b.credits_posted
        a.debits_pending, a.credits_pending = b.debits_pending, b.credits_pending
        as_of = rfc3339(ns)
    return Balance(
        account_id=aid,
        ledger=a.ledger,
        balance=a.balance,
        available=a.available,
        debits_posted=a.debits_posted,
        credits_posted=a.credits_posted,
        debits_pending=a.debits_pending,
        credits_pending=a.credits_pending,
        as_of=as_of,
    )


@get("/v1/accounts/{account_id:str}/transfers")
async def get_statement(request: Request[Any, Any, Any], account_id: FromPath[str]) -> Statement:
    """An account's transfers, newest first, ``limit`` at a time, older than ``before``."""
    aid = _account_id(account_id)
    limit = _int_param(
        request, "limit", limits.DEFAULT_STATEMENT_LIMIT, 1, limits.MAX_STATEMENT_LIMIT
    )
    before = _int_param(request, "before", INT64_MAX, 1, INT64_MAX)
    store = _engine(request).store
    rec = await store.get_account(aid)
    if rec is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no account {aid}")
    records, more = await store.account_transfers(rec.state.ledger, aid, before=before, limit=limit)
    views = [view(r) for r in records]
    return Statement(transfers=views, next_before=views[-1].timestamp if more else None)


# -- operations ----------------------------------------------------------------------------------


@get("/openapi.json", include_in_schema=False)
async def openapi_json(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The OpenAPI document."""
    state = request.app.state
    if getattr(state, "openapi_document", None) is None:
        state.openapi_document = _document(request.app.openapi_schema.to_schema())
    doc: dict[str, Any] = state.openapi_document
    return doc


def _document(doc: dict[str, Any]) -> dict[str, Any]:
    """The generated document plus the request bodies the handlers decode themselves."""
    bodies, components = msgspec.json.schema_components(
        list(_STRICT_BODIES.values()), ref_template="#/components/schemas/{name}"
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, component in components.items():
        schemas.setdefault(name, component)
    for path, body in zip(_STRICT_BODIES, bodies, strict=True):
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return doc


@get("/healthz")
async def healthz(request: Request[Any, Any, Any]) -> Response[dict[str, str]]:
    """200 when the engine can reach its database, 503 otherwise."""
    if await _engine(request).ready():
        return Response({"status": "ready"}, status_code=200)
    return Response(
        {"status": "not_ready"},
        status_code=503,
        headers={"Retry-After": str(limits.RETRY_AFTER_S)},
    )


@get("/metrics", media_type=CONTENT_TYPE_LATEST)
async def metrics_route(request: Request[Any, Any, Any]) -> bytes:
    """Prometheus text format."""
    await _engine(request).ready()  # refreshes the pool gauges
    return generate_latest(metrics.REGISTRY)


# -- errors --------------------------------------------------------------------------------------

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


def _timing(app: ASGIApp) -> ASGIApp:
    """Middleware: request latency by route template and status."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_wrapper)
        finally:
            route = str(scope.get("path_template") or "unmatched")
            method = str(scope.get("method", "-"))
            metrics.HTTP_SECONDS.labels(method, route, str(status)).observe(
                time.perf_counter() - t0
            )

    return middleware


ROUTES: list[Callable[..., Awaitable[Any]] | Any] = [
    create_accounts,
    create_transfers,
    get_transfer,
    get_balance,
    get_statement,
    healthz,
    metrics_route,
    openapi_json,
]


def create_app(
    engine: Engine,
    *,
    admin_token: str,
    read_token: str,
    extra_routes: list[Any] | None = None,
) -> Litestar:
    """The Litestar application over a started (or about to be started) engine.

    The campus routes (holders, cards, terminals, rooms) are included when that module exists,
    and the access routes (activation, residents, operator log). Every route must have a rule
    in engine/http/auth.py (LookupError otherwise); ``extra_routes`` (tests) are unguarded.
    """
    from engine.http import auth
    from engine.http.access_routes import ROUTES as access_routes

    routes: list[Any] = [*ROUTES, *(extra_routes or [])]
    try:
        from engine.http.campus_routes import ROUTES as campus_routes
    except ModuleNotFoundError:
        campus_routes = []
    routes.extend(campus_routes)
    routes.extend(access_routes)
    routes.extend(web.route_handlers())  # /self, /console (HTML pages), /static
    app = Litestar(
        route_handlers=routes,
        before_request=auth.authorize,
        exception_handlers=web.html_errors(  # pages under /self, /console; JSON elsewhere
            {
                ApiError: _on_api_error,
                HTTPException: _on_http_exception,
                RecursionError: _on_too_deep,
                Exception: _on_unexpected,
            }
        ),
        middleware=[_timing, auth.record_writes],
        request_max_body_size=limits.MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title="onecard",
            version="0.1.0",
            path="/schema",
            render_plugins=[JsonRenderPlugin(path="/openapi.json")],
        ),
        debug=False,
    )
    app.state.engine = engine
    auth.install(app, auth.access_for(engine, admin_token=admin_token, read_token=read_token),
                 unguarded=extra_routes or ())
    return app

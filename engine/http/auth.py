"""Who may call what on the JSON API (contract §4/§6): one table, one check, one record.

* ``RULES``: every route (method, path) -> the rights that open it (engine/access/roles.py).
  ``create_app`` refuses to start if one of its routes has no rule.
* ``authorize`` (an app-wide ``before_request`` hook): the bearer token is the admin token, the
  read token or a live API key (engine/access/apikeys.py), else 401; a credential without the
  route's right gets 403 ``{"error": "forbidden"}``. A ``topup`` key may post a batch of
  transfers only if every transfer is a top-up (code 4) from its own clearing account: any
  other batch is refused whole, before anything is posted.
* ``record_writes`` (middleware): every write made with an API key (or an operator, later) is
  appended to the operator log before its answer leaves, with what it acted on (ids picked from
  the request, never a body) and its outcome (the answer's status). The two shared tokens are
  not people or machines anyone can be held to, and are not logged.

A hook rather than Litestar guards: a guard is handed a copy of its route handler on every
request (~8% of a one-transfer POST's server CPU); the hook runs at the same point for free.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any, Final, cast

import msgspec
from litestar import Litestar, Request
from litestar.enums import ScopeType
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from engine import limits
from engine.access.apikeys import ApiKey, KeyRing, looks_like_key
from engine.access.oplog import Entry, OperatorLog
from engine.access.roles import (
    ADMIN_TOKEN_RIGHTS,
    READ_TOKEN_RIGHTS,
    Right,
    Role,
    rights_of,
)
from ledger.transfer import Transfer
from ledger.types import TransferCode

_R = Right


def _any(*rights: Right) -> frozenset[Right]:
    return frozenset(rights)


PUBLIC: Final = _any(_R.PUBLIC)
READ: Final = _any(_R.READ)

RULES: Final[dict[tuple[str, str], frozenset[Right]]] = {
    # ledger (contract §4)
    ("POST", "/v1/accounts"): _any(_R.LEDGER_WRITE),
    ("POST", "/v1/transfers"): _any(_R.LEDGER_WRITE, _R.TOPUP),
    ("GET", "/v1/transfers/{transfer_id}"): READ,
    ("GET", "/v1/accounts/{account_id}/balance"): READ,
    ("GET", "/v1/accounts/{account_id}/transfers"): READ,
    # campus
    ("POST", "/v1/holders"): _any(_R.CAMPUS_WRITE),
    ("POST", "/v1/cards"): _any(_R.CAMPUS_WRITE),
    ("POST", "/v1/cards/{card_no}/report-lost"): _any(_R.CAMPUS_WRITE),
    ("POST", "/v1/cards/{card_no}/found"): _any(_R.CAMPUS_WRITE),
    ("POST", "/v1/cards/{card_no}/replace"): _any(_R.CAMPUS_WRITE),
    ("POST", "/v1/cards/{card_no}/close"): _any(_R.CAMPUS_WRITE),
    ("POST", "/v1/cards/{card_no}/pin-tries/reset"): _any(_R.CAMPUS_WRITE),
    ("GET", "/v1/cards/{card_no}/balance"): READ,
    ("POST", "/v1/terminals"): _any(_R.TERMINALS),
    ("POST", "/v1/rooms"): _any(_R.CAMPUS_WRITE),
    ("POST", "/v1/subsidies"): _any(_R.CAMPUS_WRITE),
    # people, roles and keys (contract §6)
    ("POST", "/v1/holders/{holder_id}/activation"): _any(_R.CAMPUS_WRITE),
    ("POST", "/v1/rooms/{room_id}/residents"): _any(_R.CAMPUS_WRITE),
    ("DELETE", "/v1/rooms/{room_id}/residents/{holder_id}"): _any(_R.CAMPUS_WRITE),
    ("GET", "/v1/operator-log"): _any(_R.OPERATOR_LOG),
    # operations: open to all (no ledger or personal data)
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/schema"): PUBLIC,
    ("GET", "/schema/openapi.json"): PUBLIC,
    ("GET", "/schema/{path}"): PUBLIC,
}
"""(method, path) -> the rights of which any one opens the route. Litestar's own OPTIONS
answers (the allowed methods, no data) are public."""

PAGE_PREFIXES: Final = ("/self", "/console", "/static")
"""The HTML doors (engine/web): no bearer token there; a page's own session, its CSRF check and
(on the console) the operator's role decide, in engine/web. A /v1 route is never among them."""

_WRITES: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_PRINCIPAL: Final = "onecard.principal"
_TARGET: Final = "onecard.target"
_TRANSFERS: Final = msgspec.json.Decoder(list[Transfer])  # the handler's own decoding
_TOPUP_CODE: Final = int(TransferCode.TOP_UP)


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: ``actor`` (key name or username), ``role``, what they may do, and
    whether their writes go to the operator log."""

    actor: str
    role: str
    rights: frozenset[Right]
    logged: bool
    clearing: tuple[int, int] | None = None  # (ledger, account) of a topup key


def key_principal(key: ApiKey) -> Principal:
    """An API key as a caller."""
    clearing = None
    if key.clearing_ledger is not None and key.clearing_account_id is not None:
        clearing = (key.clearing_ledger, key.clearing_account_id)
    return Principal(key.name, str(key.role), rights_of(key.role), True, clearing)


class Access:
    """The app's credentials (the two tokens and the key ring) and its operator log."""

    def __init__(self, *, admin_token: str, read_token: str, keys: KeyRing,
                 oplog: OperatorLog) -> None:
        self.admin_token = admin_token.encode()
        self.read_token = read_token.encode()
        self.keys = keys
        self.oplog = oplog
        self.rules: dict[tuple[str, str], frozenset[Right]] = {}
        self._admin = Principal("admin-token", str(Role.ADMIN), ADMIN_TOKEN_RIGHTS, False)
        self._read = Principal("read-token", "read", READ_TOKEN_RIGHTS, False)
        self._principals: dict[ApiKey, Principal] = {}  # made once per key, not per request

    async def principal(self, token: str) -> Principal | None:
        """The caller a bearer token names, or None."""
        raw = token.encode("utf-8", "surrogatepass")
        # both comparisons are made: no timing hint about which token it was
        ok_admin = hmac.compare_digest(raw, self.admin_token)
        ok_read = hmac.compare_digest(raw, self.read_token)
        if ok_admin:
            return self._admin
        if ok_read:
            return self._read
        if not looks_like_key(token):
            return None
        key = await self.keys.lookup(token)
        if key is None:
            return None
        who = self._principals.get(key)
        if who is None:
            if len(self._principals) >= limits.MAX_CACHED_CREDENTIALS:
                self._principals.clear()
            who = self._principals[key] = key_principal(key)
        return who

    async def close(self) -> None:
        """Stop the key ring's listener."""
        await self.keys.close()


def bind(app: Litestar, access: Access, *, unguarded: Iterable[Any] = ()) -> None:
    """Give every route of ``app`` its rule; raise LookupError for a route without one.
    ``unguarded`` route handlers (a test's extra routes) are public."""
    open_fns = {getattr(h, "fn", h) for h in unguarded}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            for method in handler.http_methods:
                key = (method, route.path_format)
                if method == "OPTIONS" or handler.fn in open_fns:
                    access.rules[key] = RULES.get(key, PUBLIC)
                elif key in RULES:
                    access.rules[key] = RULES[key]
                elif route.path_format.startswith(PAGE_PREFIXES):
                    access.rules[key] = PUBLIC
                else:
                    raise LookupError(f"no access rule for {method} {route.path_format}")


def _token(request: Request[Any, Any, Any]) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise NotAuthorizedException("missing bearer token")
    return token


async def authorize(request: Request[Any, Any, Any]) -> None:
    """The app-wide before_request hook: see the module docstring."""
    scope = cast(dict[str, Any], request.scope)
    access: Access = request.app.state.access
    method: str = scope["method"]
    needed = access.rules.get((method, scope["path_template"]))
    if needed is None:  # bind() gives every route a rule: fail closed if one slipped through
        raise PermissionDeniedException("forbidden: this route has no access rule")
    if needed is PUBLIC:
        return
    who = await access.principal(_token(request))
    if who is None:
        raise NotAuthorizedException("bad token")
    scope[_PRINCIPAL] = who
    if who.logged and method in _WRITES:  # named in the log even when refused
        body = await request.body()
        scope[_TARGET] = target_of(scope["path_params"], body)
    if not (who.rights & needed):
        raise PermissionDeniedException(f"forbidden: {who.role} may not {method} this")
    if Right.LEDGER_WRITE not in who.rights and Right.TOPUP in needed:
        await _only_topups(request, who)


async def _only_topups(request: Request[Any, Any, Any], who: Principal) -> None:
    """Refuse (403) a batch with any transfer that is not a top-up from the key's clearing
    account. A body that does not decode is left to the handler (400, nothing posted)."""
    try:
        transfers = _TRANSFERS.decode(await request.body())
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    if who.clearing is None or not all(_is_own_topup(t, who.clearing) for t in transfers):
        raise PermissionDeniedException(
            "forbidden: a topup key posts only top-ups (code 4) from its own clearing account")


def _is_own_topup(t: Transfer, clearing: tuple[int, int]) -> bool:
    return t.code == _TOPUP_CODE and (t.ledger, t.debit_account_id) == clearing


# -- the record ---------------------------------------------------------------------------------

# Fields a target may name (ids only: a PIN, a MAC key or a name is never copied).
_ID_FIELDS: Final = ("id", "card_no", "new_card_no", "holder_id", "terminal_id", "room_id",
                     "batch_id")
_SHOWN_IDS: Final = 5


class _Ids(msgspec.Struct):
    """The id fields of a body (everything else in it is skipped, never read into the log)."""

    id: str | int | None = None
    card_no: str | None = None
    new_card_no: str | None = None
    holder_id: str | None = None
    terminal_id: str | None = None
    room_id: str | None = None
    batch_id: str | None = None


class _Status(msgspec.Struct):
    """The business status fields of an answer."""

    status: str | None = None
    error: str | None = None
    new: _Status | None = None  # a replacement: the new card's status


_ID_LIST: Final = msgspec.json.Decoder(list[_Ids])
_ID_ONE: Final = msgspec.json.Decoder(_Ids)
_STATUS_LIST: Final = msgspec.json.Decoder(list[_Status])
_STATUS_ONE: Final = msgspec.json.Decoder(_Status)


def _ids(x: _Ids) -> list[str]:
    return [f"{f}={v}" for f in _ID_FIELDS if (v := getattr(x, f)) is not None]


def target_of(params: dict[str, Any], body: bytes) -> str:
    """What a write acts on: its path parameters and the ids in its body."""
    parts = [f"{k}={v}" for k, v in params.items()]
    if body:
        try:
            if body.lstrip()[:1] == b"[":
                items = _ID_LIST.decode(body)
                shown = [next(iter(_ids(x)), "?=?").partition("=")[2]
                         for x in items[:_SHOWN_IDS]]
                more = f" +{len(items) - len(shown)}" if len(items) > len(shown) else ""
                parts.append(f"{len(items)} items: {', '.join(shown)}{more}")
            else:
                parts += _ids(_ID_ONE.decode(body))
        except (msgspec.DecodeError, msgspec.ValidationError):
            parts.append("malformed body")
    return "; ".join(parts) or "-"


def outcome_of(status: int, body: bytes) -> str:
    """The status of an answer, with its business status(es) when it names them."""
    detail = ""
    try:
        if body.lstrip()[:1] == b"[":
            counts: dict[str, int] = {}
            for x in _STATUS_LIST.decode(body):
                counts[str(x.status)] = counts.get(str(x.status), 0) + 1
            detail = " ".join(f"{k}={n}" for k, n in sorted(counts.items()))
        elif body:
            one = _STATUS_ONE.decode(body)
            detail = (one.new.status if one.new is not None else None) or one.error or (
                one.status or "")
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    return f"{status} {detail}".strip()


_UNAVAILABLE: Final = (b'{"error":"unavailable","detail":"the operator log is unavailable; '
                       b'the write may have been made: retry it (writes are idempotent)"}')


def record_writes(app: ASGIApp) -> ASGIApp:
    """Middleware: hold the answer to a logged caller's write until its operator log entry is
    committed (a log that cannot be written answers 503 instead)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        s = cast(dict[str, Any], scope)
        if s["type"] != ScopeType.HTTP or s["method"] not in _WRITES:
            await app(scope, receive, send)
            return
        held: list[dict[str, Any]] = []

        async def send_wrapper(message: Message) -> None:
            who: Principal | None = s.get(_PRINCIPAL)
            if who is None or not who.logged:
                await send(message)
                return
            m = cast(dict[str, Any], message)
            held.append(m)
            if m["type"] == "http.response.body" and not m.get("more_body"):
                await _log_then_send(s, who, held, send)

        await app(scope, receive, send_wrapper)

    return middleware


async def _log_then_send(
    scope: dict[str, Any], who: Principal, held: list[dict[str, Any]], send: Send
) -> None:
    start = held[0]
    status: int = start["status"]
    body = held[1].get("body", b"") if len(held) == 2 else b"".join(
        m.get("body", b"") for m in held[1:])
    access: Access = scope["app"].state.access
    entry = Entry(who.actor, who.role, f"{scope['method']} {scope['path_template']}",
                  str(scope.get(_TARGET, "-")), outcome_of(status, body))
    try:
        await access.oplog.record(entry)
    except Exception:  # the database went away: the client retries, and the retry is logged
        headers = [(b"content-type", b"application/json"),
                   (b"retry-after", str(limits.RETRY_AFTER_S).encode()),
                   (b"content-length", str(len(_UNAVAILABLE)).encode())]
        await send(cast(Message, {"type": "http.response.start", "status": 503,
                                  "headers": headers}))
        await send(cast(Message, {"type": "http.response.body", "body": _UNAVAILABLE}))
        return
    for m in held:
        await send(cast(Message, m))


def install(app: Litestar, access: Access, *, unguarded: Iterable[Any] = ()) -> None:
    """Bind the rules and keep ``access`` on the app (create_app calls this)."""
    bind(app, access, unguarded=unguarded)
    app.state.access = access



def access_for(engine: Any, *, admin_token: str, read_token: str) -> Access:
    """The credentials and operator log of an app over ``engine`` (its pool is taken when
    first needed, so the engine may start after the app is made)."""

    def pool() -> Any:
        return engine.store.pool

    return Access(
        admin_token=admin_token,
        read_token=read_token,
        keys=KeyRing(pool, listen_dsn=lambda: getattr(engine, "dsn", None)),
        oplog=OperatorLog(pool),
    )

"""The pages of /self a holder reads (contract §7): home, statement, one transfer, electricity,
the room's monthly statement and the card's settings. The forms they carry post to
``self_forms``.

Every handler resolves the session's holder first (``holder_of``) and passes only that
holder to the domain (engine/selfservice); whatever a query names (an account, a room, a
transfer) must be the holder's own, or the answer is 404, exactly as for something that does
not exist.
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import date, datetime
from typing import Any, Final, NamedTuple

from litestar import Request, Response, get
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler

from engine import limits
from engine.calendar import campus_tz_name, from_ns, parse_month
from engine.campus import Campus
from engine.selfservice import SelfService
from engine.selfservice.holders import HolderRef, Overview
from engine.selfservice.statement import NEWEST, Line
from engine.web import render
from engine.web.errors import Refusal, WebError
from engine.web.gate import current_session, now
from engine.web.i18n import N_
from engine.web.money import plain_yuan
from engine.web.state import web_state

log = logging.getLogger(__name__)

_SERVICE: Final = "self_service"  # app.state: the SelfService
LOW_BALANCE_ENV: Final = "ONECARD_SELF_LOW_BALANCE_FEN"
LOW_ROOM_ENV: Final = "ONECARD_SELF_LOW_ROOM_FEN"

# The card's state in words (contract §7: #card-status's text in the page's language).
CARD_STATUS: Final = {
    "active": N_("Active"),
    "lost": N_("Reported lost"),
    "replaced": N_("Replaced"),
    "closed": N_("Closed"),
}
# What a transfer was, by its code (contract §1).
TRANSFER_CODES: Final = {
    1: N_("Meal"),
    2: N_("Hot water"),
    3: N_("Electricity"),
    4: N_("Top-up"),
    5: N_("Subsidy"),
    6: N_("Refund"),
    7: N_("Reversal"),
    8: N_("Adjustment"),
    9: N_("Closure payout"),
}
TRANSFER_STATES: Final = {
    "posted": N_("Done"),
    "pending": N_("Held"),
    "settled": N_("Settled"),
    "voided": N_("Released"),
    "expired": N_("Released (expired)"),
}
# The room statement's lines (engine/finance/statements.py's items).
ROOM_ITEMS: Final = {
    "opening": N_("Opening balance"),
    "purchase": N_("Electricity purchase"),
    "consumption": N_("Electricity used"),
    "reversal": N_("Reversal"),
    "other": N_("Other"),
    "closing": N_("Closing balance"),
}


def _env_fen(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.isascii() and raw.isdigit() and len(raw) <= 18:
        return int(raw)
    log.warning("%s=%r is not a whole number of fen; %d is used", name, raw, default)
    return default


def self_service(request: Request[Any, Any, Any]) -> SelfService:
    """The app's SelfService, made on first use over the app's Campus (shared with the API's
    campus routes and, under ``onecard serve``, the terminal gateway)."""
    state: Any = request.app.state
    found = state.get(_SERVICE)
    if found is None:
        campus: Campus | None = getattr(state, "campus", None)
        if campus is None:
            campus = Campus(state.engine, tz=campus_tz_name())
            state.campus = campus
        found = SelfService(
            campus,
            low_balance_fen=_env_fen(LOW_BALANCE_ENV, limits.SELF_LOW_BALANCE_FEN),
            low_room_fen=_env_fen(LOW_ROOM_ENV, limits.SELF_LOW_ROOM_FEN),
        )
        state[_SERVICE] = found
    assert isinstance(found, SelfService)
    return found


async def holder_of(request: Request[Any, Any, Any]) -> tuple[SelfService, HolderRef]:
    """The service and the session's holder; 404 when the session names no holder."""
    session = current_session(request)
    assert session is not None  # the gate sent a request without one to the login
    service = self_service(request)
    ref = await service.holder(session.subject)
    if ref is None:
        raise WebError(404, Refusal.NOT_FOUND)
    return service, ref


def query(request: Request[Any, Any, Any], name: str) -> str | None:
    """A query parameter given once, or None; a repeated or oversized one is 400."""
    try:
        values = request.query_params.getall(name, [])
    except Exception:  # a query string the framework cannot parse
        raise HTTPException(status_code=400) from None
    if not values:
        return None
    if len(values) > 1 or len(values[0]) > limits.WEB_MAX_FIELD_CHARS:
        raise HTTPException(status_code=400)
    value: str = values[0]
    return value


def own_account(ref: HolderRef, raw: str | None) -> tuple[int, ...]:
    """The purses a statement shows: both, or the one ``account_id`` names (someone else's,
    or no account at all: 404)."""
    if raw is None:
        return ref.purses
    if raw.isascii() and raw.isdigit() and len(raw) <= 19 and int(raw) in ref.purses:
        return (int(raw),)
    raise WebError(404, Refusal.NOT_FOUND)


def local_time(service: SelfService, ns: int) -> str:
    """An engine timestamp as campus-local minutes."""
    return from_ns(ns, service.campus.tz).strftime("%Y-%m-%d %H:%M")


def this_month(service: SelfService, request: Request[Any, Any, Any]) -> date:
    """The campus-local month of the web clock."""
    at: datetime = now(web_state(request.app)).astimezone(service.campus.tz)
    return date(at.year, at.month, 1)


def _page(request: Request[Any, Any, Any], template: str, **context: Any) -> Response[bytes]:
    return render.page(request, template, card_status=CARD_STATUS, **context)


@get("/", name="self-home")
async def home(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Balances, the card (report lost / found), the room, the limits (contract §7)."""
    session = current_session(request)
    assert session is not None
    service = self_service(request)
    ref = await service.holder(session.subject)
    overview: Overview | None = await service.overview(ref) if ref is not None else None
    return _page(request, "self_home.html", subject=session.subject, ref=ref, ov=overview)


@get("/statement", name="self-statement")
async def statement(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Twenty of the holder's transfers a page, newest first; ``before`` pages on."""
    service, ref = await holder_of(request)
    accounts = own_account(ref, query(request, "account_id"))
    raw = query(request, "before")
    before = None
    if raw is not None:
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 19 and int(raw) <= NEWEST):
            raise HTTPException(status_code=400)
        before = int(raw)
    page = await service.statement(ref, before=before, accounts=accounts)
    next_url = None
    if page.next_before is not None:
        kept = f"&account_id={accounts[0]}" if len(accounts) == 1 else ""
        next_url = f"/self/statement?before={page.next_before}{kept}"
    return _page(request, "self_statement.html", rows=_rows(request, service, page.lines),
                 next_url=next_url, first_page=before is None)


class Row(NamedTuple):
    """A statement line as the page shows it (words already in the page's language: a page
    of twenty rows renders in a fraction of the time twenty macro and gettext calls take)."""

    transfer_id: str
    code: int
    fen: int
    when: str
    name: str
    tag: str  # a hold's state, or "released"; empty for the rest
    held: int


def _rows(
    request: Request[Any, Any, Any], service: SelfService, lines: list[Line]
) -> list[Row]:
    words = {code: render.gettext(request, msg) for code, msg in TRANSFER_CODES.items()}
    other = render.gettext(request, ROOM_ITEMS["other"])
    rows = []
    for line in lines:
        tag = ""
        if line.is_hold:
            tag = render.gettext(request, TRANSFER_STATES[line.state.value])
        elif line.released:
            tag = render.gettext(request, TRANSFER_STATES["voided"])
        rows.append(Row(str(line.transfer_id), line.code, line.fen,
                        local_time(service, line.timestamp), words.get(line.code, other), tag,
                        line.held))
    return rows


@get("/transfers/{transfer_id:str}", name="self-transfer")
async def transfer(request: Request[Any, Any, Any]) -> Response[bytes]:
    """One of the holder's transfers; anyone else's (or none) is 404."""
    service, ref = await holder_of(request)
    transfer_id = str(request.path_params["transfer_id"])
    try:
        tid = uuid.UUID(transfer_id) if len(transfer_id) <= 64 else None
    except ValueError:
        tid = None
    line = await service.transfer(ref, tid) if tid is not None else None
    if line is None:
        raise WebError(404, Refusal.NOT_FOUND)
    return _page(request, "self_transfer.html", line=line, codes=TRANSFER_CODES,
                 states=TRANSFER_STATES, when=local_time(service, line.timestamp))


def own_room_id(overview: Overview, raw: str | None) -> None:
    """A ``room_id`` a page is given must be the holder's room (else 404)."""
    if raw is not None and raw != overview.room_id:
        raise WebError(404, Refusal.NOT_FOUND)


@get("/electricity", name="self-electricity")
async def electricity(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The holder's room, its electricity purse and the purchase form."""
    service, ref = await holder_of(request)
    overview = await service.overview(ref)
    own_room_id(overview, query(request, "room_id"))
    return _page(request, "self_electricity.html", ov=overview, key=uuid.uuid4().hex,
                 amount="", error=None)


@get("/room-statement", name="self-room-statement")
async def room_statement(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The room's electricity statement of ``month`` (YYYY-MM; this month by default)."""
    service, ref = await holder_of(request)
    room = await service.room(ref)
    raw_room = query(request, "room_id")
    if raw_room is not None and (room is None or raw_room != room.room_id):
        raise WebError(404, Refusal.NOT_FOUND)
    raw = query(request, "month")
    error = False
    month = this_month(service, request)
    if raw:
        try:
            month = parse_month(raw)
        except ValueError:
            error = True
    subject = None
    if room is not None and not error:
        subject = await service.room_statement(ref, room, month)
    return _page(request, "self_room_statement.html", status=400 if error else 200,
                 room=room, subject=subject, month=f"{month:%Y-%m}", bad_month=error,
                 items=ROOM_ITEMS, when=lambda ns: local_time(service, ns))


@get("/settings", name="self-settings")
async def settings(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The card's PIN and the holder's own daily limit."""
    service, ref = await holder_of(request)
    overview = await service.overview(ref)
    own = "" if overview.own_limit is None else plain_yuan(overview.own_limit)
    return _page(request, "self_settings.html", ov=overview, own_limit=own)


def page_handlers() -> list[HTTPRouteHandler]:
    """The pages above (paths relative to /self)."""
    return [home, statement, transfer, electricity, room_statement, settings]

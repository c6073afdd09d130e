"""HTTP routes of the campus layer (contract §4): holders, cards, terminals, rooms, subsidies.

Thin handlers over :class:`engine.campus.Campus`, with app.py's error shape and conventions
(who may call what: engine/http/auth.py); malformed input is a 400
``{"error", "detail"}``, an unknown holder, card or account a 404, and a refused state change
(a second active card, a closed card reported lost, ...) a 400 whose detail says why.

Beyond the contract's list: ``POST /v1/cards/{card_no}/found`` (a lost card turned up: active
again, purses unfrozen) and ``POST /v1/cards/{card_no}/pin-tries/reset`` (the card office
forgives the card's wrong PINs: after 5 in a day its PIN checks answer 75 until then).
``POST /v1/subsidies`` credits subsidy purses from each ledger's fund; its body is a list of
``{ledger, holder_id, amount, batch_id}`` and the transfer id of an item is derived from
(ledger, batch_id, holder_id), so posting the same batch again credits nobody twice.
It creates nothing but the credits: the fund is created with the ledger's holders, an unknown
holder answers ``holder_not_found`` and a ledger without a fund ``fund_not_found``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar
from uuid import UUID

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath, JSONBody

from engine import limits
from engine.batcher import Overloaded, Unavailable
from engine.campus import (
    Campus,
    Card,
    CardStatus,
    HolderKind,
    Refused,
    RegistryStatus,
    TerminalKind,
)
from engine.campus.subsidies import MAX_BATCH_ID_LEN, Grant, grant_problem, grant_subsidies
from engine.faults import RETRYABLE
from engine.http.errors import ApiError, ErrorCode
from engine.service import Engine
from ledger.account import AccountName, HolderId
from ledger.types import INT32_MAX, INT64_MAX, TEXT_WITHOUT_NUL, AccountKind, whole_match

T = TypeVar("T")

# -- wire shapes -----------------------------------------------------------------------------

# Patterns match whole strings only (whole_match: "12345678\n" is no card number; it would
# pass a plain ^...$ and then fail the table's CHECK, a 500).
LedgerNo = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
CardNo = Annotated[str, msgspec.Meta(pattern=whole_match("[0-9]{8,19}"))]
Pin = Annotated[str, msgspec.Meta(pattern=whole_match("[0-9]{4,6}"))]
Fen = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
PositiveFen = Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)]
AccountNo = Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)]
# ISO 8583 "ans": printable ASCII; the lengths are fields 41, 42 and 102.
TerminalId = Annotated[str, msgspec.Meta(pattern=whole_match(r"[\x20-\x7e]{8}"))]
MerchantId = Annotated[str, msgspec.Meta(pattern=whole_match(r"[\x20-\x7e]{15}"))]
RoomId = Annotated[str, msgspec.Meta(pattern=whole_match(r"[\x20-\x7e]{1,28}"))]
MacKeyHex = Annotated[str, msgspec.Meta(pattern=whole_match("[0-9A-Fa-f]{64}"))]
# It goes into every grant's user_data ("subsidy " + it), which holds 256 bytes: up to 64
# characters, and at most MAX_BATCH_ID_BYTES bytes of UTF-8 (checked by engine.campus.subsidies).
BatchId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_BATCH_ID_LEN,
                                      pattern=TEXT_WITHOUT_NUL)]


class HolderIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/holders`` body."""

    id: HolderId
    ledger: LedgerNo
    name: AccountName
    kind: HolderKind


class HolderOut(msgspec.Struct, frozen=True):
    """``POST /v1/holders`` answer."""

    id: str
    status: RegistryStatus
    purse_account_id: int
    subsidy_account_id: int


class CardIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/cards`` body (contract §2's card fields). ``ledger`` may be left out when
    the holder id exists in one ledger only; ``status``, if sent, must be ``active``."""

    card_no: CardNo
    holder_id: HolderId
    ledger: LedgerNo | None = None
    status: CardStatus | None = None
    daily_limit: Fen | None = None
    pin: Pin | None = None
    pin_threshold: Fen | None = None


class CardOut(msgspec.Struct, frozen=True):
    """A card number and its status."""

    card_no: str
    status: CardStatus


class ReplaceIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/cards/{card_no}/replace`` body."""

    new_card_no: CardNo


class ReplaceOut(msgspec.Struct, frozen=True):
    """``POST /v1/cards/{card_no}/replace`` answer."""

    old: CardOut
    new: CardOut


class PurseOut(msgspec.Struct, frozen=True):
    """One purse of a card's holder."""

    account_id: int
    kind: AccountKind
    balance: int
    available: int


class CardBalanceOut(msgspec.Struct, frozen=True):
    """``GET /v1/cards/{card_no}/balance`` answer."""

    card_no: str
    holder_id: str
    status: CardStatus
    purses: list[PurseOut]
    total_available: int


class TerminalIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/terminals`` body."""

    terminal_id: TerminalId
    merchant_id: MerchantId
    ledger: LedgerNo
    kind: TerminalKind
    account_id: AccountNo
    mac_key: MacKeyHex


class TerminalOut(msgspec.Struct, frozen=True):
    """``POST /v1/terminals`` answer."""

    terminal_id: str
    status: RegistryStatus


class RoomIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/rooms`` body."""

    room_id: RoomId
    ledger: LedgerNo


class RoomOut(msgspec.Struct, frozen=True):
    """``POST /v1/rooms`` answer."""

    room_id: str
    account_id: int


class SubsidyIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One item of ``POST /v1/subsidies``."""

    ledger: LedgerNo
    holder_id: HolderId
    amount: PositiveFen
    batch_id: BatchId


class SubsidyOut(msgspec.Struct, frozen=True, omit_defaults=True):
    """The answer for one subsidy item: the transfer id and its status (a transfer status,
    ``holder_not_found`` or ``fund_not_found``)."""

    ledger: int
    holder_id: str
    id: UUID
    status: str
    timestamp: int | None = None


# -- helpers -----------------------------------------------------------------------------------


def campus_of(request: Request[Any, Any, Any]) -> Campus:
    """The app's Campus, created on first use (campus time zone: ``ONECARD_TZ``)."""
    state = request.app.state
    campus: Campus | None = getattr(state, "campus", None)
    if campus is None:
        engine: Engine = state.engine
        campus = Campus(engine)
        state.campus = campus
    return campus


async def _call(op: Awaitable[T]) -> T:
    """Run a campus operation; database trouble is a 503 (the client retries)."""
    try:
        return await op
    except Overloaded as e:
        raise ApiError(503, ErrorCode.OVERLOADED, str(e)) from e
    except (Unavailable, *RETRYABLE) as e:
        raise ApiError(503, ErrorCode.UNAVAILABLE, f"database unavailable: {e}") from e


def _ok(result: T | Refused) -> T:
    if isinstance(result, Refused):
        if result.reason.not_found:
            raise ApiError(404, ErrorCode.NOT_FOUND, result.detail)
        raise ApiError(400, ErrorCode.INVALID_BODY, f"{result.reason}: {result.detail}")
    return result


def _card_no(raw: str) -> str:
    if not (8 <= len(raw) <= 19 and raw.isascii() and raw.isdigit()):
        raise ApiError(400, ErrorCode.INVALID_PARAMETER, f"not a card number: {raw!r}")
    return raw


def _card_out(card: Card) -> CardOut:
    return CardOut(card.card_no, card.status)


# -- routes --------------------------------------------------------------------------------------


@post("/v1/holders", status_code=200)
async def create_holder(request: Request[Any, Any, Any], data: JSONBody[HolderIn]) -> HolderOut:
    """Register a holder with its cash and subsidy purses (idempotent)."""
    r = _ok(await _call(campus_of(request).create_holder(
        holder_id=data.id, ledger=data.ledger, name=data.name, kind=data.kind)))
    return HolderOut(data.id, r.status, r.holder.purse_account_id, r.holder.subsidy_account_id)


@post("/v1/cards", status_code=200)
async def create_card(request: Request[Any, Any, Any], data: JSONBody[CardIn]) -> CardOut:
    """Issue an active card to a holder; the same card again answers its current status."""
    if data.status not in (None, CardStatus.ACTIVE):
        raise ApiError(400, ErrorCode.INVALID_BODY, "a new card is active")
    card = _ok(await _call(campus_of(request).create_card(
        card_no=data.card_no, holder_id=data.holder_id, ledger=data.ledger,
        daily_limit=data.daily_limit, pin=data.pin, pin_threshold=data.pin_threshold)))
    return _card_out(card)


@post("/v1/cards/{card_no:str}/report-lost", status_code=200)
async def report_lost(request: Request[Any, Any, Any], card_no: FromPath[str]) -> CardOut:
    """Report a card lost: its holder's purses are frozen at once."""
    return _card_out(_ok(await _call(campus_of(request).report_lost(_card_no(card_no)))))


@post("/v1/cards/{card_no:str}/found", status_code=200)
async def card_found(request: Request[Any, Any, Any], card_no: FromPath[str]) -> CardOut:
    """A lost card turned up: active again, purses unfrozen (extension)."""
    return _card_out(_ok(await _call(campus_of(request).card_found(_card_no(card_no)))))


@post("/v1/cards/{card_no:str}/replace", status_code=200)
async def replace_card(
    request: Request[Any, Any, Any], card_no: FromPath[str], data: JSONBody[ReplaceIn]
) -> ReplaceOut:
    """Replace an active or lost card: the new card takes over the same purses."""
    r = _ok(await _call(campus_of(request).replace_card(_card_no(card_no), data.new_card_no)))
    return ReplaceOut(old=_card_out(r.old), new=_card_out(r.new))


@post("/v1/cards/{card_no:str}/close", status_code=200)
async def close_card(request: Request[Any, Any, Any], card_no: FromPath[str]) -> CardOut:
    """Close a card for good."""
    return _card_out(_ok(await _call(campus_of(request).close_card(_card_no(card_no)))))


@post("/v1/cards/{card_no:str}/pin-tries/reset", status_code=200)
async def reset_pin_tries(request: Request[Any, Any, Any], card_no: FromPath[str]) -> CardOut:
    """Forget the card's wrong PINs: its right PIN gets in again at once (extension)."""
    return _card_out(_ok(await _call(campus_of(request).reset_pin_tries(_card_no(card_no)))))


@get("/v1/cards/{card_no:str}/balance")
async def card_balance(request: Request[Any, Any, Any], card_no: FromPath[str]) -> CardBalanceOut:
    """The card's status and its holder's purses."""
    b = await _call(campus_of(request).card_balance(_card_no(card_no)))
    if b is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no card {card_no}")
    return CardBalanceOut(
        card_no=b.card.card_no,
        holder_id=b.card.holder_id,
        status=b.card.status,
        purses=[PurseOut(p.account_id, p.kind, p.balance, p.available) for p in b.purses],
        total_available=b.total_available,
    )


@post("/v1/terminals", status_code=200)
async def register_terminal(
    request: Request[Any, Any, Any], data: JSONBody[TerminalIn]
) -> TerminalOut:
    """Register a terminal; it may only credit its own merchant or utility account."""
    status = _ok(await _call(campus_of(request).register_terminal(
        terminal_id=data.terminal_id, merchant_id=data.merchant_id, ledger=data.ledger,
        kind=data.kind, account_id=data.account_id, mac_key=bytes.fromhex(data.mac_key))))
    return TerminalOut(data.terminal_id, status)


@post("/v1/rooms", status_code=200)
async def create_room(request: Request[Any, Any, Any], data: JSONBody[RoomIn]) -> RoomOut:
    """Create a dorm room and its electricity purse (idempotent)."""
    room = _ok(await _call(campus_of(request).create_room(room_id=data.room_id,
                                                          ledger=data.ledger)))
    return RoomOut(room.room_id, room.account_id)


@post("/v1/subsidies", status_code=200)
async def grant(
    request: Request[Any, Any, Any], data: JSONBody[list[SubsidyIn]]
) -> list[SubsidyOut]:
    """Credit subsidy purses from the ledger's fund (code 5), one status per item in request
    order; a holder that does not exist answers ``holder_not_found``, a ledger without its
    fund ``fund_not_found`` (nothing is created for them: no account, no ledger)."""
    if not data:
        raise ApiError(400, ErrorCode.INVALID_BODY, "the list of subsidies is empty")
    if len(data) > limits.MAX_TRANSFERS_PER_REQUEST:
        raise ApiError(413, ErrorCode.TOO_LARGE, f"at most {limits.MAX_TRANSFERS_PER_REQUEST}")
    grants = [Grant(d.ledger, d.holder_id, d.amount, d.batch_id) for d in data]
    for i, g in enumerate(grants):  # before anything reaches a batch (see grant_problem)
        problem = grant_problem(g)
        if problem is not None:
            raise ApiError(400, ErrorCode.INVALID_BODY, f"[{i}]: {problem}")
    engine: Engine = request.app.state.engine
    results = await _call(grant_subsidies(engine, grants))
    return [SubsidyOut(r.ledger, r.holder_id, r.id, str(r.status), r.timestamp)
            for r in results]


ROUTES: list[Callable[..., Awaitable[Any]] | Any] = [
    create_holder,
    create_card,
    report_lost,
    card_found,
    replace_card,
    close_card,
    reset_pin_tries,
    card_balance,
    register_terminal,
    create_room,
    grant,
]

"""The forms of /self (contract §7): report lost, found, PIN, the holder's own limit and the
electricity purchase. Each answers a page with ``#result`` (``data-status``) or, for input
that cannot be used, the form again with ``#error``; nothing is changed by a form that is
refused (the gate has checked its ``csrf`` field before any of this runs).

A field naming a card or a room must name the holder's own, or the answer is 404 and nothing
changes. Report lost and found ask for the password again (the verifier's lockout counts a
wrong one like a failed login).
"""

from __future__ import annotations

import uuid
from typing import Any, Final

from litestar import Request, Response, post
from litestar.datastructures import FormMultiDict
from litestar.handlers import HTTPRouteHandler

from engine import limits
from engine.selfservice import SelfService
from engine.selfservice.holders import HolderRef
from engine.web import render
from engine.web.auth import LoginOutcome
from engine.web.errors import Refusal, WebError
from engine.web.gate import current_session
from engine.web.i18n import N_
from engine.web.login import form_field
from engine.web.money import AMOUNT_MESSAGES, AmountError, parse_yuan, plain_yuan
from engine.web.results import Words, pick
from engine.web.self_pages import CARD_STATUS, holder_of, own_room_id
from engine.web.sessions import SessionKind
from engine.web.state import web_state

# #result: a heading and a sentence for each data-status (msgids).
RESULTS: Final[dict[str, Words]] = {
    "wrong_password": Words(N_("Wrong password"), N_("Nothing was changed. Check your password.")),
    "locked": Words(
        N_("Too many failed attempts"),
        N_("Nothing was changed. Your id is locked for a while; try again later.")),
    "lost:done": Words(
        N_("Card reported lost"),
        N_("Your card is blocked: nobody can pay with it. Your money is safe.")),
    "lost:unchanged": Words(N_("Already reported lost"), N_("Your card was already blocked.")),
    "found:done": Words(N_("Card active again"), N_("You can pay with your card again.")),
    "found:unchanged": Words(N_("Card already active"), N_("Your card was not reported lost.")),
    "no_card": Words(N_("No card"), N_("You have no card this applies to.")),
    "refused": Words(
        N_("Not possible"), N_("This cannot be done with your card. Ask the card office.")),
    "changed": Words(N_("PIN changed"), N_("Use your new PIN from now on.")),
    "wrong_pin": Words(
        N_("Wrong PIN"), N_("The current PIN is not right. The PIN was not changed.")),
    "pin_tries_exceeded": Words(
        N_("Too many wrong PINs today"),
        N_("The PIN cannot be checked again today. Ask the card office.")),
    "invalid_pin": Words(N_("Not a PIN"), N_("A new PIN has 4 to 6 digits.")),
    "limit_set": Words(
        N_("Daily limit set"), N_("Your own daily limit is in effect from now on.")),
    "limit_removed": Words(
        N_("Daily limit removed"), N_("Only the card office's limit applies (if there is one).")),
}
# The electricity purchase's data-status is the transfer status; these have their own words.
PURCHASES: Final[dict[str, Words]] = {
    "created": Words(
        N_("Electricity bought"), N_("The money is in your room's electricity purse.")),
    "exists": Words(
        N_("Already bought"),
        N_("This purchase was already made; it was not made a second time.")),
    "exceeds_credits": Words(
        N_("Not enough money"), N_("Your cash purse does not hold enough. Nothing was paid.")),
    "debit_account_frozen": Words(
        N_("Card reported lost"), N_("Your purses are blocked while the card is lost.")),
    "card_not_active": Words(N_("No active card"), N_("You need an active card to pay.")),
    "daily_limit_exceeded": Words(
        N_("Daily limit reached"), N_("This would go over today's limit. Nothing was paid.")),
}
_PURCHASE_OTHER: Final = Words(
    N_("Not bought"), N_("The purchase was refused. Nothing was paid."))


def _result(
    request: Request[Any, Any, Any], status: str, key: str, *, words: Words,
    http_status: int = 200, **context: Any,
) -> Response[bytes]:
    return render.page(request, "self_result.html", status=http_status, result=status,
                       key=key, words=words, card_status=CARD_STATUS, **context)


async def _form(request: Request[Any, Any, Any]) -> FormMultiDict:
    return await request.form()


async def _own_card(
    service: SelfService, ref: HolderRef, form: FormMultiDict
) -> str | None:
    """The ``card_no`` a form names, which must be one of the holder's cards (else 404);
    None when it names none."""
    if "card_no" not in form:
        return None
    card_no = form_field(form, "card_no")
    if card_no is None or card_no not in {c.card_no for c in await service.cards(ref)}:
        raise WebError(404, Refusal.NOT_FOUND)
    return card_no


async def _password_refusal(request: Request[Any, Any, Any], form: FormMultiDict) -> str | None:
    """None when the form's password is the session holder's; else why not."""
    session = current_session(request)
    assert session is not None
    password = form_field(form, "password")
    if not password:
        return "wrong_password"
    state = web_state(request.app)
    verify = state.verifiers[SessionKind.SELF]
    verdict = await verify(request.app.state.engine, session.subject, password, now=state.clock())
    if verdict.outcome is LoginOutcome.OK and verdict.subject == session.subject:
        return None
    return "locked" if verdict.outcome is LoginOutcome.LOCKED else "wrong_password"


async def _card_change(request: Request[Any, Any, Any], *, lost: bool) -> Response[bytes]:
    service, ref = await holder_of(request)
    form = await _form(request)
    card_no = await _own_card(service, ref, form)
    refusal = await _password_refusal(request, form)
    if refusal is not None:
        return _result(request, refusal, refusal, words=RESULTS[refusal])
    change = await (service.report_lost(ref, card_no=card_no) if lost
                    else service.report_found(ref, card_no=card_no))
    key = f"{'lost' if lost else 'found'}:{change}"
    return _result(request, change.value, key, words=pick(RESULTS, key, change.value))


@post("/report-lost", name="self-report-lost")
async def report_lost(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Report the card lost at once (the password again)."""
    return await _card_change(request, lost=True)


@post("/found", name="self-found")
async def found(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The lost card is active again (the password again)."""
    return await _card_change(request, lost=False)


@post("/pin", name="self-pin")
async def pin(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Change the card's PIN (``old_pin``, ``new_pin``)."""
    service, ref = await holder_of(request)
    form = await _form(request)
    card_no = await _own_card(service, ref, form)
    old_pin = form_field(form, "old_pin")
    new_pin = form_field(form, "new_pin")
    if old_pin is None or new_pin is None:
        return _result(request, "invalid_pin", "invalid_pin", words=RESULTS["invalid_pin"],
                       http_status=400)
    change = await service.change_pin(ref, old_pin.strip(), new_pin.strip(), card_no=card_no)
    return _result(request, change.value, change.value, words=RESULTS[change.value])


@post("/limit", name="self-limit")
async def limit(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Set the holder's own daily limit (``daily_limit_yuan``; empty removes it)."""
    service, ref = await holder_of(request)
    form = await _form(request)
    raw = form_field(form, "daily_limit_yuan")
    fen: int | AmountError | None = None
    if raw is None:
        fen = AmountError.MALFORMED
    elif raw.strip():
        fen = parse_yuan(raw, allow_zero=True)  # 0: spend nothing at all today
    if isinstance(fen, AmountError):
        overview = await service.overview(ref)
        return render.page(request, "self_settings.html", status=400, ov=overview,
                           own_limit=(raw or "")[:limits.WEB_AMOUNT_MAX_CHARS],
                           limit_error=fen.value, limit_message=AMOUNT_MESSAGES[fen],
                           card_status=CARD_STATUS)
    await service.set_own_limit(ref, fen)
    status = "limit_removed" if fen is None else "limit_set"
    return _result(request, status, status, words=RESULTS[status],
                   limit_yuan=None if fen is None else plain_yuan(fen), limit_fen=fen)


@post("/electricity", name="self-electricity-buy")
async def buy_electricity(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Buy electricity for the holder's room (``room_id``, ``amount_yuan``; the form's ``key``
    makes a repeat post nothing)."""
    service, ref = await holder_of(request)
    form = await _form(request)
    overview = await service.overview(ref)
    room_id = form_field(form, "room_id")
    if room_id is None or overview.room_id is None:
        raise WebError(404, Refusal.NOT_FOUND)
    own_room_id(overview, room_id)
    raw_key = form_field(form, "key") or ""
    raw_amount = form_field(form, "amount_yuan")
    amount = parse_yuan(raw_amount) if raw_amount is not None else AmountError.MALFORMED
    if isinstance(amount, int) and amount > limits.TERMINAL_MAX_AMOUNT_FEN:
        amount = AmountError.TOO_LARGE  # more than a kiosk may move in one purchase
    try:
        form_key = uuid.UUID(hex=raw_key) if len(raw_key) == 32 else None
    except ValueError:
        form_key = None
    if isinstance(amount, AmountError) or form_key is None:
        error = amount.value if isinstance(amount, AmountError) else "expired"
        message = AMOUNT_MESSAGES[amount] if isinstance(amount, AmountError) else N_(
            "This form has expired. Enter the amount again.")
        return render.page(request, "self_electricity.html", status=400, ov=overview,
                           key=uuid.uuid4().hex, amount=(raw_amount or "")[:32], error=error,
                           error_message=message, card_status=CARD_STATUS)
    room = await service.room(ref)
    if room is None or room.room_id != room_id:  # moved out meanwhile
        raise WebError(404, Refusal.NOT_FOUND)
    bought = await service.buy_electricity(ref, room, amount, form_key)
    status = bought.status.value
    words = pick(PURCHASES, status, default=_PURCHASE_OTHER)
    return _result(request, status, "purchase", words=words,
                   room_id=room.room_id, room_available=bought.room_available,
                   amount_fen=amount)


def form_handlers() -> list[HTTPRouteHandler]:
    """The forms above (paths relative to /self)."""
    return [report_lost, found, pin, limit, buy_electricity]

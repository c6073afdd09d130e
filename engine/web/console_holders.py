"""The card counter (contract §8): the console's home and a holder's page (the search that finds
them is console_search), with the card forms (issue, report lost, found, replace, close, a new
activation code).

Each form is the same operation as its JSON API route (``Campus`` for cards,
``issue_activation`` for codes) and is recorded in the operator log with the operator's
name, its target and outcome. A form's answer is the holder's page again with ``#result``
(``data-status`` = the outcome; its words: console_results); a new activation code is shown
there once, in ``#activation-code``, and stored only hashed.

Holder ids are unique within a ledger, not across ledgers: a page or form names its holder by
id and ``?ledger=`` (the search's links and the page's forms always carry it). Without it, an
id that several ledgers have answers a page to choose the ledger and changes nothing.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import FormMultiDict
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath, FromQuery

from engine import limits
from engine.access.holders import Activation, issue_activation
from engine.access.operators import Operator
from engine.access.refused import Refused as AccessRefused
from engine.access.roles import Right
from engine.calendar import campus_tz, from_ns
from engine.campus import Campus
from engine.campus.model import Card, CardStatus, Refused
from engine.campus.model import Refusal as CampusRefusal
from engine.web import render
from engine.web.console_auth import may, record, require
from engine.web.console_results import Answer, Form, FormRefusal, carried_out, refused
from engine.web.console_search import Found, holders_with_id
from engine.web.errors import Refusal, WebError
from engine.web.i18n import N_
from engine.web.login import form_field
from engine.web.money import AMOUNT_MESSAGES, parse_yuan

SQL_HOLDER: Final = "SELECT ledger, id, name, kind FROM holders WHERE ledger = $1 AND id = $2"
SQL_PURSES: Final = """
SELECT a.id, a.kind, a.credits_posted - a.debits_posted AS balance,
       a.credits_posted - a.debits_posted - a.debits_pending AS available
FROM holders h JOIN accounts a
  ON a.ledger = h.ledger AND a.id IN (h.purse_account_id, h.subsidy_account_id)
WHERE h.ledger = $1 AND h.id = $2 ORDER BY a.kind = 'subsidy', a.id
"""
SQL_CARDS: Final = """
SELECT card_no, status, daily_limit, pin_threshold, replaced_by FROM cards
WHERE ledger = $1 AND holder_id = $2 ORDER BY created_at, card_no
"""
# The latest transfers touching either purse: two index range scans (transfers_debit,
# transfers_credit) merged, newest first.
SQL_TRANSFERS: Final = """
SELECT * FROM (
  (SELECT id, code, amount, timestamp, -amount AS fen FROM transfers
   WHERE ledger = $1 AND debit_account_id = ANY($2::bigint[]) ORDER BY timestamp DESC LIMIT $3)
  UNION ALL
  (SELECT id, code, amount, timestamp, amount AS fen FROM transfers
   WHERE ledger = $1 AND credit_account_id = ANY($2::bigint[]) ORDER BY timestamp DESC LIMIT $3)
) t ORDER BY timestamp DESC LIMIT $3
"""
# The card forms, and the status each leaves the card in (so already: nothing changed).
CARD_FORMS: Final = {
    Form.REPORT_LOST: CardStatus.LOST,
    Form.FOUND: CardStatus.ACTIVE,
    Form.REPLACE: CardStatus.REPLACED,
    Form.CLOSE: CardStatus.CLOSED,
}
# Stored words the pages show translated (the templates translate them by value).
SHOWN_WORDS: Final = (
    N_("student"),
    N_("staff"),
    N_("purse"),
    N_("subsidy"),
    N_("active"),
    N_("lost"),
    N_("replaced"),
    N_("closed"),
)


def campus(request: Request[Any, Any, Any]) -> Campus:
    """The app's Campus (the same one the JSON API's routes use, made on first use)."""
    state = request.app.state
    found: Campus | None = getattr(state, "campus", None)
    if found is None:
        found = Campus(state.engine)
        state.campus = found
    return found


class Target(msgspec.Struct, frozen=True):
    """The holder a page or form is about; ``elsewhere``: holders with the same id in other
    ledgers (self-service, which knows only the id, cannot tell them apart)."""

    ledger: int
    holder_id: str
    elsewhere: list[Found]


async def _target(
    request: Request[Any, Any, Any], holder_id: str, ledger: int | None
) -> Target | Response[bytes]:
    """The holder ``holder_id`` of ``ledger`` (``?ledger=``). Without one: the only holder with
    this id, or when several ledgers have it, the page to choose one (409 for a form: nothing
    was done). 404 when there is no such holder."""
    async with request.app.state.engine.store.pool.acquire(
        timeout=limits.DB_ACQUIRE_TIMEOUT_S
    ) as conn:
        same = await holders_with_id(conn, holder_id)
    if ledger is None and len(same) > 1:
        status = 200 if request.method == "GET" else 409
        return render.page(
            request, "console/holder_choice.html", status=status, holder_id=holder_id, found=same
        )
    if ledger is None and same:
        ledger = same[0].ledger
    if ledger is None or all(h.ledger != ledger for h in same):
        raise WebError(404, Refusal.NOT_FOUND)
    return Target(ledger, holder_id, [h for h in same if h.ledger != ledger])


async def _holder_page(
    request: Request[Any, Any, Any],
    op: Operator,
    target: Target,
    *,
    status: int = 200,
    answer: Answer | None = None,
    activation: Activation | None = None,
) -> Response[bytes]:
    ledger, holder_id = target.ledger, target.holder_id
    pool = request.app.state.engine.store.pool
    async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
        holder = await conn.fetchrow(SQL_HOLDER, ledger, holder_id)
        purses = await conn.fetch(SQL_PURSES, ledger, holder_id)
        cards = await conn.fetch(SQL_CARDS, ledger, holder_id)
        transfers = await conn.fetch(
            SQL_TRANSFERS, ledger, [p["id"] for p in purses], limits.CONSOLE_HOLDER_TRANSFERS
        )
    if holder is None:
        raise WebError(404, Refusal.NOT_FOUND)
    tz = campus_tz()
    shown = [
        {**dict(t), "at": from_ns(t["timestamp"], tz).strftime("%Y-%m-%d %H:%M:%S")}
        for t in transfers
    ]
    return render.page(
        request,
        "console/holder.html",
        status=status,
        holder=holder,
        purses=purses,
        cards=cards,
        transfers=shown,
        can_write=may(op, Right.CAMPUS_WRITE),
        total=sum(p["available"] for p in purses),
        answer=answer,
        activation=activation,
        elsewhere=target.elsewhere,
    )


@get("/", name="console-home")
async def home(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The console's home: who is logged in, and the pages their role may open."""
    op = await require(request, Right.READ)
    links = {
        "holders": may(op, Right.READ),
        "subsidies": may(op, Right.CAMPUS_WRITE),
        "finance": may(op, Right.FINANCE_REPORTS),
        "log": may(op, Right.OPERATOR_LOG),
        "operators": may(op, Right.OPERATORS),
    }
    return render.page(request, "console/home.html", operator=op, links=links)


@get("/holders/{holder_id:str}", name="console-holder")
async def holder(
    request: Request[Any, Any, Any], holder_id: FromPath[str], ledger: FromQuery[int | None] = None
) -> Response[bytes]:
    """A holder's purses, cards and latest transfers, with the card forms (``?ledger=`` for an
    id that several ledgers have)."""
    op = await require(request, Right.READ)
    target = await _target(request, holder_id, ledger)
    if isinstance(target, Response):
        return target
    return await _holder_page(request, op, target)


def _amount(form: FormMultiDict, name: str) -> int | str | None:
    """An optional yuan field: None when empty, fen, or the message of why not."""
    text = form_field(form, name)
    if text is None or not text.strip():
        return None
    fen = parse_yuan(text, allow_zero=True)
    return AMOUNT_MESSAGES[fen] if isinstance(fen, str) else fen


CARD_NO: Final = re.compile(r"[0-9]{8,19}", re.ASCII)  # the cards table's CHECK
PIN: Final = re.compile(r"[0-9]{4,6}", re.ASCII)


def _card_no(form: FormMultiDict, name: str) -> str | None:
    text = (form_field(form, name) or "").strip()
    return text if CARD_NO.fullmatch(text) else None


async def _issue(request: Request[Any, Any, Any], op: Operator, target: Target) -> Response[bytes]:
    form = await request.form()
    card_no = _card_no(form, "card_no")
    pin = (form_field(form, "pin") or "").strip() or None
    limit, threshold = _amount(form, "daily_limit_yuan"), _amount(form, "pin_threshold_yuan")
    detail = next((a for a in (limit, threshold) if isinstance(a, str)), None)
    bad: Answer | None = None
    if card_no is None:
        bad = refused(Form.ISSUE, FormRefusal.INVALID_CARD_NO)
    elif pin is not None and not PIN.fullmatch(pin):
        bad = refused(Form.ISSUE, FormRefusal.INVALID_PIN)
    elif detail is not None:
        bad = refused(Form.ISSUE, FormRefusal.INVALID_AMOUNT, detail=detail)
    if bad is not None or card_no is None or isinstance(limit, str) or isinstance(threshold, str):
        return await _holder_page(request, op, target, status=400, answer=bad)
    c = campus(request)
    before = await c.get_card(card_no)  # the same card again is answered unchanged
    card = await c.create_card(
        card_no=card_no,
        holder_id=target.holder_id,
        ledger=target.ledger,
        daily_limit=limit,
        pin=pin,
        pin_threshold=threshold,
    )
    if isinstance(card, Refused):
        answer = refused(Form.ISSUE, card.reason)
    else:
        answer = carried_out(Form.ISSUE, card.status.value, changed=before is None)
    await record(request, op, "issue card", f"{target.holder_id} {card_no}", answer.status)
    return await _holder_page(request, op, target, answer=answer)


async def _card_action(
    request: Request[Any, Any, Any], op: Operator, target: Target, card: Card, form: Form
) -> Response[bytes]:
    c = campus(request)
    logged = f"{target.holder_id} {card.card_no}"
    done: Card | Refused
    if form is Form.REPLACE:
        new_no = _card_no(await request.form(), "new_card_no")
        if new_no is None:
            bad = refused(form, FormRefusal.INVALID_CARD_NO)
            return await _holder_page(request, op, target, status=400, answer=bad)
        replaced = await c.replace_card(card.card_no, new_no)
        done = replaced if isinstance(replaced, Refused) else replaced.new
        logged += f" -> {new_no}"
    elif form is Form.REPORT_LOST:
        done = await c.report_lost(card.card_no)
    elif form is Form.FOUND:
        done = await c.card_found(card.card_no)
    else:
        done = await c.close_card(card.card_no)
    if isinstance(done, Refused):
        answer = refused(form, done.reason)
    else:
        changed = card.status is not CARD_FORMS[form]
        answer = carried_out(form, done.status.value, changed=changed)
    await record(request, op, f"card {form}", logged, answer.status)
    return await _holder_page(request, op, target, answer=answer)


@post("/holders/{holder_id:str}/cards", status_code=200, name="console-issue-card")
async def issue_card(
    request: Request[Any, Any, Any], holder_id: FromPath[str], ledger: FromQuery[int | None] = None
) -> Response[bytes]:
    """Issue a card (as ``POST /v1/cards``)."""
    op = await require(request, Right.CAMPUS_WRITE)
    target = await _target(request, holder_id, ledger)
    if isinstance(target, Response):
        return target
    return await _issue(request, op, target)


@post(
    "/holders/{holder_id:str}/cards/{card_no:str}/{action:str}",
    status_code=200,
    name="console-card-action",
)
async def card_action(
    request: Request[Any, Any, Any],
    holder_id: FromPath[str],
    card_no: FromPath[str],
    action: FromPath[str],
    ledger: FromQuery[int | None] = None,
) -> Response[bytes]:
    """Report lost, found, replace or close one of the holder's cards (as the API's routes)."""
    op = await require(request, Right.CAMPUS_WRITE)
    target = await _target(request, holder_id, ledger)
    if isinstance(target, Response):
        return target
    card = await campus(request).get_card(card_no) if CARD_NO.fullmatch(card_no) else None
    form = next((f for f in CARD_FORMS if f.value == action), None)
    if form is None or card is None or (card.ledger, card.holder_id) != (target.ledger, holder_id):
        raise WebError(404, Refusal.NOT_FOUND)  # another holder's card is not on this page
    return await _card_action(request, op, target, card, form)


@post("/holders/{holder_id:str}/activation", status_code=200, name="console-activation")
async def activation(
    request: Request[Any, Any, Any], holder_id: FromPath[str], ledger: FromQuery[int | None] = None
) -> Response[bytes]:
    """A new activation code (as ``POST /v1/holders/{holder_id}/activation``), shown once.
    Self-service knows a holder by id alone: an id in several ledgers gets none."""
    op = await require(request, Right.CAMPUS_WRITE)
    target = await _target(request, holder_id, ledger)
    if isinstance(target, Response):
        return target
    issued = await issue_activation(request.app.state.engine.store.pool, holder_id)
    if isinstance(issued, AccessRefused):
        await record(request, op, "activation", holder_id, issued.reason)
        if issued.not_found:
            raise WebError(404, Refusal.NOT_FOUND)
        answer = refused(Form.ACTIVATION, CampusRefusal(issued.reason))
        return await _holder_page(request, op, target, answer=answer)
    await record(request, op, "activation", holder_id, "created")  # never the code itself
    answer = carried_out(Form.ACTIVATION, "created", changed=True)
    return await _holder_page(request, op, target, answer=answer, activation=issued)


HANDLERS: Final[list[HTTPRouteHandler]] = [
    home,
    holder,
    issue_card,
    card_action,
    activation,
]

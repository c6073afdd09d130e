"""``/console/operators`` (contract §8; admin only): the operators, adding one, disabling one.

The same operations as ``onecard operator add|disable`` (engine/access/operators.py: the
username rule, the roles an operator may have, at least ``limits.MIN_OPERATOR_PASSWORD``
characters, Argon2id), each recorded in the operator log; the password is never. A disabled
operator is out of the console at their next page (``console_auth.current_operator``) and of
every engine process at once (the credentials channel).
"""

from __future__ import annotations

import hmac
from typing import Any, Final

from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler

from engine import limits
from engine.access import operators
from engine.access.operators import Operator
from engine.access.passwords import PasswordRejected
from engine.access.roles import OPERATOR_ROLES, Right, Role
from engine.calendar import campus_tz, from_ns
from engine.web import render
from engine.web.console_auth import record, require
from engine.web.i18n import N_
from engine.web.login import form_field

# The form's own refusals, beside AddStatus / DisableStatus (shown in #result data-status).
INVALID_USERNAME: Final = "invalid_username"
INVALID_ROLE: Final = "invalid_role"
WEAK_PASSWORD: Final = "weak_password"
PASSWORDS_DIFFER: Final = "passwords_differ"
# An admin disabling themselves could leave the console without any admin (the command line's
# `onecard operator add` on the server is then the only way back): another admin must do it.
DISABLE_SELF: Final = "disable_self"
MESSAGES: Final = {
    "created": N_("The operator was added."),
    "exists": N_("That username is taken; nothing changed."),
    INVALID_USERNAME: N_("A username is 1 to 64 of A-Z a-z 0-9 . _ @ -"),
    INVALID_ROLE: N_("Choose one of the roles."),
    WEAK_PASSWORD: N_("A password has at least %(n)s characters."),
    PASSWORDS_DIFFER: N_("The two passwords differ."),
    "disabled": N_("The operator was disabled."),
    "already_disabled": N_("The operator was already disabled."),
    "not_found": N_("There is no such operator."),
    DISABLE_SELF: N_("You cannot disable yourself; another admin can."),
}
ROLES: Final = sorted(str(r) for r in OPERATOR_ROLES)
SHOWN_WORDS: Final = (N_("admin"), N_("card_office"), N_("finance"), N_("auditor"))


async def _page(
    request: Request[Any, Any, Any], op: Operator, *, status: int = 200, result: str | None = None
) -> Response[bytes]:
    async with request.app.state.engine.store.pool.acquire(
        timeout=limits.DB_ACQUIRE_TIMEOUT_S
    ) as conn:
        everyone = await operators.list_operators(conn)
    tz = campus_tz()
    shown = [(o, from_ns(o.created_at, tz).strftime("%Y-%m-%d %H:%M")) for o in everyone]
    return render.page(
        request,
        "console/operators.html",
        status=status,
        operators=shown,
        roles=ROLES,
        result=result,
        message=MESSAGES.get(result or ""),
        min_password=limits.MIN_OPERATOR_PASSWORD,
        me=op.username,
    )


@get("/operators", name="console-operators")
async def operators_page(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Every operator, and the add form."""
    op = await require(request, Right.OPERATORS)
    return await _page(request, op)


async def _add(request: Request[Any, Any, Any], op: Operator) -> str:
    form = await request.form()
    username = (form_field(form, "username") or "").strip()
    role = form_field(form, "role") or ""
    password, password2 = form_field(form, "password"), form_field(form, "password2")
    if not operators.NAME.fullmatch(username):
        return INVALID_USERNAME
    if role not in ROLES:
        return INVALID_ROLE
    if password is None or len(password) < limits.MIN_OPERATOR_PASSWORD:
        return WEAK_PASSWORD
    if password2 is not None and not hmac.compare_digest(password2.encode(), password.encode()):
        return PASSWORDS_DIFFER
    try:
        status = await operators.add_operator(
            request.app.state.engine.store.pool, username=username, role=Role(role),
            password=password,
        )
    except PasswordRejected:
        return WEAK_PASSWORD
    await record(request, op, "operator add", f"username={username} role={role}", str(status))
    return str(status)


@post("/operators", status_code=200, name="console-operator-add")
async def operator_add(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Add an operator (as ``onecard operator add``)."""
    op = await require(request, Right.OPERATORS)
    result = await _add(request, op)
    return await _page(request, op, status=200 if result == "created" else 400, result=result)


@post("/operators/disable", status_code=200, name="console-operator-disable")
async def operator_disable(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Disable an operator for good (as ``onecard operator disable``)."""
    op = await require(request, Right.OPERATORS)
    username = (form_field(await request.form(), "username") or "").strip()
    if not operators.NAME.fullmatch(username):
        return await _page(request, op, status=400, result=INVALID_USERNAME)
    if username == op.username:
        return await _page(request, op, status=400, result=DISABLE_SELF)
    async with request.app.state.engine.store.pool.acquire(
        timeout=limits.DB_ACQUIRE_TIMEOUT_S
    ) as conn:
        done = await operators.disable_operator(conn, username)
    await record(request, op, "operator disable", f"username={username}", str(done))
    return await _page(request, op, result=str(done))


HANDLERS: Final[list[HTTPRouteHandler]] = [operators_page, operator_add, operator_disable]

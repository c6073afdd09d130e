"""Who is at the console: the role check of every console page (``require``) and the operator log
entry of every console write (``record``).

A console session keeps only the operator's username (engine/web/sessions.py). Every page
re-reads the operator (``operators.get_operator``): a disabled operator is out at their next
request (the session ends) and a changed role counts at once. The rights of each role are
engine/access/roles.py's table, the same the JSON API uses: nothing here decides who may do
what.
"""

from __future__ import annotations

from typing import Any, Final

from litestar import Request

from engine import limits
from engine.access import operators
from engine.access.operators import Operator
from engine.access.oplog import Entry
from engine.access.roles import Right, allows, rights_of
from engine.web import sessions
from engine.web.errors import Refusal, WebError
from engine.web.gate import current_session
from engine.web.sessions import SessionKind

# What a console write is called in the operator log (the API's are "METHOD /path").
ACTION_PREFIX: Final = "console "


async def current_operator(request: Request[Any, Any, Any]) -> Operator | None:
    """The enabled operator of the request's session, or None (a session whose operator is
    gone or disabled is ended here)."""
    session = current_session(request)
    if session is None or session.kind is not SessionKind.CONSOLE:
        return None
    pool = request.app.state.engine.store.pool
    async with pool.acquire(timeout=limits.DB_ACQUIRE_TIMEOUT_S) as conn:
        op = await operators.get_operator(conn, session.subject)
    if op is None or not op.enabled:
        await sessions.end_all(pool, SessionKind.CONSOLE, session.subject)
        return None
    return op


async def require(request: Request[Any, Any, Any], right: Right) -> Operator:
    """The operator, if their role has ``right``; else the 403 page (WebError)."""
    op = await current_operator(request)
    if op is None or not allows(rights_of(op.role), right):
        raise WebError(403, Refusal.FORBIDDEN)
    return op


def may(op: Operator, right: Right) -> bool:
    """Whether the page shows the forms needing ``right``."""
    return allows(rights_of(op.role), right)


async def record(
    request: Request[Any, Any, Any], op: Operator, action: str, target: str, outcome: str
) -> None:
    """Append a console write to the operator log (before its answer is sent: an answered
    write is always in the log)."""
    entry = Entry(op.username, str(op.role), ACTION_PREFIX + action, target, outcome)
    await request.app.state.access.oplog.record(entry)

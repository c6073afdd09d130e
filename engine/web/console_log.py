"""``GET /console/log`` (contract §8, admin and auditor): the operator log, newest first,
``limits.CONSOLE_LOG_PAGE`` entries a page; ``a[rel=next]`` (``?before=ID``) to older ones."""

from __future__ import annotations

from typing import Any, Final

from litestar import Request, Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromQuery

from engine import limits
from engine.access import oplog
from engine.access.roles import Right
from engine.calendar import campus_tz, from_ns
from engine.web import render
from engine.web.console_auth import require


@get("/log", name="console-log")
async def operator_log(
    request: Request[Any, Any, Any], before: FromQuery[int | None] = None
) -> Response[bytes]:
    """One page of the operator log."""
    await require(request, Right.OPERATOR_LOG)
    async with request.app.state.engine.store.pool.acquire(
        timeout=limits.DB_ACQUIRE_TIMEOUT_S
    ) as conn:
        entries, next_before = await oplog.page(
            conn, limit=limits.CONSOLE_LOG_PAGE, before=before if before and before > 0 else None
        )
    tz = campus_tz()
    shown = [(e, from_ns(e.at, tz).strftime("%Y-%m-%d %H:%M:%S")) for e in entries]
    return render.page(request, "console/log.html", entries=shown, next_before=next_before)


HANDLERS: Final[list[HTTPRouteHandler]] = [operator_log]

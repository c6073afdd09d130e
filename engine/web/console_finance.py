"""``GET /console/finance?date=D`` (contract §8; finance, auditor, admin): the day's four export
files as downloads, its trial balance, and the reconcile form.

The files are exactly ``onecard export``'s: the same ``export_day`` writes them into a
temporary directory, and the page answers their bytes (nothing is kept on the server). The
reconcile form runs ``reconcile`` on the uploaded statement (written to a temporary file, read
by the same parser as the CLI's); a malformed statement answers the page with the line and
the reason in the page's language. Neither writes anything to the ledger, so neither is in
the operator log.
"""

from __future__ import annotations

import tempfile
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from litestar import Request, Response, get, post
from litestar.datastructures import UploadFile
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from engine import limits
from engine.access.roles import Right
from engine.calendar import campus_tz, parse_day
from engine.finance.export import ExportResult, export_day
from engine.finance.reconcile import (
    ProviderFileError,
    ReconcileError,
    Reconciliation,
    Result,
    StatementProblem,
    reconcile,
)
from engine.web import render
from engine.web.console_auth import require
from engine.web.errors import Refusal, WebError
from engine.web.i18n import N_
from engine.web.login import form_field

# data-file -> (file name pattern of export_day, media type)
FILES: Final = {
    "settlement": ("settlement-{d}.csv", "text/csv"),
    "trial-balance": ("trial-balance-{d}.csv", "text/csv"),
    "journal": ("journal-{d}.csv", "text/csv"),
    "beancount": ("journal-{d}.beancount", "text/plain"),
}
LABELS: Final = {
    "settlement": N_("Settlement (CSV)"),
    "trial-balance": N_("Trial balance (CSV)"),
    "journal": N_("Journal (CSV)"),
    "beancount": N_("Journal (beancount)"),
}
PROBLEMS: Final = {
    StatementProblem.UNREADABLE: N_("The statement is not a readable UTF-8 CSV file."),
    StatementProblem.HEADER: N_(
        "Line %(line)s: the header must name provider_ref, amount_fen and time."
    ),
    StatementProblem.FIELDS: N_("Line %(line)s: not as many fields as the header."),
    StatementProblem.EMPTY_REF: N_("Line %(line)s: the provider reference is empty."),
    StatementProblem.BAD_AMOUNT: N_("Line %(line)s: amount_fen must be a positive integer of fen."),
    StatementProblem.BAD_TIME: N_("Line %(line)s: the time must be RFC 3339 with an offset."),
}
NOT_CLEARING: Final = N_("Account %(account)s is not a clearing account.")
BAD_DATE: Final = N_("Enter the day as YYYY-MM-DD.")
TOO_LARGE: Final = N_("The file is too large for the console; use onecard reconcile.")
NO_FILE: Final = N_("Choose the statement file.")
# The results the page shows translated (by value).
SHOWN_WORDS: Final = (
    N_("matched"),
    N_("missing_in_ledger"),
    N_("missing_in_statement"),
    N_("amount_mismatch"),
    N_("room"),
    N_("merchant"),
    N_("suspense"),
    N_("utility"),
    N_("clearing"),
    N_("fund"),
)


def _day(text: str | None) -> date | None:
    try:
        return parse_day((text or "").strip())
    except ValueError:
        return None


def _yesterday() -> date:
    """The last whole campus day (the page's default)."""
    return datetime.now(campus_tz()).date() - timedelta(days=1)


async def export_files(
    request: Request[Any, Any, Any], day: date
) -> tuple[ExportResult, dict[str, bytes]]:
    """``onecard export --date day`` into a temporary directory: its result and the four files'
    bytes by ``data-file``."""
    pool = request.app.state.engine.store.pool
    with tempfile.TemporaryDirectory(prefix="onecard-export-") as tmp:
        result = await export_day(pool, day, Path(tmp))
        d = day.isoformat()
        files = {k: (Path(tmp) / name.format(d=d)).read_bytes() for k, (name, _) in FILES.items()}
    return result, files


def _page(
    request: Request[Any, Any, Any], day: date | None, *, status: int = 200, **context: Any
) -> Response[bytes]:
    shown: dict[str, Any] = {"export": None, "rec": None, "error": None, "clearing": ""}
    return render.page(
        request,
        "console/finance.html",
        status=status,
        day=day.isoformat() if day else _yesterday().isoformat(),
        chosen=day is not None,
        files=list(LABELS.items()),
        **{**shown, **context},
    )


@get("/finance", name="console-finance")
async def finance(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The day's links, trial balance and the reconcile form (no day given: the form only)."""
    await require(request, Right.FINANCE_REPORTS)
    text = request.query_params.get("date")
    if not text:
        return _page(request, None)
    day = _day(text)
    if day is None:
        return _page(request, None, status=400, error=render.gettext(request, BAD_DATE))
    result, _ = await export_files(request, day)
    return _page(request, day, export=result)


@get("/finance/files/{name:str}", name="console-finance-file")
async def finance_file(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[bytes]:
    """One of the day's four files, as ``onecard export`` writes it (a download)."""
    await require(request, Right.FINANCE_REPORTS)
    day = _day(request.query_params.get("date"))
    if name not in FILES or day is None:
        raise WebError(404, Refusal.NOT_FOUND)
    _, files = await export_files(request, day)
    filename, media = FILES[name]
    response = Response(
        files[name],
        media_type=media,
        headers={
            "Content-Disposition": f'attachment; filename="{filename.format(d=day.isoformat())}"'
        },
    )
    return render.finish(request, response)


async def _statement(request: Request[Any, Any, Any]) -> bytes | str:
    """The uploaded statement's bytes, or the message of why not."""
    form = await request.form()
    uploads = form.getall("statement") if "statement" in form else []
    if len(uploads) != 1 or not isinstance(uploads[0], UploadFile):
        return render.gettext(request, NO_FILE)
    data = await uploads[0].read(limits.CONSOLE_STATEMENT_MAX_BYTES + 1)
    if len(data) > limits.CONSOLE_STATEMENT_MAX_BYTES:
        return render.gettext(request, TOO_LARGE)
    return data


async def _reconcile(
    request: Request[Any, Any, Any], day: date, clearing: int, data: bytes
) -> Reconciliation | str:
    """``onecard reconcile`` of the uploaded bytes, or the message of why it cannot run."""
    pool = request.app.state.engine.store.pool
    with tempfile.TemporaryDirectory(prefix="onecard-reconcile-") as tmp:
        path = Path(tmp) / "statement.csv"
        path.write_bytes(data)
        try:
            return await reconcile(pool, day, clearing, path)
        except ProviderFileError as e:
            return render.gettext(request, PROBLEMS[e.problem]) % {"line": e.line}
        except ReconcileError:
            return render.gettext(request, NOT_CLEARING) % {"account": clearing}


@post(
    "/finance/reconcile",
    status_code=200,
    name="console-reconcile",
    request_max_body_size=limits.CONSOLE_STATEMENT_MAX_BYTES + 64 * 1024,
)
async def finance_reconcile(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Reconcile a clearing account's top-ups of the day with the uploaded statement."""
    await require(request, Right.FINANCE_REPORTS)
    form = await request.form()
    day = _day(form_field(form, "date"))
    raw_clearing = (form_field(form, "clearing") or "").strip()
    if day is None:
        return _page(request, None, status=400, error=render.gettext(request, BAD_DATE))
    if not raw_clearing.isascii() or not raw_clearing.isdigit() or len(raw_clearing) > 19:
        message = render.gettext(request, NOT_CLEARING) % {"account": raw_clearing[:32]}
        return _page(request, day, status=400, error=message, clearing=raw_clearing[:32])
    data = await _statement(request)
    rec = data if isinstance(data, str) else await _reconcile(request, day, int(raw_clearing), data)
    if isinstance(rec, str):
        return _page(request, day, status=400, error=rec, clearing=raw_clearing)
    counts = {r.value: sum(1 for x in rec.lines if x.result is r) for r in Result}
    return _page(request, day, rec=rec, counts=counts, clearing=raw_clearing)


HANDLERS: Final[list[HTTPRouteHandler]] = [finance, finance_file, finance_reconcile]

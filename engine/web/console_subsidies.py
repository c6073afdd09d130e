"""``/console/subsidies`` (contract §8; card_office, admin): upload the month's subsidy file,
see what it would do, confirm.

- ``POST /console/subsidies/preview`` (multipart: ``file``, optional ``ledger`` for a file
  without a ledger column) reads the file and the database but moves nothing
  (engine/campus/subsidy_preview.py): ``table#preview`` (what would be credited, with
  ``#preview-total``, what an earlier run already credited, and each refusal by reason) and
  ``table#refused`` (the rows that would be refused, by line). A file that breaks its own
  rules (a bad amount, a holder twice) has no ``#confirm``: ``onecard subsidy`` would refuse
  all of it, and so does the console.
- ``POST /console/subsidies/confirm`` grants exactly what ``onecard subsidy --file`` grants
  for the same bytes (``read_grants``, ``grant_subsidies``: the batch id comes from the
  content), so a file confirmed twice, or also run from the command line, credits nobody twice.

Between the two the file travels back in the preview's form (a hidden field, base64) with an
HMAC under the session's own secret: the server keeps nothing, and a confirm is of bytes this
session previewed (another session, or an edited field, is refused).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections import Counter
from typing import Any, Final

from litestar import Request, Response, get, post
from litestar.datastructures import UploadFile
from litestar.handlers import HTTPRouteHandler

from engine import limits
from engine.access.operators import Operator
from engine.access.roles import Right
from engine.campus.subsidies import FileError, GrantResult, grant_subsidies, read_grants
from engine.campus.subsidy_preview import preview
from engine.web import render
from engine.web.console_auth import record, require
from engine.web.errors import Refusal, WebError
from engine.web.gate import current_session
from engine.web.i18n import N_
from engine.web.login import form_field
from ledger.types import INT32_MAX

_MAC_CONTEXT: Final = b"onecard console subsidies\x00"
UNREADABLE: Final = N_(
    "The file cannot be read: it must be UTF-8 CSV with a header naming holder_id and "
    "amount_fen."
)
NO_FILE: Final = N_("Choose the subsidy file.")
TOO_LARGE: Final = N_("The file is too large for the console; use onecard subsidy.")
BAD_LEDGER: Final = N_("The ledger is a positive whole number (or empty when the file has one).")
EXPIRED: Final = N_(
    "This preview does not belong to this session any more; upload the file again."
)
# The reasons the pages show translated (by value).
SHOWN_WORDS: Final = (
    N_("bad_holder"),
    N_("bad_amount"),
    N_("bad_ledger"),
    N_("no_ledger"),
    N_("duplicate"),
    N_("holder_not_found"),
    N_("fund_not_found"),
    N_("created"),
    N_("exists"),
)


def _mac(request: Request[Any, Any, Any], ledger: str, data: bytes) -> str:
    """The confirm form's seal over the ledger field and the file, under the session's key."""
    session = current_session(request)
    if session is None:  # the gate lets no console page run without one
        raise WebError(403, Refusal.CSRF)
    message = _MAC_CONTEXT + ledger.encode() + b"\x00" + data
    return hmac.new(session.csrf, message, hashlib.sha256).hexdigest()


def _ledger(text: str | None) -> int | str | None:
    """The optional ledger field: None when empty, the ledger, or "" when malformed."""
    t = (text or "").strip()
    if not t:
        return None
    return int(t) if t.isascii() and t.isdigit() and 0 < int(t) <= INT32_MAX else ""


def _form(
    request: Request[Any, Any, Any], *, status: int = 200, **context: Any
) -> Response[bytes]:
    shown: dict[str, Any] = {"error": None, "pre": None, "done": None, "ledger": ""}
    return render.page(request, "console/subsidies.html", status=status, **{**shown, **context})


@get("/subsidies", name="console-subsidies")
async def subsidies(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The upload form."""
    await require(request, Right.CAMPUS_WRITE)
    return _form(request)


async def _upload(request: Request[Any, Any, Any]) -> bytes | str:
    """The uploaded file's bytes, or the message of why not."""
    form = await request.form()
    uploads = form.getall("file") if "file" in form else []
    if len(uploads) != 1 or not isinstance(uploads[0], UploadFile):
        return render.gettext(request, NO_FILE)
    data = await uploads[0].read(limits.CONSOLE_SUBSIDY_MAX_BYTES + 1)
    if len(data) > limits.CONSOLE_SUBSIDY_MAX_BYTES:
        return render.gettext(request, TOO_LARGE)
    return data


@post(
    "/subsidies/preview",
    status_code=200,
    name="console-subsidies-preview",
    request_max_body_size=limits.CONSOLE_SUBSIDY_MAX_BYTES + 64 * 1024,
)
async def subsidies_preview(request: Request[Any, Any, Any]) -> Response[bytes]:
    """What the file would do; nothing moves."""
    await require(request, Right.CAMPUS_WRITE)
    form = await request.form()
    ledger_text = (form_field(form, "ledger") or "").strip()
    ledger = _ledger(ledger_text)
    if ledger == "":
        return _form(request, status=400, error=render.gettext(request, BAD_LEDGER))
    data = await _upload(request)
    if isinstance(data, str):
        return _form(request, status=400, error=data, ledger=ledger_text)
    try:
        pre = await preview(
            request.app.state.engine.store, data, ledger=ledger if isinstance(ledger, int) else None
        )
    except FileError:
        return _form(request, status=400, error=render.gettext(request, UNREADABLE))
    by_reason = Counter(r.reason for r in pre.refused)
    fen_by_reason = Counter({k: 0 for k in by_reason})
    for r in pre.refused:
        fen_by_reason[r.reason] += r.amount
    return _form(
        request,
        pre=pre,
        refused=pre.refused[: limits.CONSOLE_PREVIEW_REFUSED_ROWS],
        by_reason=sorted((str(k), n, fen_by_reason[k]) for k, n in by_reason.items()),
        ledger=ledger_text,
        content=base64.urlsafe_b64encode(data).decode("ascii"),
        seal=_mac(request, ledger_text, data),
    )


async def _sealed(request: Request[Any, Any, Any]) -> tuple[bytes, str] | None:
    """The previewed file and ledger field of the confirm form, if its seal holds."""
    form = await request.form()
    ledger_text = form_field(form, "ledger") or ""
    seal = form_field(form, "seal") or ""
    contents = form.getall("content") if "content" in form else []
    if len(contents) != 1 or not isinstance(contents[0], str):
        return None
    try:
        data = base64.urlsafe_b64decode(contents[0].encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    if not hmac.compare_digest(seal.encode(), _mac(request, ledger_text, data).encode()):
        return None
    return data, ledger_text


def _outcome(results: list[GrantResult]) -> str:
    counts = Counter(r.status for r in results)
    return " ".join(f"{k}={n}" for k, n in sorted(counts.items())) or "empty"


@post("/subsidies/confirm", status_code=200, name="console-subsidies-confirm")
async def subsidies_confirm(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Grant the previewed file: the same idempotent batch as ``onecard subsidy --file``."""
    op = await require(request, Right.CAMPUS_WRITE)
    sealed = await _sealed(request)
    if sealed is None:
        return _form(request, status=400, error=render.gettext(request, EXPIRED))
    data, ledger_text = sealed
    ledger = _ledger(ledger_text)
    try:
        batch, grants = read_grants(
            data, ledger=ledger if isinstance(ledger, int) else None, batch_id=None
        )
    except FileError:  # the preview offered no confirm: only a crafted form gets here
        return _form(request, status=400, error=render.gettext(request, UNREADABLE))
    results = await grant_subsidies(request.app.state.engine, grants)
    await _record(request, op, batch, results)
    return _done(request, batch, results)


async def _record(
    request: Request[Any, Any, Any], op: Operator, batch: str, results: list[GrantResult]
) -> None:
    await record(request, op, "subsidy", f"batch {batch} ({len(results)} rows)", _outcome(results))


def _done(
    request: Request[Any, Any, Any], batch: str, results: list[GrantResult]
) -> Response[bytes]:
    counts = Counter(r.status for r in results)
    fen = Counter({k: 0 for k in counts})
    for r in results:
        fen[r.status] += r.amount
    not_ok = [r for r in results if not r.ok][: limits.CONSOLE_PREVIEW_REFUSED_ROWS]
    return _form(
        request,
        done={
            "batch": batch,
            "statuses": sorted((k, n, fen[k]) for k, n in counts.items()),
            "created_fen": fen.get("created", 0),
            "not_ok": not_ok,
            "all_ok": all(r.ok for r in results),
        },
    )


HANDLERS: Final[list[HTTPRouteHandler]] = [subsidies, subsidies_preview, subsidies_confirm]

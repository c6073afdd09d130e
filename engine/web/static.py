"""The stylesheet, ``/static/onecard.css``: hand-written, served from package data, cacheable.

Pages link it as ``/static/onecard.css?v=<hash>``: a browser keeps it for
``limits.WEB_STATIC_MAX_AGE_S`` and fetches the new one at once after an upgrade. It carries an
ETag, so a revalidation answers 304 without the body.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from typing import Any, Final

from litestar import Request, Response, get

from engine import limits

STYLESHEET_PATH: Final = "/static/onecard.css"


@functools.cache
def _stylesheet() -> tuple[bytes, str]:
    body = (resources.files("engine.web") / "static" / "onecard.css").read_bytes()
    return body, hashlib.sha256(body).hexdigest()[:16]


def stylesheet_url() -> str:
    """The stylesheet's address with its version."""
    return f"{STYLESHEET_PATH}?v={_stylesheet()[1]}"


@get(STYLESHEET_PATH, include_in_schema=False)
async def stylesheet(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The stylesheet (304 when the browser's copy is current)."""
    body, version = _stylesheet()
    etag = f'"{version}"'
    headers = {
        "ETag": etag,
        "Cache-Control": f"public, max-age={limits.WEB_STATIC_MAX_AGE_S}",
        "X-Content-Type-Options": "nosniff",
    }
    if etag in request.headers.get("if-none-match", ""):
        return Response(b"", status_code=304, headers=headers)
    return Response(body, media_type="text/css", headers=headers)

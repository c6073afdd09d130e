"""Operations: readiness (``/healthz``), Prometheus metrics (``/metrics``, and the request
latency middleware that feeds them) and the API's OpenAPI document. No ledger or personal data."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine import limits, metrics
from engine.http.ledger_routes import STRICT_BODIES
from engine.http.params import engine_of


@get("/openapi.json", include_in_schema=False)
async def openapi_json(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The OpenAPI document."""
    state = request.app.state
    if getattr(state, "openapi_document", None) is None:
        state.openapi_document = _document(request.app.openapi_schema.to_schema())
    doc: dict[str, Any] = state.openapi_document
    return doc


def _document(doc: dict[str, Any]) -> dict[str, Any]:
    """The generated document plus the request bodies the handlers decode themselves."""
    bodies, components = msgspec.json.schema_components(
        list(STRICT_BODIES.values()), ref_template="#/components/schemas/{name}"
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, component in components.items():
        schemas.setdefault(name, component)
    for path, body in zip(STRICT_BODIES, bodies, strict=True):
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return doc


@get("/healthz")
async def healthz(request: Request[Any, Any, Any]) -> Response[dict[str, str]]:
    """200 when the engine can reach its database, 503 otherwise."""
    if await engine_of(request).ready():
        return Response({"status": "ready"}, status_code=200)
    return Response(
        {"status": "not_ready"},
        status_code=503,
        headers={"Retry-After": str(limits.RETRY_AFTER_S)},
    )


@get("/metrics", media_type=CONTENT_TYPE_LATEST)
async def metrics_route(request: Request[Any, Any, Any]) -> bytes:
    """Prometheus text format."""
    await engine_of(request).ready()  # refreshes the pool gauges
    return generate_latest(metrics.REGISTRY)


def timing(app: ASGIApp) -> ASGIApp:
    """Middleware: request latency by route template and status."""
    # The labelled child per (method, route, status), looked up once rather than per request
    # (``labels`` takes a lock and builds a tuple key each call). Routes are the app's
    # templates, but a client may send any method: HTTP_TIMING_CHILDREN caps the cache.
    children: dict[tuple[str, str, int], Any] = {}

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_wrapper)
        finally:
            route = str(scope.get("path_template") or "unmatched")
            method = str(scope.get("method", "-"))
            child = children.get((method, route, status))
            if child is None:
                child = metrics.HTTP_SECONDS.labels(method, route, str(status))
                if len(children) < limits.HTTP_TIMING_CHILDREN:
                    children[(method, route, status)] = child
            child.observe(time.perf_counter() - t0)

    return middleware


ROUTES: list[Callable[..., Awaitable[Any]] | Any] = [healthz, metrics_route, openapi_json]

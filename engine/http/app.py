"""The HTTP API (contract §4) on Litestar: the route modules composed into one application.

* engine/http/ledger_routes.py: accounts, transfers, balances, pages of an account's transfers;
* engine/http/campus_routes.py: holders, cards, terminals, rooms, subsidies;
* engine/http/access_routes.py: activation, residents, the operator log;
* engine/http/ops_routes.py: /healthz, /metrics, /openapi.json;
* engine/web: the HTML pages under /self and /console.

Who may call what is decided in one place, engine/http/auth.py (the route -> rights table,
the admin and read tokens, API keys, the operator log of writes). Every error is
``{"error": code, "detail": text}`` with the status the contract names (engine/http/errors.py);
malformed input is a 400, never a 500.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin

from engine import limits
from engine.http import access_routes, auth, campus_routes, ledger_routes, ops_routes
from engine.http.errors import EXCEPTION_HANDLERS
from engine.service import Engine
from engine.web import routes as web


def create_app(
    engine: Engine,
    *,
    admin_token: str,
    read_token: str,
    extra_routes: list[Any] | None = None,
) -> Litestar:
    """The Litestar application over a started (or about to be started) engine.

    Every route must have a rule in engine/http/auth.py (LookupError otherwise);
    ``extra_routes`` (tests) are unguarded.
    """
    routes: list[Any] = [
        *ledger_routes.ROUTES,
        *ops_routes.ROUTES,
        *(extra_routes or []),
        *campus_routes.ROUTES,
        *access_routes.ROUTES,
        *web.route_handlers(),  # /self, /console (HTML pages), /static
    ]
    app = Litestar(
        route_handlers=routes,
        before_request=auth.authorize,
        # pages under /self, /console answer HTML; JSON elsewhere
        exception_handlers=web.html_errors(EXCEPTION_HANDLERS),
        middleware=[ops_routes.timing, auth.record_writes],
        request_max_body_size=limits.MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title="onecard",
            version="0.1.0",
            path="/schema",
            render_plugins=[JsonRenderPlugin(path="/openapi.json")],
        ),
        debug=False,
    )
    app.state.engine = engine
    auth.install(app, auth.access_for(engine, admin_token=admin_token, read_token=read_token),
                 unguarded=extra_routes or ())
    return app

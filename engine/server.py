"""``onecard serve``: the engine, the HTTP API and the terminal gateway in one event loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

import uvicorn

from engine.api import create_app
from engine.config import tokens_from_env
from engine.service import Engine

log = logging.getLogger(__name__)


async def serve(dsn: str, args: argparse.Namespace) -> None:
    """Run until SIGINT/SIGTERM; then stop accepting, drain the queue, answer it, exit."""
    admin, read = tokens_from_env(args.data_dir)
    engine = Engine(dsn)
    await engine.start()
    app = create_app(engine, admin_token=admin, read_token=read)
    host, port = args.http
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="none",
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=10,
        )
    )
    gateway = None
    if not args.no_iso:
        with contextlib.suppress(ModuleNotFoundError):
            from terminals.gateway import Gateway

            gateway = Gateway(engine)
            await gateway.start(*args.iso)
            log.info("terminal gateway on %s:%d", *args.iso)
    log.info("HTTP API on http://%s:%d (OpenAPI at /openapi.json)", host, port)
    try:
        await server.serve()
    finally:
        if gateway is not None:
            await gateway.stop()
        await engine.stop()
        await asyncio.sleep(0)

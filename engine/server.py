"""``onecard serve``: the engine, the HTTP API and the terminal gateway in one event loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Generator

import uvicorn

from engine.api import create_app
from engine.config import tokens_from_env
from engine.service import Engine

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling.

    uvicorn re-raises a captured SIGTERM after it shuts down, which kills the process before
    the engine drains its queue and before the embedded PostgreSQL is stopped. The engine owns
    the signals instead and asks uvicorn to exit.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def request_exit(self) -> None:
        """Stop accepting and let in-flight requests finish."""
        self.should_exit = True


async def serve(dsn: str, args: argparse.Namespace) -> None:
    """Run until SIGINT/SIGTERM; then stop accepting, drain the queue, answer it, exit."""
    admin, read = tokens_from_env(args.data_dir)
    engine = Engine(dsn)
    await engine.start()
    app = create_app(engine, admin_token=admin, read_token=read)
    host, port = args.http
    server = _Server(
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
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_exit)
    try:
        await server.serve()
    finally:
        if gateway is not None:
            await gateway.stop()
        await engine.stop()
        await asyncio.sleep(0)

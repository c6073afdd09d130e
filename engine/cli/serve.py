"""``onecard serve``: the engine, the HTTP API and the terminal gateway in one event loop.

This is the composition root: the one place that wires the engine, the campus, the HTTP edge
and the terminal edge together (the CLI is the top of the house; nothing imports it)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from typing import Final

from engine.access import sealing, secretbox
from engine.campus import Campus
from engine.cli.base import Command, hostport_arg
from engine.cli.workers import Gateways, workers_arg
from engine.config import DEFAULT_HTTP, DEFAULT_ISO, tokens_from_env
from engine.db.retention import run_pruner, windows_from_env
from engine.finance.snapshots import run_alongside
from engine.http.app import create_app
from engine.http.server import http_server
from engine.service import Engine, supervise

log = logging.getLogger(__name__)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http", default=DEFAULT_HTTP, type=hostport_arg, help="HOST:PORT for HTTP")
    p.add_argument("--iso", default=DEFAULT_ISO, type=hostport_arg, help="HOST:PORT for ISO 8583")
    p.add_argument("--no-iso", action="store_true", help="do not start the terminal gateway")
    p.add_argument(
        "--gateway-workers", default=1, type=workers_arg, metavar="N",
        help="terminal gateway processes sharing the ISO port (SO_REUSEPORT), each with its "
        "own engine on the database (default 1: the gateway runs in this process only)",
    )


async def _serve(args: argparse.Namespace, dsn: str) -> int:
    return await serve(dsn, args)


async def serve(dsn: str, args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; then stop accepting, drain the queue, answer it, exit 0.
    Exit 1 when the gateway workers crash-loop (engine/cli/workers.py)."""
    workers: int = args.gateway_workers
    if args.no_iso and workers > 1:
        raise ValueError("--gateway-workers needs the terminal gateway (drop --no-iso)")
    admin, read = tokens_from_env(args.data_dir)
    windows = windows_from_env()  # a bad retention variable stops us before anything starts
    box = secretbox.box_for(args.data_dir)  # before anything starts: no key, no engine
    secretbox.install(box)
    engine = Engine(dsn)
    await engine.start()
    try:
        async with engine.store.pool.acquire() as conn:
            sealed = await sealing.prepare(conn, box)  # an older database's clear secrets
    except BaseException:
        await engine.stop()
        raise
    if sealed.pins or sealed.mac_keys:
        log.info("sealed %d PINs and %d MAC keys under key %s", sealed.pins, sealed.mac_keys,
                 box.key_id)
    pool, cluster = engine.store.pool, engine.store.distributed
    pruner = asyncio.create_task(
        supervise("retention pruner", lambda: run_pruner(pool, windows, cluster=cluster)),
        name="onecard-retention",
    )
    # One Campus for both doors: its card and terminal caches must see a report-lost made over
    # HTTP before the next swipe at a terminal.
    campus = Campus(engine, secrets=box)  # in the campus time zone ($ONECARD_TZ)
    app = create_app(engine, admin_token=admin, read_token=read)
    app.state.campus = campus
    host, port = args.http
    server = http_server(app, host, port)
    # Both doors close at once on a signal (or when the gateway workers crash-loop): the
    # gateways stop accepting and answer what they have read while uvicorn does the same; the
    # engine drains its queue after both.
    stopping: list[asyncio.Task[None]] = []

    def on_stop() -> None:
        server.request_exit()
        if gateways is not None and not stopping:
            stopping.append(asyncio.create_task(gateways.stop(), name="onecard-gateway-stop"))

    gateways = None
    if not args.no_iso:
        gateways = Gateways(engine, campus, workers=workers, data_dir=args.data_dir,
                            on_failure=on_stop)
        await gateways.start(*args.iso)
        log.info("terminal gateway on %s:%d (%d processes)", args.iso[0], gateways.own.port,
                 workers)
    log.info("HTTP API on http://%s:%d (OpenAPI at /openapi.json)", host, port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop)
    try:
        await run_alongside(server.serve(), engine.store)  # + end-of-day snapshots
    finally:
        pruner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pruner
        if stopping:
            await stopping[0]
        elif gateways is not None:
            await gateways.stop()
        await app.state.access.close()
        await engine.stop()
        await asyncio.sleep(0)
    return 1 if gateways is not None and gateways.failed else 0


SERVE: Final = Command("serve", "run the HTTP API and terminal gateway", _arguments, _serve)

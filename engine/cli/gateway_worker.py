"""One gateway worker process of ``onecard serve --gateway-workers N`` (started by serve as
``python -m engine.cli.gateway_worker``, never by hand; see engine/cli/workers.py).

Kept apart from engine/cli/workers.py, which serve imports: a module run with ``-m`` must not
be imported by its package first (nothing imports this one).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import uvloop

from engine.access import secretbox
from engine.campus import Campus
from engine.cli.base import hostport_arg
from engine.cli.workers import DSN_ENV, READY_LINE
from engine.service import Engine, tune_gc
from terminals.gateway import Gateway

log = logging.getLogger(__name__)


async def run_worker(dsn: str, host: str, port: int, data_dir: str) -> int:
    """One worker: an engine, a Campus and a gateway on the shared port, until told to stop."""
    box = secretbox.box_for(data_dir, create=False)  # the parent made the key file, if any
    secretbox.install(box)
    engine = Engine(dsn)
    await engine.start(run_migrations=False)  # the parent migrated before starting us
    try:
        gateway = Gateway(engine, campus=Campus(engine, secrets=box))
        await gateway.start(host, port, sweep=True, reuse_port=True)
        try:
            os.write(sys.stdout.fileno(), READY_LINE)
            await _until_stopped()
        finally:
            await gateway.stop()
    finally:
        await engine.stop()
    return 0


async def _until_stopped() -> None:
    """Until SIGTERM or SIGINT, or until standard input ends (the parent is gone)."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    parent = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(parent), sys.stdin)
    waits = {asyncio.create_task(signalled.wait()), asyncio.create_task(parent.read())}
    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    if not signalled.is_set():
        log.warning("serve is gone: stopping")


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process (started by serve, not by hand)."""
    p = argparse.ArgumentParser(prog="python -m engine.cli.gateway_worker",
                                description="one gateway worker of onecard serve")
    p.add_argument("--iso", type=hostport_arg, required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--index", type=int, required=True)
    args = p.parse_args(argv)
    dsn = os.environ.get(DSN_ENV)
    if not dsn:
        p.error(f"{DSN_ENV} is not set")
    logging.basicConfig(
        level=logging.INFO,  # as serve logs
        format=f"%(asctime)s %(levelname)s worker-{args.index}[%(process)d] %(name)s: "
        "%(message)s",
    )
    secretbox.configure(args.data_dir)
    tune_gc()
    host, port = args.iso
    return int(uvloop.run(run_worker(dsn, host, port, args.data_dir)))


if __name__ == "__main__":
    sys.exit(main())

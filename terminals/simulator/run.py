"""A simulation from end to end: start the engine (and a gateway, unless one already runs),
build the campus, drive the terminals, check the ledger against the answers, report."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from rich.console import Console

from engine.campus import Campus
from engine.service import Engine
from terminals.gateway import Gateway
from terminals.simulator.books import Stats
from terminals.simulator.checks import check_ledger
from terminals.simulator.driver import drive
from terminals.simulator.options import Options, check_options
from terminals.simulator.report import Report, summarize
from terminals.simulator.workers import drive_workers
from terminals.simulator.world import World, build_campus

BeforeCheck = Callable[[Engine, World], Awaitable[None]]


async def simulate(
    dsn: str,
    o: Options,
    *,
    console: Console | None = None,
    before_check: BeforeCheck | None = None,
) -> Report:
    """Build a campus, drive it, check it. ``before_check`` runs between traffic and check
    (tests use it to prove the check notices tampering)."""
    check_options(o)
    console = console or Console()
    engine = Engine(dsn)
    await engine.start()
    try:
        campus = Campus(engine)
        async with _gateway(engine, campus, o) as (host, port):
            with console.status("building the campus…"):
                world, books = await build_campus(engine, campus, o, host, port)
            console.print(
                f"ledger {world.ledger}: {len(world.holders)} holders, {len(world.terminals)} "
                f"terminals, {len(world.rooms)} rooms; gateway {host}:{port}",
                highlight=False,
            )
            stats = Stats()
            if o.workers:
                elapsed = await drive_workers(world, books, stats, o, host, port, console)
            else:
                elapsed = await drive(world, books, stats, o, console)
            if before_check is not None:
                await before_check(engine, world)
            check = await check_ledger(engine, world, books, stats)
    finally:
        await engine.stop()
    return summarize(world, stats, check, elapsed)


@contextlib.asynccontextmanager
async def _gateway(engine: Engine, campus: Campus, o: Options) -> AsyncIterator[tuple[str, int]]:
    """Where the terminals connect: the gateway given with ``--iso``, or one started here
    (stopped on the way out)."""
    if o.iso is not None:
        yield o.iso
        return
    gateway = Gateway(engine, campus=campus)
    try:
        await gateway.start("127.0.0.1", 0)
        yield "127.0.0.1", gateway.port
    finally:
        await gateway.stop()

"""``self``: logged-in students loading ``/self`` and ``/self/statement`` (issue 13) against
``onecard serve`` in its own process, over real sockets: offered at a fixed rate (the latency
a student on a phone sees; target p99 <= 50 ms at 500 page loads/s), then as fast as the
clients go.

The fixture: ``SELF_HOLDERS`` holders (fewer with a smaller ``--purses``), each with a card,
a dorm room, a top-up and ``SELF_MEALS`` meals (the statement's first page is full), and a
session made straight in ``web_sessions`` (a login's Argon2 hashing is not what is measured).
Each request is one page load of a random student: half home pages, half statements, each
checked to be the page (not a redirect to the login). The database's transactions per page
load are reported: a page load costs the session's read and the page's own, each coalesced
with those of concurrent page loads (so fewer than two under load).
"""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Final

import asyncpg

from bench.databases import database_of, scratch_database
from bench.loop import Bar, Request, closed_loop, open_loop
from bench.machine import CpuMeter, CpuProbe, children_peak_rss_mb, machine, peak_rss_mb
from bench.measure import Stats
from bench.options import DEFAULT_SELF_RATE, Options
from bench.report import Result, now_stamp, target
from bench.server import Http, HttpError, Server, rss_mb, serve
from engine.campus.accounts import holder_account_ids, room_account_id
from engine.service import Engine
from engine.web import sessions
from engine.web.portal import SELF
from ledger.account import Account
from ledger.status import AccountStatus, TransferStatus
from ledger.transfer import Transfer
from ledger.types import AccountFlag, AccountKind, TransferCode

LEDGER: Final = 1
SELF_HOLDERS: Final = 2_000
SELF_MEALS: Final = 24  # with the top-up, more than a statement page (20)
CANTEEN: Final = 10**15 + 1
BANK: Final = 10**15 + 2
PACED_WORKERS: Final = 128  # connections available to the open loop (a browser each)
TARGET_P99_MS: Final = 50.0
TARGET_PAGES_PER_S: Final = 500
LOAD_CHUNK: Final = 4_000
_NO_OVERDRAFT: Final = (AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,)

SQL_HOLDERS: Final = """
INSERT INTO holders (ledger, id, name, kind, purse_account_id, subsidy_account_id, created_at)
SELECT $1, h, 'Student ' || h, 'student', p, s, 0
FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS q(h, p, s)
"""
SQL_CARDS: Final = """
INSERT INTO cards (ledger, card_no, holder_id, status, daily_limit, created_at, updated_at)
SELECT $1, c, h, 'active', 100000, 0, 0 FROM unnest($2::text[], $3::text[]) AS q(c, h)
"""
SQL_ROOMS: Final = """
INSERT INTO rooms (ledger, room_id, account_id, created_at)
SELECT $1, r, a, 0 FROM unnest($2::text[], $3::bigint[]) AS q(r, a)
"""
SQL_RESIDENTS: Final = """
INSERT INTO room_residents (ledger, holder_id, room_id, created_at)
SELECT $1, h, r, 0 FROM unnest($2::text[], $3::text[]) AS q(h, r)
"""
SQL_XACTS: Final = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"


def holder_id(i: int) -> str:
    """The ``i``-th student's id."""
    return f"B{i:07d}"


async def load(dsn: str, holders: int, seed: int) -> list[str]:
    """The fixture (see the module's docstring); the session cookies, one per student."""
    ids = [holder_id(i) for i in range(holders)]
    purses = [holder_account_ids(LEDGER, h) for h in ids]
    rooms = [f"B{i // 4:05d}" for i in range(holders)]  # four students a room
    room_ids = sorted(set(rooms))
    engine = Engine(dsn)
    await engine.start(run_migrations=True)
    try:
        accounts = [Account(id=CANTEEN, ledger=LEDGER, kind=AccountKind.MERCHANT, code=2),
                    Account(id=BANK, ledger=LEDGER, kind=AccountKind.CLEARING, code=4)]
        for h, (p, s) in zip(ids, purses, strict=True):
            accounts += [Account(id=p, ledger=LEDGER, kind=AccountKind.PURSE, code=10,
                                 flags=_NO_OVERDRAFT, holder_id=h),
                         Account(id=s, ledger=LEDGER, kind=AccountKind.SUBSIDY, code=20,
                                 flags=_NO_OVERDRAFT, holder_id=h)]
        accounts += [Account(id=room_account_id(LEDGER, r), ledger=LEDGER, kind=AccountKind.ROOM,
                             code=30, flags=_NO_OVERDRAFT) for r in room_ids]
        for i in range(0, len(accounts), LOAD_CHUNK):
            statuses = await engine.store.create_accounts(accounts[i : i + LOAD_CHUNK])
            if {s for s in statuses} != {AccountStatus.CREATED}:
                raise RuntimeError(f"loading accounts answered {set(statuses)}")
        async with engine.store.pool.acquire() as conn:
            await conn.execute(SQL_HOLDERS, LEDGER, ids, [p for p, _ in purses],
                               [s for _, s in purses])
            await conn.execute(SQL_CARDS, LEDGER, [f"9{i:015d}" for i in range(holders)], ids)
            await conn.execute(SQL_ROOMS, LEDGER, room_ids,
                               [room_account_id(LEDGER, r) for r in room_ids])
            await conn.execute(SQL_RESIDENTS, LEDGER, ids, rooms)
        await _money(engine, purses, random.Random(seed))
        now = datetime.now(UTC)
        cookies = []
        for h in ids:
            session_id, _ = await sessions.start(engine.store.pool, SELF.kind, h, now=now,
                                                 replacing=None)
            cookies.append(session_id)
        return cookies
    finally:
        await engine.stop()


async def _money(engine: Engine, purses: list[tuple[int, int]], rng: random.Random) -> None:
    """A top-up and ``SELF_MEALS`` meals per student, through the engine's batch path."""
    transfers = [Transfer(id=_id(rng), ledger=LEDGER, debit_account_id=BANK,
                          credit_account_id=p, amount=50_000, code=TransferCode.TOP_UP)
                 for p, _ in purses]
    for _ in range(SELF_MEALS):
        transfers += [Transfer(id=_id(rng), ledger=LEDGER, debit_account_id=p,
                               credit_account_id=CANTEEN, amount=rng.randrange(300, 1_500),
                               code=TransferCode.MEAL) for p, _ in purses]
    for i in range(0, len(transfers), LOAD_CHUNK):
        results = await engine.batcher.submit(transfers[i : i + LOAD_CHUNK])
        if {r.status for r in results} != {TransferStatus.CREATED}:
            raise RuntimeError(f"loading transfers answered {({r.status for r in results})}")


def _id(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def student(server: Server, cookies: list[str], seed: int, conns: list[Http]) -> Request:
    """A client loading random students' pages on its own connection (home or statement)."""
    h = Http(server.host, server.http_port)
    conns.append(h)
    rng = random.Random(seed)

    async def one() -> tuple[int, list[str]]:
        cookie = cookies[rng.randrange(len(cookies))]
        path, mark = ("/self", b'id="total-available"') if rng.random() < 0.5 else (
            "/self/statement", b'<table id="statement">')
        status, body = await h.request("GET", path, extra=f"Cookie: {SELF.cookie}={cookie}\r\n")
        if status != 200 or mark not in body:
            raise HttpError(status, body)
        return 0, []

    return one


@contextlib.asynccontextmanager
async def self_server(o: Options) -> AsyncIterator[tuple[str, list[str], Server]]:
    """A scratch database with the students loaded, served by ``onecard serve``."""
    async with scratch_database(o.dsn, "self", keep=o.keep) as dsn:
        cookies = await load(dsn, min(o.purses, SELF_HOLDERS), o.seed)
        async with serve(dsn) as server:
            yield dsn, cookies, server


async def _xacts(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        n: int = await conn.fetchval(SQL_XACTS)
        return n
    finally:
        await conn.close()


async def run(o: Options, bar: Bar) -> Result:
    """A paced phase at ``--rate`` (default 500 page loads/s) and a closed-loop phase."""
    m = await machine(o.dsn)
    cpu = CpuMeter()
    rate = o.rate or DEFAULT_SELF_RATE
    async with self_server(o) as (dsn, cookies, server):
        probe = CpuProbe(database=database_of(dsn), pids={"server (python)": server.pid},
                         own="load generator")
        cpu.start()
        conns: list[Http] = []
        k = 0

        def students(n: int) -> list[Request]:
            nonlocal k
            k += n
            return [student(server, cookies, o.seed * 7919 + k + i, conns) for i in range(n)]

        phases: list[Stats] = []
        per_page: list[float] = []
        try:
            for phase in ("paced", "closed"):
                x0 = await _xacts(dsn)
                if phase == "paced":
                    s = await open_loop(f"self pages paced {rate:g}/s", students(PACED_WORKERS),
                                        rate=rate, duration=o.duration, warmup=o.warmup,
                                        bar=bar, cpu=probe)
                else:
                    s = await closed_loop(f"self pages c={o.concurrency}",
                                          students(o.concurrency), duration=o.duration,
                                          warmup=o.warmup, bar=bar, cpu=probe)
                x1 = await _xacts(dsn)
                pages = s.requests_per_s * (o.duration + o.warmup)
                per_page.append(round((x1 - x0) / pages, 2) if pages else 0.0)
                phases.append(s)
        finally:
            for h in conns:
                await h.close()
        server_rss = rss_mb(server.pid)
    cpu.stop(m)
    paced, flat_out = phases
    ok = paced.requests_per_s >= 0.98 * rate and not paced.errors
    return Result(
        workload="self",
        started_at=now_stamp(),
        seed=o.seed,
        config={"duration_s": o.duration, "rate": rate, "paced_workers": PACED_WORKERS,
                "closed_loop_clients": o.concurrency, "students": len(cookies),
                "meals_per_student": SELF_MEALS, "pages": "50% /self, 50% /self/statement",
                "db_transactions_per_page": {"paced": per_page[0], "closed": per_page[1]}},
        machine=m,
        transfers_per_s=paced.requests_per_s,
        p50_ms=paced.p50_ms,
        p99_ms=paced.p99_ms,
        peak_rss_mb={"server": server_rss or children_peak_rss_mb(),
                     "load generator": peak_rss_mb()},
        phases=phases,
        targets=[
            target(f"page p99 at {rate:g} page loads/s offered", f"<= {TARGET_P99_MS} ms",
                   paced.p99_ms, ok and paced.p99_ms <= TARGET_P99_MS),
            target("page loads/s (closed loop)", f">= {TARGET_PAGES_PER_S}",
                   flat_out.requests_per_s, flat_out.requests_per_s >= TARGET_PAGES_PER_S),
        ],
        notes=["self's transfers_per_s/p50/p99 are the paced phase's page loads/s and latency",
               "db_transactions_per_page: pg_stat_database commits per page load (the session "
               "read and the page's coalesced read; fewer under load)"],
    )


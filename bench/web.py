"""``http``: the HTTP API in its own process (``onecard serve --no-iso``), driven over real
sockets by concurrent keep-alive clients: batched POSTs, single-transfer POSTs as fast as they
go, and single-transfer POSTs offered at a fixed rate (the latency a terminal would see)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Final, NamedTuple

import msgspec

from bench.databases import database_of, scratch_database
from bench.fixture import Campus, campus_ids, load_campus
from bench.loop import Bar, BatchProbe, Request, closed_loop, open_loop
from bench.machine import CpuMeter, CpuProbe, Machine, children_peak_rss_mb, machine, peak_rss_mb
from bench.measure import Stats
from bench.mix import Mix
from bench.options import DEFAULT_SINGLE_RATE, Options
from bench.report import Result, now_stamp, target
from bench.server import (
    ADMIN_TOKEN,
    Http,
    HttpError,
    Server,
    rss_mb,
    serve,
    server_batch_probe,
)
from engine.access.apikeys import Created, create_key
from engine.access.roles import Role
from engine.db.pool import create_pool
from engine.store import Store
from ledger.transfer import Transfer

LEDGER: Final = 1
BATCHED_CLIENTS: Final = 8
PACED_WORKERS: Final = 256  # connections available to the open loop
TARGET_BATCHED_TPS: Final = 20_000
TARGET_SINGLE_RPS: Final = 2_000
TARGET_SINGLE_P99_MS: Final = 25.0
# --credentials: rounds of (admin token, API key) single-transfer phases, interleaved so that
# drift of the machine (other load, a warming cache) falls on both alike
CREDENTIAL_ROUNDS: Final = 3
TARGET_KEY_VS_TOKEN: Final = 0.95  # an API key's requests/s within 5% of the admin token's


class ResultView(msgspec.Struct):
    """One element of a POST /v1/transfers answer."""

    id: str
    status: str
    timestamp: int | None = None


_encode = msgspec.json.Encoder().encode
_decode_results = msgspec.json.Decoder(list[ResultView]).decode


@contextlib.asynccontextmanager
async def campus_server(
    o: Options, tag: str, *, iso: bool = False
) -> AsyncIterator[tuple[str, Campus, Server]]:
    """A scratch database with the campus fixture loaded, served by ``onecard serve``."""
    async with scratch_database(o.dsn, tag, keep=o.keep) as dsn:
        campus = campus_ids(LEDGER, o.purses, base=0, random_ids=o.random_ids)
        pool = await create_pool(dsn, max_size=2)
        try:
            await load_campus(Store(pool), campus, seed=o.seed)
        finally:
            await pool.close()
        workers = o.gateway_workers if iso else 1
        async with serve(dsn, iso=iso, gateway_workers=workers) as server:
            yield dsn, campus, server


def transfer_worker(server: Server, mix: Mix, size: int, conns: list[Http], *,
                    token: str = ADMIN_TOKEN) -> Request:
    """A client that POSTs ``size`` transfers per request on its own connection."""
    h = Http(server.host, server.http_port, token=token)
    conns.append(h)

    async def one() -> tuple[int, list[str]]:
        req: list[Transfer] = mix.request(size)
        try:
            body = await h.post_json("/v1/transfers", _encode(req))
        except HttpError:
            mix.replay(req)  # 503: the client retries the same transfers later
            raise
        return len(req), [r.status for r in _decode_results(body)]

    return one


async def close_all(conns: list[Http]) -> None:
    """Close every client connection."""
    for h in conns:
        await h.close()


def server_cpu(dsn: str, server: Server) -> CpuProbe:
    """CPU of the load generator, the server process and the database's backends."""
    return CpuProbe(database=database_of(dsn), pids={"server (python)": server.pid},
                    own="load generator")


def probe(server: Server) -> BatchProbe:
    """The server's batch-size histogram, for mean batch sizes."""

    async def p() -> tuple[float, float]:
        return await server_batch_probe(server.host, server.http_port)

    return p


class _Phases(NamedTuple):
    """What the http workload measured."""

    batched: Stats
    single: Stats
    paced: Stats
    sweep: list[Stats]
    credentials: list[Stats]


async def compare_credentials(
    o: Options, dsn: str, server: Server, workers: Any, bar: Bar
) -> list[Stats]:
    """Single-transfer phases with the admin token and with an API key of role admin (whose
    every write is also appended to the operator log), interleaved."""
    pool = await create_pool(dsn, max_size=1)
    try:
        async with pool.acquire() as conn:
            made = await create_key(conn, role=Role.ADMIN, name="bench-admin-key")
    finally:
        await pool.close()
    assert isinstance(made, Created), made
    out: list[Stats] = []
    for i in range(1, CREDENTIAL_ROUNDS + 1):
        for label, token in (("admin token", ADMIN_TOKEN), ("API key", made.secret)):
            out.append(await closed_loop(
                f"http single c={o.concurrency} {label} #{i}", workers(o.concurrency, 1, token),
                duration=o.duration, warmup=o.warmup, bar=bar, batch_probe=probe(server),
                cpu=server_cpu(dsn, server),
            ))
    return out


def credential_targets(phases: list[Stats]) -> list[Any]:
    """API key vs admin token: the median of their rounds' requests/s."""
    token = sorted(p.requests_per_s for p in phases if " admin token #" in p.name)
    key = sorted(p.requests_per_s for p in phases if " API key #" in p.name)
    if not token or not key:
        return []
    t, k = token[len(token) // 2], key[len(key) // 2]
    return [target("http single requests/s, API key vs admin token (median of rounds)",
                   f">= {TARGET_KEY_VS_TOKEN:.0%} of {t:,.0f}", k, k >= TARGET_KEY_VS_TOKEN * t)]


async def run(o: Options, bar: Bar) -> Result:
    """Batched, single closed-loop and single paced phases, plus a concurrency sweep."""
    m: Machine = await machine(o.dsn)
    cpu = CpuMeter()
    rate = o.rate or DEFAULT_SINGLE_RATE
    async with campus_server(o, "http") as (dsn, campus, server):
        cpu.start()
        measured = await _phases(o, bar, rate, dsn, campus, server)
        server_rss = rss_mb(server.pid)
    cpu.stop(m)
    return _result(o, m, rate, measured, server_rss)


async def _phases(
    o: Options, bar: Bar, rate: float, dsn: str, campus: Campus, server: Server
) -> _Phases:
    """Every phase against one server, each client on its own stream of the mix."""
    conns: list[Http] = []
    stream = 0

    def workers(n: int, size: int, token: str = ADMIN_TOKEN) -> list[Request]:
        nonlocal stream
        out = []
        for _ in range(n):
            stream += 1
            out.append(transfer_worker(server, Mix(campus, seed=o.seed, stream=stream),
                                       size, conns, token=token))
        return out

    try:
        batched = await closed_loop(
            f"http batched {o.http_batch}/request c={BATCHED_CLIENTS}",
            workers(BATCHED_CLIENTS, o.http_batch),
            duration=o.duration, warmup=o.warmup, bar=bar, batch_probe=probe(server),
            cpu=server_cpu(dsn, server),
        )
        single = await closed_loop(
            f"http single c={o.concurrency}",
            workers(o.concurrency, 1),
            duration=o.duration, warmup=o.warmup, bar=bar, batch_probe=probe(server),
            cpu=server_cpu(dsn, server),
        )
        paced = await open_loop(
            f"http single paced {rate:g}/s",
            workers(PACED_WORKERS, 1),
            rate=rate, duration=o.duration, warmup=o.warmup, bar=bar,
            cpu=server_cpu(dsn, server),
        )
        credentials = (
            await compare_credentials(o, dsn, server, workers, bar) if o.credentials else []
        )
        sweep = [
            await closed_loop(
                f"sweep single c={c}", workers(c, 1), duration=o.sweep_duration,
                warmup=min(o.warmup, 0.5), bar=bar, batch_probe=probe(server),
                cpu=server_cpu(dsn, server),
            )
            for c in o.sweep
        ]
    finally:
        await close_all(conns)
    return _Phases(batched, single, paced, sweep, credentials)


def _result(
    o: Options, m: Machine, rate: float, measured: _Phases, server_rss: float
) -> Result:
    batched, single, paced = measured.batched, measured.single, measured.paced
    paced_ok = paced.requests_per_s >= 0.98 * TARGET_SINGLE_RPS and not paced.errors
    return Result(
        workload="http",
        started_at=now_stamp(),
        seed=o.seed,
        config={
            "duration_s": o.duration, "warmup_s": o.warmup, "http_batch": o.http_batch,
            "batched_clients": BATCHED_CLIENTS, "single_clients": o.concurrency,
            "paced_rate": rate, "paced_workers": PACED_WORKERS, "purses": o.purses,
            "sweep": o.sweep, "server": "onecard serve --no-iso (separate process)",
            "transfer_ids": o.transfer_ids,
        },
        machine=m,
        transfers_per_s=batched.transfers_per_s,
        p50_ms=batched.p50_ms,
        p99_ms=batched.p99_ms,
        peak_rss_mb={
            "server": server_rss or children_peak_rss_mb(),
            "load generator": peak_rss_mb(),
        },
        phases=[batched, single, paced, *measured.credentials],
        sweep=measured.sweep,
        targets=[
            *credential_targets(measured.credentials),
            target("http batched transfers/s", f">= {TARGET_BATCHED_TPS:,}",
                   batched.transfers_per_s, batched.transfers_per_s >= TARGET_BATCHED_TPS),
            target("http single requests/s (closed loop)", f">= {TARGET_SINGLE_RPS:,}",
                   single.requests_per_s, single.requests_per_s >= TARGET_SINGLE_RPS),
            target(f"http single p99 at {rate:g} requests/s offered",
                   f"<= {TARGET_SINGLE_P99_MS} ms", paced.p99_ms,
                   paced_ok and paced.p99_ms <= TARGET_SINGLE_P99_MS),
        ],
    )

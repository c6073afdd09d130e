"""``query``: balance reads (``GET /v1/accounts/{id}/balance``) against ``onecard serve``:
offered at a fixed rate (the latency a reader sees), then as fast as the clients go."""

from __future__ import annotations

import random
from typing import Final

import msgspec

from bench.loop import Bar, Request, closed_loop, open_loop
from bench.machine import CpuMeter, children_peak_rss_mb, machine, peak_rss_mb
from bench.measure import Stats
from bench.options import DEFAULT_QUERY_RATE, Options
from bench.report import Result, now_stamp, target
from bench.server import READ_TOKEN, Http, Server, rss_mb
from bench.web import campus_server, close_all, server_cpu

PACED_WORKERS: Final = 64
TARGET_RPS: Final = 1_000
TARGET_P99_MS: Final = 5.0


class BalanceView(msgspec.Struct):
    """The fields of a balance answer the reader checks."""

    account_id: int
    balance: int


_decode = msgspec.json.Decoder(BalanceView).decode


def reader(server: Server, accounts: list[int], seed: int, conns: list[Http]) -> Request:
    """A client reading random purses' balances on its own connection."""
    h = Http(server.host, server.http_port, token=READ_TOKEN)
    conns.append(h)
    rng = random.Random(seed)

    async def one() -> tuple[int, list[str]]:
        aid = accounts[rng.randrange(len(accounts))]
        b = _decode(await h.get(f"/v1/accounts/{aid}/balance"))
        if b.account_id != aid:
            raise ValueError(f"asked for {aid}, answered {b.account_id}")
        return 0, []

    return one


async def run(o: Options, bar: Bar) -> Result:
    """A paced phase at ``--rate`` (default 1,000 reads/s) and a closed-loop phase."""
    m = await machine(o.dsn)
    cpu = CpuMeter()
    rate = o.rate or DEFAULT_QUERY_RATE
    sweep: list[Stats] = []
    async with campus_server(o, "query") as (dsn, campus, server):
        cpu.start()
        conns: list[Http] = []
        k = 0

        def readers(n: int) -> list[Request]:
            nonlocal k
            k += n
            return [reader(server, campus.purses, o.seed * 7919 + k + i, conns) for i in range(n)]

        try:
            paced = await open_loop(
                f"balance reads paced {rate:g}/s", readers(PACED_WORKERS),
                rate=rate, duration=o.duration, warmup=o.warmup, bar=bar,
                cpu=server_cpu(dsn, server),
            )
            flat_out = await closed_loop(
                f"balance reads c={o.concurrency}", readers(o.concurrency),
                duration=o.duration, warmup=o.warmup, bar=bar,
                cpu=server_cpu(dsn, server),
            )
            for c in o.sweep:
                sweep.append(
                    await closed_loop(
                        f"sweep reads c={c}", readers(c), duration=o.sweep_duration,
                        warmup=min(o.warmup, 0.5), bar=bar,
                    )
                )
        finally:
            await close_all(conns)
        server_rss = rss_mb(server.pid)
    cpu.stop(m)
    ok = paced.requests_per_s >= 0.98 * TARGET_RPS and not paced.errors
    return Result(
        workload="query",
        started_at=now_stamp(),
        seed=o.seed,
        config={"duration_s": o.duration, "rate": rate, "paced_workers": PACED_WORKERS,
                "closed_loop_clients": o.concurrency, "purses": o.purses, "sweep": o.sweep},
        machine=m,
        # reads carry no transfers: the headline is reads/s
        transfers_per_s=paced.requests_per_s,
        p50_ms=paced.p50_ms,
        p99_ms=paced.p99_ms,
        peak_rss_mb={"server": server_rss or children_peak_rss_mb(),
                     "load generator": peak_rss_mb()},
        phases=[paced, flat_out],
        sweep=sweep,
        targets=[
            target(f"reads p99 at {rate:g}/s offered", f"<= {TARGET_P99_MS} ms", paced.p99_ms,
                   ok and paced.p99_ms <= TARGET_P99_MS),
            target("reads/s (closed loop)", f">= {TARGET_RPS:,}", flat_out.requests_per_s,
                   flat_out.requests_per_s >= TARGET_RPS),
        ],
        notes=["query's transfers_per_s/p50/p99 are the paced phase's reads/s and latency"],
    )

"""``python -m bench terminals --client wrk``: the Lua script it generates, wrk's summary line
parsed into the bench's record, the options, and real wrk runs (wrk is a CI package: .ci/run
installs it, and these tests fail rather than skip without it)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import asyncpg
import msgspec
import pytest

from bench.fixture import campus_ids
from bench.loop import Bar
from bench.options import Options, add_arguments, options
from bench.web import campus_server, probe, server_cpu
from bench.wrk import (
    LOAD_GENERATOR,
    MARKER,
    WrkSummary,
    lua_script,
    parse_output,
    wrk_path,
    wrk_phase,
    wrk_stats,
)

CAMPUS: Final = campus_ids(3, 50, base=1000)
SQL_MEALS: Final = "SELECT count(*) FROM transfers WHERE ledger = $1 AND code = 1"
SAMPLE: Final = f"""Running 2s test @ http://127.0.0.1:8080/v1/transfers
  2 threads and 500 connections
Requests/sec:   4873.21
{MARKER}{{"requests":9750,"duration_us":2000800,"p50_us":80211,"p99_us":151002,\
"max_us":310000,"created":9700,"refused":40,"failed":10,"connect":0,"read":0,"write":0,\
"timeout":3}}
"""


def _options(*argv: str) -> Options:
    p = argparse.ArgumentParser()
    add_arguments(p, with_dsn=True)
    return options(p.parse_args(list(argv)), "postgresql://unused")


# -- the script and the summary ----------------------------------------------------------------


def test_the_script_names_the_campus_and_a_fresh_id_shape() -> None:
    stamp_ms = 0x0193_4A5B_6C7D
    lua = lua_script(CAMPUS, seed=5, run=1, stamp_ms=stamp_ms, token="tok-123")
    assert '"ledger":3' in lua and f'"credit_account_id":{CAMPUS.canteen}' in lua
    assert f"{CAMPUS.purses[0]} + math.random(0, {len(CAMPUS.purses) - 1})" in lua
    assert "Bearer tok-123" in lua and "math.randomseed(5 + 7919 * tid)" in lua
    # the stamp's 48 bits, then version 7, then the variant bits with the run number
    assert '"01934a5b-6c7d-7%03x-8001-%04x%08x"' in lua
    assert lua_script(CAMPUS, seed=5, run=0, stamp_ms=stamp_ms).count("-8000-") == 1
    with pytest.raises(ValueError, match="run number"):
        lua_script(CAMPUS, seed=5, run=1 << 14, stamp_ms=stamp_ms)


def test_the_summary_line_is_parsed_into_the_bench_record() -> None:
    s = parse_output(SAMPLE)
    assert s == WrkSummary(requests=9750, duration_us=2000800, p50_us=80211, p99_us=151002,
                           max_us=310000, created=9700, refused=40, failed=10, connect=0,
                           read=0, write=0, timeout=3)
    st = wrk_stats("x", s, connections=500, cpu_s={LOAD_GENERATOR: 0.974}, mean_batch=41.26)
    assert st.transfers == st.requests == 9740  # the answered ones: created or refused
    assert st.transfers_per_s == pytest.approx(9740 / 2.0008, abs=0.1)
    assert (st.p50_ms, st.p99_ms, st.max_ms) == (80.211, 151.002, 310.0)
    assert st.statuses == {"created": 9700, "not created": 40}
    assert st.errors == {"HTTP non-200": 10, "timeout": 3}
    assert st.cpu_us == {LOAD_GENERATOR: 100.0} and st.mean_batch == 41.3
    assert st.concurrency == 500 and st.request_size == 1


def test_output_without_the_summary_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="no ONECARD_WRK line"):
        parse_output("Running 2s test @ http://x\nRequests/sec: 1.0\n")


# -- the options ---------------------------------------------------------------------------------


def test_client_and_gateway_workers_reach_the_options() -> None:
    o = _options("terminals", "--client", "wrk", "--gateway-workers", "2")
    assert (o.client, o.gateway_workers) == ("wrk", 2)
    o = _options("terminals")
    assert (o.client, o.gateway_workers) == ("python", 1)


@pytest.mark.parametrize(("argv", "says"), [
    (["http", "--client", "wrk"], "apply to the terminals workload"),
    (["core", "--gateway-workers", "2"], "apply to the terminals workload"),
    (["terminals", "--gateway-workers", "0"], "--gateway-workers must be 1.."),
    (["terminals", "--gateway-workers", "17"], "--gateway-workers must be 1.."),
])
def test_options_that_cannot_apply_are_refused(argv: list[str], says: str) -> None:
    with pytest.raises(SystemExit, match=re.escape(says)):
        _options(*argv)


def test_without_wrk_the_client_is_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no wrk on it
    with pytest.raises(SystemExit, match=r"wrk is not on PATH \(apt-get install wrk\)"):
        _options("terminals", "--client", "wrk")


def test_ci_installs_wrk() -> None:
    # wrk is a required test tool, as chromium is: the tests below fail without it
    assert wrk_path() is not None, "wrk is not installed (apt-get install wrk; .ci/run does)"
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert re.search(r"apt-get install -y -q .*\bwrk\b", ci), "add wrk to .ci/run's apt-get"


# -- real runs -----------------------------------------------------------------------------------


class _Echo:
    """A keep-alive HTTP/1.1 server that answers every POST ``created`` and keeps its ids."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.bodies: list[list[dict[str, object]]] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                size = re.search(rb"(?i)content-length: *(\d+)", head)
                assert size is not None, head
                body = msgspec.json.decode(await r.readexactly(int(size[1])))
                self.bodies.append(body)
                self.ids += [t["id"] for t in body]
                out = msgspec.json.encode([{"id": t["id"], "status": "created"} for t in body])
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out))
                await w.drain()
        w.close()


@contextlib.asynccontextmanager
async def _echo_server() -> AsyncIterator[tuple[_Echo, str]]:
    echo = _Echo()
    server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield echo, f"http://127.0.0.1:{port}/v1/transfers"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.slow  # ~2 s: a warm-up and a measured second of wrk
async def test_every_request_of_every_run_is_one_meal_under_a_fresh_id() -> None:
    async with _echo_server() as (echo, url):
        st = await wrk_phase("echo", url, CAMPUS, connections=8, duration=1, warmup=1, seed=3,
                             bar=Bar(enabled=False))
    ids = [uuid.UUID(i) for i in echo.ids]
    assert len(ids) > st.requests > 100  # the warm-up's requests were sent too
    assert len(set(ids)) == len(ids), "a transfer id was sent twice"
    assert {i.version for i in ids} == {7} and {i.variant for i in ids} == {uuid.RFC_4122}
    assert {(i.int >> 48) & 0x3FFF for i in ids} == {0, 1}, "warm-up and measured run"
    purses = set(CAMPUS.purses)
    for body in echo.bodies:
        (t,) = body
        assert t["debit_account_id"] in purses and t["credit_account_id"] == CAMPUS.canteen
        assert t["ledger"] == CAMPUS.ledger and t["code"] == 1 and 300 <= t["amount"] <= 2500
    assert st.statuses == {"created": st.requests} and not st.errors


@pytest.mark.slow  # ~5-10 s: a scratch campus, onecard serve, a second of wrk
async def test_wrk_against_serve_counts_what_the_ledger_stored(admin_dsn: str) -> None:
    o = _options("terminals", "--purses", "50", "--client", "wrk")
    o.dsn = admin_dsn
    async with campus_server(o, "wrk") as (dsn, campus, server):
        st = await wrk_phase(
            "serve", f"http://{server.host}:{server.http_port}/v1/transfers", campus,
            connections=16, duration=1, warmup=0, seed=4, bar=Bar(enabled=False),
            cpu=server_cpu(dsn, server), batch_probe=probe(server))
        conn = await asyncpg.connect(dsn)
        try:
            meals = await conn.fetchval(SQL_MEALS, campus.ledger)
        finally:
            await conn.close()
    assert st.requests > 100 and not st.errors, st
    # wrk stops counting at the end of its second with a request in flight on each connection
    # (purse 0 is the fixture's poor one: some answers are refusals)
    assert st.statuses["created"] <= meals <= st.statuses["created"] + 16
    assert 0 < st.p50_ms <= st.p99_ms <= st.max_ms
    assert st.mean_batch is not None and st.mean_batch >= 1
    assert st.cpu_us[LOAD_GENERATOR] > 0 and st.cpu_us["server (python)"] > 0, st.cpu_us

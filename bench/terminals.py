"""``terminals``: 500 concurrent one-transfer clients, first over HTTP (one meal per POST),
then over the ISO 8583 gateway (0200 purchases from ``terminals.client.TerminalClient``, one
card per client, each terminal crediting the hot canteen), both against ``onecard serve``."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import random
import uuid
from typing import TYPE_CHECKING, Final

import msgspec

from bench.fixture import Campus
from bench.loop import Bar, Request, closed_loop
from bench.machine import CpuMeter, children_peak_rss_mb, machine, peak_rss_mb
from bench.measure import Stats
from bench.mix import Mix
from bench.options import Options
from bench.report import Result, now_stamp, target
from bench.server import Http, HttpError, Server, rss_mb
from bench.web import campus_server, close_all, probe, server_cpu, transfer_worker
from bench.wrk import wrk_phase
from ledger.transfer import Transfer
from ledger.types import TransferCode

if TYPE_CHECKING:
    from terminals.client import TerminalClient

TARGET_HTTP_TPS: Final = 5_000
TARGET_ISO_TPS: Final = 10_000
SETUP_CLIENTS: Final = 32
CARD_BASE: Final = 6_210_000_000_000_000
HOLDER_FUNDS_FEN: Final = 5_000_000
ISO_TIMEOUT_S: Final = 30.0


class HolderOut(msgspec.Struct):
    """The part of a POST /v1/holders answer the setup needs."""

    id: str
    status: str
    purse_account_id: int


_encode = msgspec.json.Encoder().encode


def _gateway_available() -> bool:
    return (
        importlib.util.find_spec("terminals.gateway") is not None
        and importlib.util.find_spec("engine.http.campus_routes") is not None
    )


async def _parallel(server: Server, bodies: list[tuple[str, bytes]]) -> list[bytes]:
    """POST every (path, body) over SETUP_CLIENTS connections; answers in order."""
    out: list[bytes] = [b""] * len(bodies)
    q: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        q.put_nowait(i)

    async def client() -> None:
        h = Http(server.host, server.http_port)
        try:
            while not q.empty():
                i = q.get_nowait()
                path, body = bodies[i]
                out[i] = await h.post_json(path, body)
        finally:
            await h.close()

    await asyncio.gather(*(client() for _ in range(SETUP_CLIENTS)))
    return out


async def _setup_cards(
    server: Server, c: Campus, *, terminals: int, seed: int
) -> tuple[list[str], list[tuple[str, str, bytes]]]:
    """Holders with funded purses and active cards, and POS terminals on the canteen."""
    holders = max(terminals, 2_000)
    answers = await _parallel(
        server,
        [("/v1/holders", _encode({"id": f"S{seed:03d}{i:07d}", "ledger": c.ledger,
                                   "name": f"student {i}", "kind": "student"}))
         for i in range(holders)],
    )
    purses = [msgspec.json.decode(a, type=HolderOut).purse_account_id for a in answers]
    cards = [str(CARD_BASE + i) for i in range(holders)]
    await _parallel(
        server,
        [("/v1/cards", _encode({"card_no": cards[i], "holder_id": f"S{seed:03d}{i:07d}",
                                "ledger": c.ledger}))
         for i in range(holders)],
    )
    rng = random.Random(seed)
    tops = [
        Transfer(id=uuid.UUID(int=rng.getrandbits(128)), ledger=c.ledger,
                 debit_account_id=c.clearing, credit_account_id=p, amount=HOLDER_FUNDS_FEN,
                 code=TransferCode.TOP_UP, user_data=f"card-{p}")
        for p in purses
    ]
    await _parallel(server, [("/v1/transfers", _encode(tops[i: i + 1000]))
                             for i in range(0, len(tops), 1000)])
    terms: list[tuple[str, str, bytes]] = []
    bodies = []
    for i in range(terminals):
        tid, mid = f"T{i:07d}", f"M{seed % 1000:03d}{i:011d}"
        key = hashlib.sha256(f"bench-{seed}-{i}".encode()).digest()
        terms.append((tid, mid, key))
        bodies.append(("/v1/terminals", _encode({
            "terminal_id": tid, "merchant_id": mid, "ledger": c.ledger, "kind": "pos",
            "account_id": c.canteen, "mac_key": key.hex(),
        })))
    await _parallel(server, bodies)
    return cards, terms


def iso_worker(server: Server, card: str, term: tuple[str, str, bytes], seed: int,
               clients: list[TerminalClient]) -> Request:
    """A POS terminal buying meals on one card, one 0200 at a time."""
    from terminals.client import TerminalClient

    assert server.iso_port is not None
    tid, mid, key = term
    cl = TerminalClient(server.host, server.iso_port, terminal_id=tid, merchant_id=mid,
                        mac_key=key, timeout_s=ISO_TIMEOUT_S)
    clients.append(cl)
    rng = random.Random(seed)
    connected = False

    async def one() -> tuple[int, list[str]]:
        nonlocal connected
        if not connected:
            await cl.connect()
            connected = True
        try:
            answer = await cl.request(cl.purchase(card, rng.randint(300, 2_500)))
        except Exception:
            connected = False
            raise
        return 1, [f"rc_{answer.response_code}"]

    return one


async def _http_phase(o: Options, bar: Bar, dsn: str, campus: Campus, server: Server) -> Stats:
    """Every terminal POSTs one transfer at a time over its own keep-alive connection: the
    bench's mix from Python clients, or one meal per request from wrk (``--client wrk``)."""
    if o.client == "wrk":
        return await wrk_phase(
            f"terminals over HTTP c={o.terminals} (wrk)",
            f"http://{server.host}:{server.http_port}/v1/transfers", campus,
            connections=o.terminals, duration=o.duration, warmup=o.warmup, seed=o.seed,
            bar=bar, cpu=server_cpu(dsn, server), batch_probe=probe(server),
        )
    conns: list[Http] = []
    try:
        workers = [
            transfer_worker(server, Mix(campus, seed=o.seed, stream=i + 1), 1, conns)
            for i in range(o.terminals)
        ]
        return await closed_loop(
            f"terminals over HTTP c={o.terminals}", workers, duration=o.duration,
            warmup=o.warmup, bar=bar, batch_probe=probe(server), cpu=server_cpu(dsn, server),
        )
    finally:
        await close_all(conns)


async def _iso_phase(
    o: Options, bar: Bar, dsn: str, campus: Campus, server: Server, notes: list[str]
) -> Stats | None:
    """Every terminal sends 0200 purchases on its card; None (and a note) when the campus
    could not be set up over the API."""
    try:
        cards, terms = await _setup_cards(server, campus, terminals=o.terminals, seed=o.seed)
    except HttpError as e:
        notes.append(f"ISO 8583 phase skipped: campus setup failed ({e})")
        return None
    clients: list[TerminalClient] = []
    try:
        return await closed_loop(
            f"terminals over ISO 8583 c={o.terminals}",
            [iso_worker(server, cards[i % len(cards)], terms[i], o.seed + i, clients)
             for i in range(o.terminals)],
            duration=o.duration, warmup=o.warmup, bar=bar, batch_probe=probe(server),
            cpu=server_cpu(dsn, server),
        )
    finally:
        for cl in clients:
            await cl.close()


async def run(o: Options, bar: Bar) -> Result:
    """HTTP phase, then (when the gateway exists) the ISO 8583 phase."""
    m = await machine(o.dsn)
    cpu = CpuMeter()
    notes: list[str] = _notes(o)
    phases: list[Stats] = []
    iso_stats: Stats | None = None
    has_iso = _gateway_available()
    if not has_iso:
        notes.append("terminals.gateway or engine.http.campus_routes missing: "
                     "ISO 8583 phase skipped")
    async with campus_server(o, "terminals", iso=has_iso) as (dsn, campus, server):
        cpu.start()
        http_stats = await _http_phase(o, bar, dsn, campus, server)
        phases.append(http_stats)
        if has_iso:
            iso_stats = await _iso_phase(o, bar, dsn, campus, server, notes)
            if iso_stats is not None:
                phases.append(iso_stats)
        server_rss = rss_mb(server.pid)
    cpu.stop(m)
    return Result(
        workload="terminals",
        started_at=now_stamp(),
        seed=o.seed,
        config={"duration_s": o.duration, "terminals": o.terminals, "purses": o.purses,
                "http": "one transfer per POST, keep-alive connection per terminal",
                "http_client": o.client, "gateway_workers": o.gateway_workers,
                "iso": "0200 purchase per request, one card per terminal"},
        machine=m,
        transfers_per_s=http_stats.transfers_per_s,
        p50_ms=http_stats.p50_ms,
        p99_ms=http_stats.p99_ms,
        peak_rss_mb={"server": server_rss or children_peak_rss_mb(),
                     "load generator": peak_rss_mb()},
        phases=phases,
        targets=[
            target(f"{o.terminals} terminals over HTTP, transfers/s", f">= {TARGET_HTTP_TPS:,}",
                   http_stats.transfers_per_s, http_stats.transfers_per_s >= TARGET_HTTP_TPS),
            target(f"{o.terminals} terminals over ISO 8583, transfers/s",
                   f">= {TARGET_ISO_TPS:,}",
                   None if iso_stats is None else iso_stats.transfers_per_s,
                   None if iso_stats is None else iso_stats.transfers_per_s >= TARGET_ISO_TPS),
        ],
        notes=notes,
    )


def _notes(o: Options) -> list[str]:
    """What a reader must know about this run's shape."""
    notes = []
    if o.client == "wrk":
        notes.append("HTTP phase driven by wrk: meals only (the Python clients send the bench's "
                     "mix); its CPU is 'load generator (wrk)'")
    if o.gateway_workers > 1:
        notes.append(f"{o.gateway_workers} gateway processes: 'server (python)' CPU counts them "
                     "all; the mean batch is the first process's committer only")
    return notes

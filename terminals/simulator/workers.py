"""Worker processes: each drives a share of the terminals over its own connections and
reports what its answers moved; the parent adds it up. A load generator must not eat the CPU
of the gateway it measures."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import Final

import msgspec
from rich.console import Console

from engine import limits
from engine.campus import TerminalKind
from terminals.client import TerminalClient
from terminals.simulator.books import Books, Op, Stats
from terminals.simulator.driver import PROGRESS_INTERVAL_S, Driver, outage_cut
from terminals.simulator.options import Options
from terminals.simulator.report import progress_bar
from terminals.simulator.world import SimHolder, SimRoom, SimTerminal, World


class _ShardHolder(msgspec.Struct, frozen=True, array_like=True):
    index: int
    holder_id: str
    card: str
    purse: int
    subsidy: int
    pin: str | None
    limit: int | None
    lost: bool
    old_card: str | None


class _ShardTerminal(msgspec.Struct, frozen=True, array_like=True):
    index: int
    kind: TerminalKind
    terminal_id: str
    merchant_id: str
    account: int
    room: int | None  # a meter's room, as an index into the rooms


class _Shard(msgspec.Struct, frozen=True):
    """What a worker needs: the campus as the simulator built it, and its terminals."""

    options: Options
    host: str
    port: int
    ledger: int
    bank: int
    fund: int
    water: int
    power: int
    merchants: list[int]
    mac_key: bytes
    holders: list[_ShardHolder]
    rooms: list[SimRoom]
    terminals: list[_ShardTerminal]
    terminals_total: int
    cut: list[int]


class _ShardResult(msgspec.Struct, frozen=True):
    """A worker's answers: counts, latencies, problems, and the money they moved (changes to
    the holders' expected totals and to the other accounts' expected balances)."""

    codes: list[tuple[str, str, int]]
    latencies: list[float]
    problems: list[str]
    unresolved: int
    retransmit_mismatch: int
    unexpected: int
    holder_totals: dict[int, int]
    balances: dict[int, int]
    elapsed: float


def _shard(world: World, o: Options, host: str, port: int, share: list[SimTerminal],
           cut: set[int]) -> _Shard:
    rooms = {r.room_id: i for i, r in enumerate(world.rooms)}
    return _Shard(
        options=o, host=host, port=port, ledger=world.ledger, bank=world.bank,
        fund=world.fund, water=world.water, power=world.power, merchants=world.merchants,
        mac_key=world.mac_key,
        holders=[_ShardHolder(h.index, h.holder_id, h.card, h.purse, h.subsidy, h.pin, h.limit,
                              h.lost, h.old_card) for h in world.holders],
        rooms=world.rooms,
        terminals=[_ShardTerminal(t.index, t.kind, t.tid, t.client.merchant_id, t.account,
                                  None if t.room is None else rooms[t.room.room_id])
                   for t in share],
        terminals_total=len(world.terminals),
        cut=sorted(cut),
    )


async def _run_shard(shard: _Shard, progress: Callable[[int], None]) -> _ShardResult:
    """Drive ``shard``'s terminals (in the worker process); totals start at 0, so what the
    worker reports are changes."""
    o = shard.options
    holders = []
    for h in shard.holders:
        sh = SimHolder(h.index, h.holder_id, h.card, h.purse, h.subsidy)
        sh.pin, sh.limit, sh.lost, sh.old_card = h.pin, h.limit, h.lost, h.old_card
        holders.append(sh)
    terminals = []
    for t in shard.terminals:
        client = TerminalClient(shard.host, shard.port, terminal_id=t.terminal_id,
                                merchant_id=t.merchant_id, mac_key=shard.mac_key,
                                timeout_s=limits.SIMULATOR_CLIENT_TIMEOUT_S)
        st = SimTerminal(t.index, t.kind, client, t.account, o.seed * 1_000_003 + t.index)
        if t.room is not None:
            st.room = shard.rooms[t.room]
        terminals.append(st)
    world = World(shard.ledger, shard.bank, shard.fund, shard.water, shard.power,
                  shard.merchants, holders, shard.rooms, terminals, shard.mac_key)
    books = Books({shard.bank, shard.fund})
    stats = Stats()
    driver = Driver(world, books, stats, o, terminals_total=shard.terminals_total,
                    cut=set(shard.cut))
    elapsed = await driver.run(lambda: progress(stats.answered))
    return _ShardResult(
        codes=[(str(op), code, n) for (op, code), n in stats.codes.items()],
        latencies=stats.latencies,
        problems=stats.problems,
        unresolved=stats.unresolved,
        retransmit_mismatch=stats.retransmit_mismatch,
        unexpected=stats.unexpected,
        holder_totals={h.index: h.total for h in holders if h.total},
        balances={a: n for a, n in books.balance.items() if n},
        elapsed=elapsed,
    )


# A worker reads its _Shard (msgpack) from stdin and writes frames to stdout: one type byte,
# a 4-byte big-endian length, the body: progress (answers so far, 8 bytes), the result
# (msgpack _ShardResult) or an error (text). A plain subprocess, not multiprocessing: nothing
# of the parent (its __main__, its event loop, its pool) is re-imported or inherited.
_PROGRESS: Final = b"P"
_RESULT: Final = b"R"
_ERROR: Final = b"E"
_WORKER_CODE: Final = "from terminals.simulator.workers import worker_main; worker_main()"


def _frame(kind: bytes, body: bytes) -> bytes:
    return kind + len(body).to_bytes(4, "big") + body


def worker_main() -> None:
    """Entry point of a simulator worker process (see ``drive_workers``)."""
    import uvloop

    out = sys.stdout.buffer

    def send(kind: bytes, body: bytes) -> None:
        out.write(_frame(kind, body))
        out.flush()

    try:
        shard = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=_Shard)
        result = uvloop.run(_run_shard(shard, lambda n: send(_PROGRESS, n.to_bytes(8, "big"))))
    except BaseException as e:  # the parent reports it
        send(_ERROR, f"{type(e).__name__}: {e}".encode())
        raise SystemExit(1) from None
    send(_RESULT, msgspec.msgpack.encode(result))


class _Worker:
    """One worker process as the parent sees it."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.answered = 0

    async def result(self) -> _ShardResult:
        """Read progress frames until the result; RuntimeError if the worker failed."""
        assert self.proc.stdout is not None
        while True:
            try:
                head = await self.proc.stdout.readexactly(5)
                body = await self.proc.stdout.readexactly(int.from_bytes(head[1:], "big"))
            except asyncio.IncompleteReadError:
                code = await self.proc.wait()
                raise RuntimeError(f"simulator {self.name} died (exit code {code})") from None
            kind = head[:1]
            if kind == _PROGRESS:
                self.answered = int.from_bytes(body, "big")
                continue
            await self.proc.wait()
            if kind == _RESULT:
                return msgspec.msgpack.decode(body, type=_ShardResult)
            raise RuntimeError(f"simulator {self.name} failed: {body.decode(errors='replace')}")


async def _start_worker(name: str, shard: _Shard) -> _Worker:
    # the worker imports this package from wherever this process did
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WORKER_CODE,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
    )
    worker = _Worker(proc, name)
    assert proc.stdin is not None
    try:
        proc.stdin.write(msgspec.msgpack.encode(shard))
        await proc.stdin.drain()
        proc.stdin.close()
    except ConnectionError:  # it died at once; result() will say how
        pass
    return worker


async def drive_workers(world: World, books: Books, stats: Stats, o: Options, host: str,
                        port: int, console: Console) -> float:
    """Drive the terminals from ``o.workers`` processes, then fold their books into ours."""
    n = min(o.workers, len(world.terminals))
    cut = outage_cut(world.terminals, o.seed)
    workers: list[_Worker] = []
    try:
        for i in range(n):
            shard = _shard(world, o, host, port, world.terminals[i::n], cut)
            workers.append(await _start_worker(f"worker {i}", shard))
        progress = progress_bar(console, o)
        task = progress.add_task("rush", total=o.duration, info="")
        results = asyncio.gather(*(w.result() for w in workers))
        t0 = time.monotonic()
        with progress:
            while not results.done():
                el = time.monotonic() - t0
                answered = sum(w.answered for w in workers)
                progress.update(task, completed=min(el, o.duration),
                                info=f"{answered:,} answers  {answered / max(el, 1e-9):,.0f}/s")
                await asyncio.wait([results], timeout=PROGRESS_INTERVAL_S)
        shards = results.result()
    finally:
        for w in workers:
            if w.proc.returncode is None:  # failed or interrupted: nothing left to wait for
                w.proc.kill()
                await w.proc.wait()
    _fold(shards, world, books, stats)
    return max(r.elapsed for r in shards)


def _fold(shards: list[_ShardResult], world: World, books: Books, stats: Stats) -> None:
    """Add the workers' answers and the money they moved to ours."""
    by_index = {h.index: h for h in world.holders}
    for r in shards:
        for op, code, k in r.codes:
            stats.codes[(Op(op), code)] += k
        stats.latencies.extend(r.latencies)
        for p in r.problems:
            stats.problem(p)
        stats.unresolved += r.unresolved
        stats.retransmit_mismatch += r.retransmit_mismatch
        stats.unexpected += r.unexpected
        for i, d in r.holder_totals.items():
            by_index[i].total += d
        for a, d in r.balances.items():
            books.balance[a] += d

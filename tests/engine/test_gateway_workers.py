"""``onecard serve --gateway-workers 2`` over real TCP: two gateway processes on one port.

Which process serves a connection is read from the kernel, not from the server: the server's
end of a connection is the socket in /proc/net/tcp whose local port is the gateway's and whose
remote port is the client's, and its owner is the process holding that socket's inode among its
file descriptors. Connections are opened until each worker holds one, so every test below
really crosses processes.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import asyncpg
import httpx
import pytest

from engine import limits
from engine.cli.workers import (
    READY_LINE,
    GatewayWorkers,
    RestartBudget,
    WorkerSpec,
    workers_arg,
)
from terminals.client import TerminalClient
from terminals.iso8583 import decode_message, encode_message
from tests.faults.conftest import IsoTarget
from tests.faults.harness import (
    REPO_ROOT,
    Holder,
    Pos,
    check_books,
    open_campus,
    running_server,
    scratch_database,
    when,
)

WORKERS: Final = 2
LISTEN: Final = "0A"
ESTABLISHED: Final = "01"
MAX_CONNECTS: Final = 64  # the kernel spreads by a hash of the ports: 2 workers in far fewer
STANS_PER_CLIENT: Final = 1_000  # no test sends more through one client
_STANS: Final = itertools.count(1)  # each client of the module a range of STANs of its own
SQL_BALANCE: Final = """
SELECT credits_posted - debits_posted FROM accounts WHERE ledger = $1 AND id = $2
"""


# -- who serves a connection -------------------------------------------------------------------


def _tcp_sockets() -> list[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every IPv4 TCP socket in this namespace."""
    out = []
    with open("/proc/net/tcp", encoding="ascii") as f:
        next(f)
        for line in f:
            cols = line.split()
            local, remote, state, inode = cols[1], cols[2], cols[3], int(cols[9])
            out.append((int(local.split(":")[1], 16), int(remote.split(":")[1], 16), state, inode))
    return out


def _owner(inode: int, pids: list[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", encoding="ascii") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except OSError:
                continue
            if ppid == pid:
                out.append(int(d))
    return sorted(out)


def listeners(port: int, pids: list[int]) -> list[int | None]:
    """The owner of each socket listening on ``port``."""
    return sorted((_owner(inode, pids) for lp, _, st, inode in _tcp_sockets()
                   if lp == port and st == LISTEN), key=lambda p: p or 0)


def served_by(client: TerminalClient, port: int, pids: list[int]) -> int | None:
    """The process holding the server's end of ``client``'s connection."""
    writer = client._writer
    assert writer is not None, "not connected"
    mine = writer.get_extra_info("sockname")[1]
    for lp, rp, st, inode in _tcp_sockets():
        if lp == port and rp == mine and st == ESTABLISHED and inode:
            return _owner(inode, pids)
    return None


# -- a server with two gateway processes -------------------------------------------------------


class TwoWorkers(IsoTarget):
    """A live ``serve --gateway-workers 2`` and a campus in it."""

    @property
    def pids(self) -> list[int]:
        """serve itself and its worker process."""
        return [self.server.pid, *children(self.server.pid)]

    async def pinned(self, pos: Pos) -> list[TerminalClient]:
        """One connected client of ``pos`` per worker process, in the order of ``pids``."""
        pids = self.pids
        assert len(pids) == WORKERS, pids
        found: dict[int, TerminalClient] = {}
        spare: list[TerminalClient] = []
        for _ in range(MAX_CONNECTS):
            # Several clients of one terminal within a second: each takes STANs of its own,
            # as the one terminal would (a repeated STAN in the same second is the same
            # request, and a different body under it is a 94).
            c = TerminalClient("127.0.0.1", self.port, terminal_id=pos.terminal_id,
                               merchant_id=pos.merchant_id, mac_key=pos.key, timeout_s=10,
                               last_stan=next(_STANS) * STANS_PER_CLIENT)
            await c.connect()
            assert (await c.request(c.sign_on())).response_code == "00"  # accepted by now
            pid = served_by(c, self.port, pids)
            assert pid in pids, (pid, pids)
            if pid in found:
                spare.append(c)
            else:
                found[pid] = c
            if len(found) == WORKERS:
                break
        for c in spare:
            await c.close()
        assert len(found) == WORKERS, f"every connection went to {list(found)}"
        return [found[p] for p in pids]


@pytest.fixture(scope="module")
async def two(
    admin_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TwoWorkers]:
    """One two-worker server per module, with 4 terminals and 8 funded cards."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    async with (
        scratch_database(admin_dsn) as dsn,
        running_server(dsn, log, iso=True, args=["--gateway-workers", str(WORKERS)]) as server,
    ):
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as c:
            campus = await open_campus(c, ledger=9, terminals=4, holders=8)
        yield TwoWorkers(server, dsn, campus)


async def _balance(dsn: str, ledger: int, account: int) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        value: int = await conn.fetchval(SQL_BALANCE, ledger, account)
        return value
    finally:
        await conn.close()


async def _close(clients: list[TerminalClient]) -> None:
    for c in clients:
        await c.close()


def test_the_bound_lives_in_limits() -> None:
    assert workers_arg("1") == 1
    assert workers_arg(str(limits.GATEWAY_MAX_WORKERS)) == limits.GATEWAY_MAX_WORKERS
    for bad in ("0", str(limits.GATEWAY_MAX_WORKERS + 1), "-1", "two"):
        with pytest.raises(Exception, match="gateway workers"):
            workers_arg(bad)


async def test_both_processes_listen_on_the_one_port(two: TwoWorkers) -> None:
    pids = two.pids
    assert len(pids) == WORKERS, f"serve should have one worker child: {pids}"
    assert listeners(two.port, pids) == sorted(pids)


async def test_purchases_through_both_workers_keep_every_balance_exact(two: TwoWorkers) -> None:
    rng = random.Random(15)
    campus = two.campus
    spent: dict[str, int] = {}
    earned: dict[int, int] = {}

    async def till(pos: Pos) -> None:
        a, b = await two.pinned(pos)
        try:
            for i in range(30):
                holder = campus.poor if i % 10 == 9 else rng.choice(campus.holders)
                amount = rng.randint(1, 1500)
                msg = a.purchase(holder.card_no, amount)  # one STAN sequence per terminal
                answer = await (a if i % 2 == 0 else b).request(msg)
                if holder is campus.poor:
                    assert answer.response_code == "51", answer
                    continue
                assert answer.response_code == "00", answer
                spent[holder.holder_id] = spent.get(holder.holder_id, 0) + amount
                earned[pos.account] = earned.get(pos.account, 0) + amount
        finally:
            await _close([a, b])

    await asyncio.gather(*(till(pos) for pos in campus.terminals))
    problems, balances = await check_books(two.dsn, campus.ledger)
    assert problems == []
    for pos in campus.terminals:
        d, c = balances.get(pos.account, (0, 0))
        assert c - d == earned.get(pos.account, 0), pos.terminal_id
    for h in [*campus.holders, campus.poor]:
        left = sum(c - d for d, c in (balances[h.purse], balances.get(h.subsidy, (0, 0))))
        assert left == h.cash + h.subsidy_fen - spent.get(h.holder_id, 0), h.holder_id


async def _holder_money(dsn: str, ledger: int, h: Holder) -> int:
    return await _balance(dsn, ledger, h.purse) + await _balance(dsn, ledger, h.subsidy)


async def test_a_retransmission_to_the_other_worker_gets_the_same_bytes(two: TwoWorkers) -> None:
    pos, holder = two.campus.terminals[0], two.campus.holders[0]
    a, b = await two.pinned(pos)
    try:
        before = await _holder_money(two.dsn, two.campus.ledger, holder)
        # one after the other: the second worker finds the first one's stored answer
        first = encode_message(a.purchase(holder.card_no, 700), pos.key)
        one = await a.send_raw(first)
        assert one is not None
        assert decode_message(one).message.response_code == "00", decode_message(one).message
        assert await b.send_raw(first) == one
        # both at once: two executions, one posting, one stored answer sent by both
        second = encode_message(a.purchase(holder.card_no, 300), pos.key)
        x, y = await asyncio.gather(a.send_raw(second), b.send_raw(second))
        assert x is not None and x == y
        assert decode_message(x).message.response_code == "00"
        assert await a.send_raw(second) == x
        # a refusal is remembered as well
        third = encode_message(a.purchase(two.campus.poor.card_no, 500), pos.key)
        refused = await b.send_raw(third)
        assert refused is not None and decode_message(refused).message.response_code == "51"
        assert await a.send_raw(third) == refused
        assert await _holder_money(two.dsn, two.campus.ledger, holder) == before - 1000
    finally:
        await _close([a, b])


async def test_a_reversal_in_one_worker_takes_back_a_purchase_made_in_the_other(
    two: TwoWorkers,
) -> None:
    pos, holder = two.campus.terminals[1], two.campus.holders[1]
    a, b = await two.pinned(pos)
    try:
        before = await _holder_money(two.dsn, two.campus.ledger, holder)
        merchant = await _balance(two.dsn, two.campus.ledger, pos.account)
        purchase = a.purchase(holder.card_no, 1_234)
        assert (await a.request(purchase)).response_code == "00"
        assert await _holder_money(two.dsn, two.campus.ledger, holder) == before - 1_234
        reversal = encode_message(a.reversal(purchase), pos.key)
        answer = await b.send_raw(reversal)
        assert answer is not None and decode_message(answer).message.response_code == "00"
        assert await a.send_raw(reversal) == answer  # and its retransmission, in the first
        assert await _holder_money(two.dsn, two.campus.ledger, holder) == before
        assert await _balance(two.dsn, two.campus.ledger, pos.account) == merchant
        problems, _ = await check_books(two.dsn, two.campus.ledger)
        assert problems == []
    finally:
        await _close([a, b])


@pytest.mark.slow  # 5-20 s: a worker started, killed, restarted after a pause, all stopped
async def test_a_dead_worker_is_replaced_and_sigterm_stops_them_all(
    admin_dsn: str, tmp_path: Path
) -> None:
    async with (
        scratch_database(admin_dsn) as dsn,
        running_server(dsn, tmp_path / "serve.log", iso=True,
                       args=["--gateway-workers", str(WORKERS)]) as server,
    ):
        assert server.iso_port is not None
        port, first = server.iso_port, children(server.pid)
        assert len(first) == 1, first
        os.kill(first[0], signal.SIGKILL)

        def replaced() -> bool:  # a new worker, and both processes listening again
            now = children(server.pid)
            everyone = [server.pid, *now]
            fresh = len(now) == 1 and first[0] not in now
            return fresh and listeners(port, everyone) == sorted(everyone)

        await when(replaced, timeout_s=30, poll_s=0.1)
        assert f"gateway worker 1 (pid {first[0]}) died (exit -9)" in server.log_text()
        now = children(server.pid)
        server.send_signal(signal.SIGTERM)
        assert await server.wait_exit() == 0, server.log_tail()
        await when(lambda: not any(os.path.exists(f"/proc/{p}") for p in now), timeout_s=10)


# -- the supervisor and the worker process, alone ------------------------------------------------


class _Scripted(WorkerSpec, frozen=True, kw_only=True):
    """A stand-in worker: a Python one-liner instead of the gateway."""

    script: str

    def argv(self, index: int) -> list[str]:
        return [sys.executable, "-c", self.script]


def _scripted(script: str) -> _Scripted:
    return _Scripted(dsn="", host="127.0.0.1", port=0, data_dir=".", script=script)


def test_the_restart_budget_counts_deaths_within_its_window() -> None:
    budget = RestartBudget(restarts=2, window_s=10.0)
    assert budget.spend(0.0) and budget.spend(1.0)
    assert not budget.spend(2.0)  # a third death within 10 s
    assert budget.spend(11.5)  # the first two have left the window


async def test_a_worker_that_never_listens_fails_the_start() -> None:
    workers = GatewayWorkers(_scripted("raise SystemExit(3)"), 2, on_failure=lambda: None)
    with pytest.raises(RuntimeError, match=r"did not start \(exit 3\)"):
        await workers.start()
    assert all(p.returncode is not None for p in workers._procs.values())


async def test_a_crash_loop_gives_up_and_says_so() -> None:
    failed = asyncio.Event()
    ready_then_die = f"import os; os.write(1, {READY_LINE!r})"
    workers = GatewayWorkers(_scripted(ready_then_die), 1, on_failure=failed.set,
                             budget=RestartBudget(restarts=1, window_s=60.0))
    await workers.start()
    try:
        async with asyncio.timeout(30):
            await failed.wait()  # died, restarted once, died again: more than 1 in 60 s
        assert workers.failed
    finally:
        await workers.stop()


async def test_a_worker_stops_when_serve_is_gone(dsn: str, tmp_path: Path) -> None:
    spec = WorkerSpec(dsn=dsn, host="127.0.0.1", port=0, data_dir=str(tmp_path))
    proc = await asyncio.create_subprocess_exec(
        *spec.argv(1), cwd=REPO_ROOT, env={**spec.env(), "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            assert await proc.stdout.readline() == READY_LINE
        proc.stdin.close()  # what a serve killed outright leaves behind
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(("flags", "says"), [
    (["--no-iso", "--gateway-workers", "2"], "--gateway-workers needs the terminal gateway"),
    (["--gateway-workers", str(limits.GATEWAY_MAX_WORKERS + 1)], "gateway workers, got"),
])
async def test_serve_refuses_workers_it_cannot_run(
    flags: list[str], says: str, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", "serve", "--dsn", "postgresql://nobody@127.0.0.1:1/x",
        "--data-dir", str(tmp_path), *flags, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    assert proc.returncode == 2 and says in err.decode(), err.decode()

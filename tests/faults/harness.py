"""Shared machinery of the fault tests: scratch databases, the real server as a subprocess, a
workload of retrying clients, and the ledger checks that run after every injected fault.

The checks never trust the engine's own answers: they read the tables directly and recompute
every balance and the audit chain from the stored transfers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
import httpx
import uvicorn

from ledger import audit
from tests import databases

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
# Distinctive values so a test can prove they never reach a log.
ADMIN_TOKEN: Final = "faults-admin-9d41c7e2b86a"
READ_TOKEN: Final = "faults-read-3f60a1d5c47e"
ADMIN: Final = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
READ: Final = {"Authorization": f"Bearer {READ_TOKEN}"}

READY_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 20.0
FUND_FEN: Final = 1_000_000_000  # each purse's opening top-up: no meal of the workload can fail
OK: Final = frozenset({"created", "exists"})

SQL_TERMINATE = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type = 'client backend'
"""
SQL_TRANSFERS = """
SELECT id, debit_account_id, credit_account_id, amount, code, flags, user_data, pending_id
FROM transfers WHERE ledger = $1
"""
SQL_ACCOUNTS = """
SELECT id, debits_posted, credits_posted, debits_pending, credits_pending
FROM accounts WHERE ledger = $1
"""
SQL_DUPLICATE_IDS = (
    "SELECT count(*) FROM (SELECT id FROM transfers GROUP BY id HAVING count(*) > 1) d"
)
# The ids of ledger $1 that are stored in another ledger too.
SQL_DUPLICATE_IDS_OF_LEDGER = """
SELECT count(DISTINCT t.id) FROM transfers t
WHERE t.ledger = $1 AND EXISTS (SELECT 1 FROM transfers o WHERE o.id = t.id AND o.ledger <> $1)
"""
SQL_AUDIT_BATCHES = """
SELECT first_timestamp, last_timestamp, transfer_count, prev_head, head
FROM audit_batches WHERE ledger = $1 ORDER BY last_timestamp
"""
SQL_AUDIT_ROWS = """
SELECT id, ledger, debit_account_id, credit_account_id, amount, pending_id, code, flags,
       timeout_s, user_data, timestamp
FROM transfers WHERE ledger = $1 ORDER BY timestamp
"""
SQL_CHAIN_HEAD = "SELECT chain_head FROM ledgers WHERE ledger = $1"


# -- processes and databases ---------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def scratch_database(admin_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty database on the test server (the engine migrates it), dropped after."""
    async with databases.scratch_database(admin_dsn, prefix="onecard_faults") as url:
        yield url


async def terminate_backends(admin_dsn: str, database: str) -> int:
    """pg_terminate_backend every client connection to ``database``; returns how many."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        n: int = await conn.fetchval(SQL_TERMINATE, database)
        return n
    finally:
        await conn.close()


class ServerProcess:
    """``onecard serve`` as a real subprocess (the interpreter running the tests)."""

    def __init__(
        self,
        dsn: str,
        log_path: Path,
        *,
        iso: bool = False,
        env: dict[str, str] | None = None,
        verbose: bool = False,
        args: Sequence[str] = (),
    ) -> None:
        self.dsn = dsn
        self.log_path = log_path
        self.http_port = free_port()
        self.iso_port = None
        while iso and self.iso_port in (None, self.http_port):  # two calls may give one port
            self.iso_port = free_port()
        self.env = env or {}
        self.verbose = verbose
        self.args = list(args)  # more serve flags (--gateway-workers N)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        """Where the HTTP API answers."""
        return f"http://127.0.0.1:{self.http_port}"

    def argv(self) -> list[str]:
        """The command line that starts the server."""
        args = [sys.executable, "-m", "engine.cli", "serve", "--dsn", self.dsn]
        args += ["--http", f"127.0.0.1:{self.http_port}"]
        if self.iso_port is None:
            args.append("--no-iso")
        else:
            args += ["--iso", f"127.0.0.1:{self.iso_port}"]
        if self.verbose:
            args.append("-v")
        return [*args, *self.args]

    def start(self) -> None:
        """Launch (or relaunch, on the same ports) the server; returns at once."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {
            **os.environ,
            "ONECARD_ADMIN_TOKEN": ADMIN_TOKEN,
            "ONECARD_READ_TOKEN": READ_TOKEN,
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None
        return self.proc.pid

    async def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Wait until /healthz answers 200; returns the seconds it took."""
        t0 = time.monotonic()
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2.0) as c:
            while True:
                if not self.running:
                    raise AssertionError(f"server exited early:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await c.get("/healthz")).status_code == 200:
                        break
                if time.monotonic() - t0 > timeout_s:
                    raise AssertionError(f"server not ready in {timeout_s}s:\n{self.log_tail()}")
                await asyncio.sleep(0.05)
        if self.iso_port is not None:
            await _wait_port(self.iso_port, t0 + timeout_s)
        return time.monotonic() - t0

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal the server process (only ours, by pid)."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait for the process to end; returns its exit code (negative: killed by a signal)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"server still running after {timeout_s}s")
            await asyncio.sleep(0.02)
        return code

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers. Safe to call when already stopped."""
        if not self.running:
            return
        self.send_signal(signal.SIGTERM)
        try:
            await self.wait_exit()
        except AssertionError:
            self.send_signal(signal.SIGKILL)
            await self.wait_exit()

    def log_text(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        """The end of the log, for failure messages."""
        return "\n".join(self.log_text().splitlines()[-lines:])


async def _wait_port(port: int, deadline: float) -> None:
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on {port}") from None
            await asyncio.sleep(0.05)
            continue
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()
        return


@contextlib.asynccontextmanager
async def running_server(
    dsn: str,
    log_path: Path,
    *,
    iso: bool = False,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
) -> AsyncIterator[ServerProcess]:
    """A started, ready server that is stopped (and, if need be, killed) afterwards."""
    server = ServerProcess(dsn, log_path, iso=iso, env=env, args=args)
    server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def serve_app(app: Any, **config: Any) -> AsyncIterator[str]:
    """Serve an ASGI app in this process with uvicorn on a free port; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            loop="none",
            lifespan="off",
            log_level="warning",
            **config,
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


# -- the workload --------------------------------------------------------------------------------


@dataclass
class Book:
    """The accounts of one workload ledger."""

    ledger: int
    bank: int
    purses: list[int]
    merchants: list[int]
    empty: int  # a no-overdraft purse that is never funded: spending from it always fails
    setup: list[dict[str, Any]] = field(default_factory=list)  # acknowledged opening top-ups

    def accounts(self) -> list[dict[str, Any]]:
        """The account bodies to create."""
        no_overdraft = ["debits_must_not_exceed_credits"]
        out: list[dict[str, Any]] = [
            {"id": self.bank, "ledger": self.ledger, "kind": "clearing", "code": 1}
        ]
        out += [
            {"id": p, "ledger": self.ledger, "kind": "purse", "code": 1, "flags": no_overdraft}
            for p in [*self.purses, self.empty]
        ]
        out += [
            {"id": m, "ledger": self.ledger, "kind": "merchant", "code": 1} for m in self.merchants
        ]
        return out


def new_book(ledger: int, first_id: int, *, purses: int = 64, merchants: int = 8) -> Book:
    """Account ids for a ledger: ``first_id`` upwards."""
    ids = list(range(first_id, first_id + 2 + purses + merchants))
    return Book(
        ledger=ledger,
        bank=ids[0],
        empty=ids[1],
        purses=ids[2 : 2 + purses],
        merchants=ids[2 + purses :],
    )


async def open_book(client: httpx.AsyncClient, book: Book) -> None:
    """Create the accounts and fund every purse (acknowledged before any fault)."""
    r = await client.post("/v1/accounts", json=book.accounts(), headers=ADMIN)
    assert r.status_code == 200, r.text
    assert {x["status"] for x in r.json()} == {"created"}, r.text
    book.setup = [
        {
            "id": str(uuid.uuid4()),
            "ledger": book.ledger,
            "debit_account_id": book.bank,
            "credit_account_id": p,
            "amount": FUND_FEN,
            "code": 4,
            "user_data": f"fund-{p}",
        }
        for p in book.purses
    ]
    r = await client.post("/v1/transfers", json=book.setup, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert {x["status"] for x in r.json()} == {"created"}, r.text


@dataclass
class Planned:
    """One request of the workload and what each of its transfers must answer."""

    body: list[dict[str, Any]]
    ok: list[bool]  # True: must be stored once acknowledged; False: must never be stored
    fail_status: list[str | None]  # the exact refusal a False transfer answers
    chains: list[list[int]]  # positions of linked chains (all or nothing)
    resend: bool = False  # send once more after the acknowledgement (must answer `exists`)

    @property
    def ids(self) -> list[str]:
        """The transfer ids, in request order."""
        return [t["id"] for t in self.body]


def plan_requests(book: Book, rng: random.Random, n_transfers: int) -> list[Planned]:
    """Requests of 1..16 transfers totalling ``n_transfers``: meals, top-ups, linked splits that
    succeed, linked chains doomed by their second leg, and overdrafts that always fail."""
    out: list[Planned] = []
    left = n_transfers
    led = book.ledger
    while left > 0:
        size = min(left, rng.randint(1, 16))
        p = Planned(body=[], ok=[], fail_status=[], chains=[], resend=rng.random() < 0.05)
        while len(p.body) < size:
            room = size - len(p.body)
            roll = rng.random()
            purse = rng.choice(book.purses)
            merchant = rng.choice(book.merchants)
            amount = rng.randint(1, 2000)
            base = {"ledger": led, "amount": amount}
            if roll < 0.10 and room >= 2:
                other = rng.choice(book.purses)
                start = len(p.body)
                p.body += [
                    {
                        **base,
                        "id": _tid(),
                        "debit_account_id": purse,
                        "credit_account_id": merchant,
                        "code": 1,
                        "flags": ["linked"],
                    },
                    {
                        **base,
                        "id": _tid(),
                        "debit_account_id": other,
                        "credit_account_id": merchant,
                        "code": 1,
                        "amount": rng.randint(1, 500),
                    },
                ]
                p.ok += [True, True]
                p.fail_status += [None, None]
                p.chains.append([start, start + 1])
            elif roll < 0.15 and room >= 2:
                start = len(p.body)
                p.body += [
                    {
                        **base,
                        "id": _tid(),
                        "debit_account_id": purse,
                        "credit_account_id": merchant,
                        "code": 1,
                        "flags": ["linked"],
                    },
                    {
                        **base,
                        "id": _tid(),
                        "debit_account_id": purse,
                        "credit_account_id": purse,
                        "code": 1,
                    },
                ]
                p.ok += [False, False]
                p.fail_status += ["linked_event_failed", "accounts_must_be_different"]
                p.chains.append([start, start + 1])
            elif roll < 0.20:
                p.body.append(
                    {
                        **base,
                        "id": _tid(),
                        "debit_account_id": book.empty,
                        "credit_account_id": merchant,
                        "code": 1,
                    }
                )
                p.ok.append(False)
                p.fail_status.append("exceeds_credits")
            elif roll < 0.30:
                p.body.append(
                    {
                        **base,
                        "id": _tid(),
                        "debit_account_id": book.bank,
                        "credit_account_id": purse,
                        "code": 4,
                        "user_data": f"wx-{uuid.uuid4().hex[:12]}",
                    }
                )
                p.ok.append(True)
                p.fail_status.append(None)
            else:
                p.body.append(
                    {
                        **base,
                        "id": _tid(),
                        "debit_account_id": purse,
                        "credit_account_id": merchant,
                        "code": 1,
                    }
                )
                p.ok.append(True)
                p.fail_status.append(None)
        left -= len(p.body)
        out.append(p)
    return out


def merge_plans(plans: Sequence[Planned]) -> Planned:
    """One request holding all of ``plans`` (chains keep their positions, shifted)."""
    out = Planned(body=[], ok=[], fail_status=[], chains=[])
    for p in plans:
        shift = len(out.body)
        out.body += p.body
        out.ok += p.ok
        out.fail_status += p.fail_status
        out.chains += [[i + shift for i in c] for c in p.chains]
    return out


def _tid() -> str:
    return str(uuid.uuid4())


@dataclass
class DriveStats:
    """What the clients saw."""

    requests_sent: int = 0  # HTTP attempts, retries included
    retries: int = 0
    transport_errors: int = 0
    unavailable: int = 0  # 503 answers
    acked_transfers: int = 0
    resends: int = 0
    doubled: list[str] = field(default_factory=list)  # `created` answered twice for one id
    wrong: list[str] = field(default_factory=list)  # an answer the plan does not allow
    max_latency_s: float = 0.0


class Driver:
    """``clients`` concurrent HTTP clients, each posting its own requests in order and
    retrying every unacknowledged one, with the same ids, until it is answered."""

    def __init__(
        self,
        base_url: str,
        plans: Sequence[Sequence[Planned]],
        *,
        deadline_s: float,
        request_timeout_s: float = 10.0,
    ) -> None:
        self.base_url = base_url
        self.plans = plans
        self.deadline = time.monotonic() + deadline_s
        self.request_timeout_s = request_timeout_s
        self.stats = DriveStats()
        self.answers: dict[str, str] = {}  # final status per transfer id
        self.in_flight: dict[int, Planned] = {}  # id(plan) -> plan, sent and not yet answered
        self.total = sum(len(p.body) for ps in plans for p in ps)

    async def run(self) -> None:
        """Drive every client to the end of its plan."""
        await asyncio.gather(*(self._client(ps) for ps in self.plans))

    async def _client(self, plans: Sequence[Planned]) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        timeout = httpx.Timeout(self.request_timeout_s, connect=2.0)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits) as c:
            for p in plans:
                answers = await self._until_acked(c, p)
                self._judge(p, answers, resend=False)
                self.stats.acked_transfers += len(p.body)
                if p.resend:
                    self.stats.resends += 1
                    self._judge(p, await self._until_acked(c, p), resend=True)

    async def _until_acked(self, c: httpx.AsyncClient, p: Planned) -> list[str]:
        delay = 0.02
        first = True
        while True:
            if time.monotonic() > self.deadline:
                raise AssertionError(f"a request was never acknowledged: {p.ids[:3]}...")
            if not first:
                self.stats.retries += 1
            first = False
            self.stats.requests_sent += 1
            self.in_flight[id(p)] = p
            t0 = time.monotonic()
            try:
                r = await c.post("/v1/transfers", json=p.body, headers=ADMIN)
            except httpx.TransportError:
                self.stats.transport_errors += 1
            else:
                self.stats.max_latency_s = max(self.stats.max_latency_s, time.monotonic() - t0)
                if r.status_code == 200:
                    self.in_flight.pop(id(p), None)
                    out = [x["status"] for x in r.json()]
                    assert [x["id"] for x in r.json()] == p.ids, "answers out of request order"
                    return out
                if r.status_code != 503:
                    raise AssertionError(f"unexpected HTTP {r.status_code}: {r.text[:500]}")
                self.stats.unavailable += 1
                assert r.headers.get("retry-after"), "503 without Retry-After"
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _judge(self, p: Planned, statuses: list[str], *, resend: bool) -> None:
        for tid, ok, fail, st in zip(p.ids, p.ok, p.fail_status, statuses, strict=True):
            if ok and st not in OK:
                self.stats.wrong.append(f"{tid}: {st}")
            if not ok and st != fail:
                self.stats.wrong.append(f"{tid}: {st} (expected {fail})")
            if resend and st == "created":
                self.stats.doubled.append(tid)
            if not resend:
                self.answers[tid] = st


def split_plans(plans: list[Planned], clients: int) -> list[list[Planned]]:
    """Deal requests round-robin to ``clients`` clients."""
    return [plans[i::clients] for i in range(clients)]


async def when(predicate: Callable[[], bool], *, timeout_s: float, poll_s: float = 0.01) -> None:
    """Wait until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(poll_s)


# -- checking the ledger after faults ------------------------------------------------------------


@dataclass
class LedgerReport:
    """What the tables say, recomputed independently of the engine."""

    stored: int = 0
    lost: list[str] = field(default_factory=list)  # acknowledged ok, not stored
    phantom: list[str] = field(default_factory=list)  # stored but refused, or never planned
    altered: list[str] = field(default_factory=list)  # stored with fields other than sent
    half_chains: list[list[str]] = field(default_factory=list)  # linked chains partly stored
    duplicate_ids: int = 0  # transfer ids stored more than once (any ledger)
    balance_errors: list[str] = field(default_factory=list)
    audit_errors: list[str] = field(default_factory=list)
    unacked: int = 0

    def problems(self) -> list[str]:
        """Every violation, one line each (empty when the ledger is exact)."""
        out = [f"lost {t}" for t in self.lost[:5]] + [f"phantom {t}" for t in self.phantom[:5]]
        out += [f"altered {t}" for t in self.altered[:5]]
        out += [f"half chain {c}" for c in self.half_chains[:5]]
        out += self.balance_errors[:5] + self.audit_errors[:5]
        if self.duplicate_ids:
            out.append(f"{self.duplicate_ids} duplicate transfer ids")
        return out


def _same(stored: asyncpg.Record, sent: dict[str, Any]) -> bool:
    flags = 1 if "linked" in sent.get("flags", ()) else 0
    return bool(
        stored["debit_account_id"] == sent["debit_account_id"]
        and stored["credit_account_id"] == sent["credit_account_id"]
        and stored["amount"] == sent["amount"]
        and stored["code"] == sent["code"]
        and stored["flags"] == flags
        and stored["user_data"] == sent.get("user_data")
        and stored["pending_id"] is None
    )


async def check_ledger(
    dsn: str,
    book: Book,
    plans: Sequence[Planned],
    answers: dict[str, str],
    *,
    final: bool,
) -> LedgerReport:
    """Compare the stored ledger with what was sent and acknowledged.

    Always: every acknowledged-ok transfer is stored with exactly the fields sent; no refused
    or unplanned transfer is stored; linked chains are all or nothing; every account's four
    fields equal the sums of its stored transfers; debits equal credits; the audit chain
    recomputes. With ``final`` (every request acknowledged) the balances must also equal the
    ones computed from the plan alone.
    """
    rep = LedgerReport()
    conn = await asyncpg.connect(dsn)
    try:
        rows = {str(r["id"]): r for r in await conn.fetch(SQL_TRANSFERS, book.ledger)}
        accounts = {r["id"]: r for r in await conn.fetch(SQL_ACCOUNTS, book.ledger)}
        rep.duplicate_ids = await conn.fetchval(SQL_DUPLICATE_IDS)
        await _check_audit(conn, book.ledger, rep)
    finally:
        await conn.close()
    rep.stored = len(rows)

    sent: dict[str, dict[str, Any]] = {t["id"]: t for t in book.setup}
    must: dict[str, bool] = dict.fromkeys(sent, True)
    for p in plans:
        for t, ok in zip(p.body, p.ok, strict=True):
            sent[t["id"]] = t
            must[t["id"]] = ok
        for chain in p.chains:
            there = [p.ids[i] in rows for i in chain]
            if any(there) and not all(there):
                rep.half_chains.append([p.ids[i] for i in chain])
    for tid, r in rows.items():
        if tid not in sent or not must[tid]:
            rep.phantom.append(tid)
        elif not _same(r, sent[tid]):
            rep.altered.append(tid)
    for t in book.setup:
        if t["id"] not in rows:
            rep.lost.append(t["id"])
    for tid, st in answers.items():
        if st in OK and tid not in rows:
            rep.lost.append(tid)
    rep.unacked = sum(1 for tid in must if tid not in answers) - len(book.setup)

    # Balances from the stored rows, then (final) from the plan alone.
    from_rows = _sums(
        (r["debit_account_id"], r["credit_account_id"], r["amount"]) for r in rows.values()
    )
    d_total = sum(a["debits_posted"] for a in accounts.values())
    c_total = sum(a["credits_posted"] for a in accounts.values())
    if d_total != c_total:
        rep.balance_errors.append(f"debits {d_total} != credits {c_total}")
    for aid, a in accounts.items():
        dp, cp = from_rows.get(aid, (0, 0))
        got = (a["debits_posted"], a["credits_posted"], a["debits_pending"], a["credits_pending"])
        if got != (dp, cp, 0, 0):
            rep.balance_errors.append(
                f"account {aid}: stored {got}, transfers say {(dp, cp, 0, 0)}"
            )
    if final:
        planned = _sums(
            (t["debit_account_id"], t["credit_account_id"], t["amount"])
            for tid, t in sent.items()
            if must[tid]
        )
        for aid, a in accounts.items():
            want = planned.get(aid, (0, 0))
            if (a["debits_posted"], a["credits_posted"]) != want:
                rep.balance_errors.append(
                    f"account {aid}: {(a['debits_posted'], a['credits_posted'])} != plan {want}"
                )
    return rep


def _sums(moves: Any) -> dict[int, tuple[int, int]]:
    acc: dict[int, list[int]] = {}
    for debit, credit, amount in moves:
        acc.setdefault(debit, [0, 0])[0] += amount
        acc.setdefault(credit, [0, 0])[1] += amount
    return {k: (v[0], v[1]) for k, v in acc.items()}


async def _check_audit(conn: asyncpg.Connection, ledger: int, rep: LedgerReport) -> None:
    """Recompute the ledger's hash chain from the stored transfers, batch by batch."""
    batches = await conn.fetch(SQL_AUDIT_BATCHES, ledger)
    rows = await conn.fetch(SQL_AUDIT_ROWS, ledger)
    head = audit.GENESIS
    i = 0
    for b in batches:
        chunk: list[audit.Row] = []
        while i < len(rows) and rows[i]["timestamp"] <= b["last_timestamp"]:
            r = rows[i]
            if r["timestamp"] < b["first_timestamp"]:
                rep.audit_errors.append(f"transfer {r['id']} outside every audited batch")
            chunk.append(tuple(r.values()))  # type: ignore[arg-type]
            i += 1
        if b["prev_head"] != head:
            rep.audit_errors.append(f"batch {b['last_timestamp']}: chain broken")
        if len(chunk) != b["transfer_count"]:
            rep.audit_errors.append(
                f"batch {b['last_timestamp']}: {len(chunk)} rows, {b['transfer_count']} audited"
            )
        head = audit.extend(head, chunk)
        if head != b["head"]:
            rep.audit_errors.append(f"batch {b['last_timestamp']}: digest differs")
            head = b["head"]
    if i != len(rows):
        rep.audit_errors.append(f"{len(rows) - i} transfers after the last audited batch")
    stored_head = await conn.fetchval(SQL_CHAIN_HEAD, ledger)
    if batches and stored_head != head:
        rep.audit_errors.append("ledger chain head differs from the last batch")


# -- the campus and its terminals ----------------------------------------------------------------

CARD_CASH_FEN: Final = 100_000_000  # each holder's cash purse at the start
CARD_SUBSIDY_FEN: Final = 3_000  # each holder's subsidy purse: spent first, then meals split


@dataclass
class Pos:
    """A registered POS terminal and the merchant account it credits."""

    terminal_id: str
    merchant_id: str
    key: bytes
    account: int


@dataclass
class Holder:
    """A student with an active card."""

    holder_id: str
    card_no: str
    purse: int
    subsidy: int
    cash: int
    subsidy_fen: int


@dataclass
class Campus:
    """A ledger with holders, cards and POS terminals, set up over the HTTP API."""

    ledger: int
    bank: int
    fund: int
    terminals: list[Pos]
    holders: list[Holder]
    poor: Holder  # no money at all: every purchase is 51


async def _post_ok(client: httpx.AsyncClient, path: str, body: Any) -> Any:
    r = await client.post(path, json=body, headers=ADMIN)
    assert r.status_code == 200, (path, r.text)
    return r.json()


async def open_campus(
    client: httpx.AsyncClient, ledger: int, *, terminals: int = 16, holders: int = 64
) -> Campus:
    """Accounts, holders, cards, funded purses and terminals in ``ledger`` (ids from 1)."""
    bank, fund = 1, 2
    merchants = list(range(10, 10 + terminals))
    accounts = [
        {"id": bank, "ledger": ledger, "kind": "clearing", "code": 1},
        {"id": fund, "ledger": ledger, "kind": "fund", "code": 1},
    ]
    accounts += [{"id": m, "ledger": ledger, "kind": "merchant", "code": 1} for m in merchants]
    assert {x["status"] for x in await _post_ok(client, "/v1/accounts", accounts)} == {"created"}
    people: list[Holder] = []
    for i in range(holders + 1):
        hid = f"S{ledger:04d}{i:05d}"
        h = await _post_ok(
            client, "/v1/holders", {"id": hid, "ledger": ledger, "name": hid, "kind": "student"}
        )
        card = f"88{ledger:04d}{i:010d}"
        c = await _post_ok(
            client, "/v1/cards", {"card_no": card, "holder_id": hid, "ledger": ledger}
        )
        assert c["status"] == "active", c
        rich = i < holders
        people.append(
            Holder(
                hid,
                card,
                h["purse_account_id"],
                h["subsidy_account_id"],
                CARD_CASH_FEN if rich else 0,
                CARD_SUBSIDY_FEN if rich else 0,
            )
        )
    funding = [
        {
            "id": _tid(),
            "ledger": ledger,
            "debit_account_id": src,
            "credit_account_id": dst,
            "amount": amount,
            "code": code,
        }
        for p in people
        for src, dst, amount, code in (
            (bank, p.purse, p.cash, 4),
            (fund, p.subsidy, p.subsidy_fen, 5),
        )
        if amount
    ]
    assert {x["status"] for x in await _post_ok(client, "/v1/transfers", funding)} == {"created"}
    poses: list[Pos] = []
    for i, m in enumerate(merchants):
        pos = Pos(f"P{ledger:03d}{i:04d}", f"M{ledger:06d}{i:08d}", os.urandom(32), m)
        t = await _post_ok(
            client,
            "/v1/terminals",
            {
                "terminal_id": pos.terminal_id,
                "merchant_id": pos.merchant_id,
                "ledger": ledger,
                "kind": "pos",
                "account_id": m,
                "mac_key": pos.key.hex(),
            },
        )
        assert t["status"] == "created", t
        poses.append(pos)
    return Campus(ledger, bank, fund, poses, people[:holders], people[holders])


@dataclass
class Tx:
    """One purchase a terminal makes, and what happens around it."""

    holder: Holder
    amount: int
    reverse: str = ""  # "after": reversed once approved; "first": the reversal arrives first
    resend: bool = False  # sent again after its answer: the answer must be identical


@dataclass
class TxResult:
    """What a terminal saw for one purchase."""

    tx: Tx
    terminal: Pos
    request: Any  # the purchase Message
    answer: Any  # its answer Message
    reversed_ok: bool = False


def plan_purchases(campus: Campus, rng: random.Random, per_terminal: int) -> list[list[Tx]]:
    """For each terminal: meals from random holders (some split between subsidy and cash, 5%
    from the penniless holder), 8% reversed after approval, 3% reversed before the original
    arrives, 5% retransmitted once more after their answer."""
    out = []
    for _ in campus.terminals:
        txs = []
        for _ in range(per_terminal):
            roll = rng.random()
            holder = campus.poor if roll < 0.05 else rng.choice(campus.holders)
            reverse = "after" if 0.05 <= roll < 0.13 else "first" if 0.13 <= roll < 0.16 else ""
            txs.append(Tx(holder, rng.randint(1, 1500), reverse, rng.random() < 0.05))
        out.append(txs)
    return out


@dataclass
class TerminalStats:
    """What the terminals saw."""

    requests: int = 0
    retransmissions: int = 0  # the same message sent again after a timeout or a lost line
    system_errors: int = 0  # 96 answers (a plain one retried, a stored one final)
    given_up: int = 0  # purchases answered with a stored 96, then paid under a new STAN
    answered: int = 0
    unanswered: int = 0  # sent, line lost, not retried (retry=False)
    different_resend: list[str] = field(
        default_factory=list
    )  # a retransmission answered differently
    wrong: list[str] = field(default_factory=list)  # an answer the plan does not allow


class LineDown(Exception):
    """A terminal that does not retry lost its line."""


class TerminalDriver:
    """One TerminalClient per POS, each working through its purchases in order and
    retransmitting every unanswered message (same STAN and field 7) until it is answered.

    A 96 means that the request moved no money, ever (contract §5 v4). A plain 96 (no RRN:
    nothing stored, an overload) is retransmitted; a stored one (with an RRN: the gateway gave
    the request up) is that message's final answer, and the till starts the purchase over with
    a new STAN, as a cashier would."""

    def __init__(
        self,
        port: int,
        campus: Campus,
        plans: list[list[Tx]],
        *,
        deadline_s: float,
        retry: bool = True,
    ) -> None:
        self.port = port
        self.retry = retry  # False: a terminal whose line fails stops (the server is going away)
        self.campus = campus
        self.plans = plans
        self.deadline = time.monotonic() + deadline_s
        self.stats = TerminalStats()
        self.results: list[TxResult] = []
        self.in_flight = 0
        self.total = sum(len(p) for p in plans)
        self.done = 0
        self._connected: set[int] = set()

    async def run(self) -> None:
        """Drive every terminal to the end of its plan."""
        await asyncio.gather(
            *(
                self._terminal(pos, txs)
                for pos, txs in zip(self.campus.terminals, self.plans, strict=True)
            )
        )

    def client(self, pos: Pos) -> Any:
        """A terminal client for ``pos``."""
        from terminals.client import TerminalClient

        return TerminalClient(
            "127.0.0.1",
            self.port,
            terminal_id=pos.terminal_id,
            merchant_id=pos.merchant_id,
            mac_key=pos.key,
            timeout_s=5,
        )

    async def _terminal(self, pos: Pos, txs: list[Tx]) -> None:
        client = self.client(pos)
        try:
            for tx in txs:
                await self._one(client, pos, tx)
                self.done += 1
        except LineDown:
            pass
        finally:
            await client.close()

    async def _one(self, client: Any, pos: Pos, tx: Tx) -> None:
        msg = client.purchase(tx.holder.card_no, tx.amount)
        res = TxResult(tx, pos, msg, None)
        expect = {"51" if tx.holder is self.campus.poor and tx.reverse != "first" else "00"}
        if tx.reverse == "first":
            rev = await self.exchange(client, client.reversal(msg))
            res.reversed_ok = rev.response_code == "00"
            expect.add("96")  # given up: it moves nothing, as the reversal asked
            res.answer = await self.exchange(client, msg)
        else:
            msg, res.answer = await self._paid(client, tx, msg)
            res.request = msg
        if res.answer.response_code not in expect:
            self.stats.wrong.append(f"{pos.terminal_id} {msg.stan}: {res.answer.response_code}")
        if tx.resend:
            again = await self.exchange(client, msg)
            if again != res.answer:
                self.stats.different_resend.append(f"{pos.terminal_id} {msg.stan}")
        if tx.reverse == "after":
            rev = await self.exchange(client, client.reversal(msg))
            res.reversed_ok = rev.response_code == "00"
        if tx.reverse and not res.reversed_ok:
            self.stats.wrong.append(f"{pos.terminal_id} {msg.stan}: reversal refused")
        self.results.append(res)

    async def _paid(self, client: Any, tx: Tx, msg: Any) -> tuple[Any, Any]:
        """The purchase ``msg`` of ``tx`` and its answer, started over under a new STAN after
        each stored 96 until it is decided (a given-up message that ``tx`` retransmits gets
        its 96 again, identical); returns the last message and its answer."""
        while True:
            answer = await self.exchange(client, msg)
            if answer.response_code != "96":
                return msg, answer
            self.stats.given_up += 1
            if tx.resend and await self.exchange(client, msg) != answer:
                self.stats.different_resend.append(f"{msg.terminal_id} {msg.stan} (96)")
            msg = client.purchase(tx.holder.card_no, tx.amount)

    async def exchange(self, client: Any, msg: Any) -> Any:
        """Send ``msg`` until a final answer arrives (anything but a plain 96: a stored one,
        with its RRN, is final); reconnects as needed."""
        from terminals.client import ClientError

        delay = 0.02
        first = True
        while True:
            if time.monotonic() > self.deadline:
                raise AssertionError(f"{msg.terminal_id} STAN {msg.stan} never answered")
            if not first:
                self.stats.retransmissions += 1
            first = False
            self.stats.requests += 1
            self.in_flight += 1
            try:
                if id(client) not in self._connected:
                    await client.connect()
                    self._connected.add(id(client))
                answer = await client.request(msg)
            except (ClientError, OSError) as e:
                self._connected.discard(id(client))
                await client.close()
                if not self.retry:
                    self.stats.unanswered += 1
                    raise LineDown(str(e)) from None
            else:
                if answer.response_code == "96":
                    self.stats.system_errors += 1
                if answer.response_code != "96" or answer.rrn is not None:
                    self.stats.answered += 1
                    return answer
            finally:
                self.in_flight -= 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    def expected_net(self) -> tuple[dict[int, int], dict[str, int]]:
        """Money each merchant account gained and each holder spent, from the answers."""
        merchants: dict[int, int] = {}
        spent: dict[str, int] = {}
        for r in self.results:
            moved = r.answer.response_code == "00" and not r.tx.reverse
            if moved:
                merchants[r.terminal.account] = merchants.get(r.terminal.account, 0) + r.tx.amount
                spent[r.tx.holder.holder_id] = spent.get(r.tx.holder.holder_id, 0) + r.tx.amount
        return merchants, spent


SQL_LEDGER_TRANSFERS = """
SELECT debit_account_id, credit_account_id, amount, flags FROM transfers WHERE ledger = $1
"""
SQL_BALANCES = """
SELECT id, debits_posted, credits_posted, debits_pending, credits_pending
FROM accounts WHERE ledger = $1
"""


async def check_books(
    dsn: str, ledger: int, *, shared: bool = False
) -> tuple[list[str], dict[int, tuple[int, int]]]:
    """Problems with the ledger as stored (every account equal to the sums of its transfers,
    nothing pending, debits equal to credits, no transfer id stored twice, the audit chain
    intact), and each account's (debits_posted, credits_posted).

    ``shared``: the database is the test session's, where other tests may store one id in
    several ledgers: only this ledger's ids are checked (none stored in another ledger)."""
    rep = LedgerReport()
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(SQL_LEDGER_TRANSFERS, ledger)
        accounts = {r["id"]: r for r in await conn.fetch(SQL_BALANCES, ledger)}
        if shared:
            rep.duplicate_ids = await conn.fetchval(SQL_DUPLICATE_IDS_OF_LEDGER, ledger)
        else:
            rep.duplicate_ids = await conn.fetchval(SQL_DUPLICATE_IDS)
        await _check_audit(conn, ledger, rep)
    finally:
        await conn.close()
    sums = _sums((r["debit_account_id"], r["credit_account_id"], r["amount"]) for r in rows)
    for aid, a in accounts.items():
        got = (a["debits_posted"], a["credits_posted"], a["debits_pending"], a["credits_pending"])
        want = (*sums.get(aid, (0, 0)), 0, 0)
        if got != want:
            rep.balance_errors.append(f"account {aid}: stored {got}, transfers say {want}")
    if sum(a["debits_posted"] for a in accounts.values()) != sum(
        a["credits_posted"] for a in accounts.values()
    ):
        rep.balance_errors.append("debits != credits")
    return rep.problems(), {
        aid: (a["debits_posted"], a["credits_posted"]) for aid, a in accounts.items()
    }


def campus_problems(
    campus: Campus, driver: TerminalDriver, balances: dict[int, tuple[int, int]]
) -> list[str]:
    """Every merchant and holder balance against what the terminals were told."""
    merchants, spent = driver.expected_net()
    out = []
    for pos in campus.terminals:
        d, c = balances.get(pos.account, (0, 0))
        if c - d != merchants.get(pos.account, 0):
            out.append(f"merchant {pos.account}: {c - d} != {merchants.get(pos.account, 0)}")
    for h in [*campus.holders, campus.poor]:
        pd, pc = balances.get(h.purse, (0, 0))
        sd, sc = balances.get(h.subsidy, (0, 0))
        left = (pc - pd) + (sc - sd)
        want = h.cash + h.subsidy_fen - spent.get(h.holder_id, 0)
        if left != want:
            out.append(f"holder {h.holder_id}: {left} left, {want} expected")
    return out

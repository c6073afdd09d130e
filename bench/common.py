"""What every workload shares: scratch databases, the campus fixture, the transfer mix,
latency statistics, machine facts and the result record.

Everything is deterministic for a given ``--seed``: account ids, the order of transfers and
their amounts; transfer ids are UUIDv7 (the wall-clock millisecond, then seeded random bits), as
the README advises clients, or seeded random UUIDv4 with ``--random-ids``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import resource
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Sequence
from typing import Final

import asyncpg
import msgspec

from engine.db.migrate import migrate
from engine.store import Store
from ledger.account import Account
from ledger.ids import uuid7
from ledger.status import TransferStatus
from ledger.transfer import Transfer
from ledger.types import AccountFlag, AccountKind, TransferCode, TransferFlag

DEFAULT_DSN: Final = "postgresql://postgres@127.0.0.1:5432/postgres"

# -- the campus fixture ------------------------------------------------------------------------
PURSES: Final = 10_000
PURSE_FUNDS_FEN: Final = 5_000_000  # 50,000 yuan: a purse never runs dry during a run...
POOR_EVERY: Final = 100  # ...except every 100th, funded with a single meal's worth
POOR_FUNDS_FEN: Final = 2_000
LOAD_CHUNK: Final = 8190  # transfers per funding batch (one engine batch)

# -- the transfer mix (per mille of requests) ---------------------------------------------------
MEAL_PM: Final = 850
HOLD_PM: Final = 90  # hot water: a hold, settled later by the same submitter
TOPUP_PM: Final = 50
# the remaining 10 per mille re-submit an earlier transfer (idempotent retry: `exists`)
MEAL_FEN: Final = (300, 2_500)
HOT_WATER_HOLD_FEN: Final = 500
HOLD_TIMEOUT_S: Final = 600
TOPUP_FEN: Final = 50_000
OPEN_HOLDS_MAX: Final = 8  # a submitter settles its oldest hold beyond this many


class Campus(msgspec.Struct, frozen=True):
    """The account ids of one loaded ledger."""

    ledger: int
    purses: list[int]
    canteen: int
    water: int
    clearing: int
    random_ids: bool = False  # its clients' transfer ids: UUIDv4 rather than UUIDv7


def campus_ids(ledger: int, purses: int, *, base: int, random_ids: bool = False) -> Campus:
    """Account ids of a campus: purses ``base+1..base+purses``, then the three hot accounts."""
    top = base + purses
    return Campus(
        ledger=ledger,
        purses=list(range(base + 1, top + 1)),
        canteen=top + 1,
        water=top + 2,
        clearing=top + 3,
        random_ids=random_ids,
    )


def campus_accounts(c: Campus) -> list[Account]:
    """The accounts of a campus, as created over the API."""
    no_overdraft = (AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,)
    accounts = [
        Account(id=a, ledger=c.ledger, kind=AccountKind.PURSE, code=1, flags=no_overdraft)
        for a in c.purses
    ]
    accounts += [
        Account(id=c.canteen, ledger=c.ledger, kind=AccountKind.MERCHANT, code=2, name="canteen"),
        Account(id=c.water, ledger=c.ledger, kind=AccountKind.UTILITY, code=3, name="hot water"),
        Account(id=c.clearing, ledger=c.ledger, kind=AccountKind.CLEARING, code=4, name="bank"),
    ]
    return accounts


def funding(c: Campus, *, seed: int) -> list[Transfer]:
    """One top-up per purse from the clearing account."""
    ids = IdSource(seed, stream=-1, random_ids=c.random_ids)  # Mix streams are >= 0
    return [
        Transfer(
            id=ids.next(),
            ledger=c.ledger,
            debit_account_id=c.clearing,
            credit_account_id=p,
            amount=POOR_FUNDS_FEN if i % POOR_EVERY == 0 else PURSE_FUNDS_FEN,
            code=TransferCode.TOP_UP,
            user_data=f"load-{p}",
        )
        for i, p in enumerate(c.purses)
    ]


async def load_campus(store: Store, c: Campus, *, seed: int) -> None:
    """Create a campus's accounts and fund its purses through the engine's own batch path."""
    accounts = campus_accounts(c)
    for i in range(0, len(accounts), LOAD_CHUNK):
        statuses = await store.create_accounts(accounts[i : i + LOAD_CHUNK])
        bad = {s for s in statuses if s.value != "created"}
        if bad:
            raise RuntimeError(f"loading accounts answered {bad}")
    tops = funding(c, seed=seed)
    for i in range(0, len(tops), LOAD_CHUNK):
        outcome = await store.post_batch(c.ledger, tops[i : i + LOAD_CHUNK])
        bad_t = {s for s in outcome.statuses if s is not TransferStatus.CREATED}
        if bad_t:
            raise RuntimeError(f"funding answered {bad_t}")


def client_id(rng: random.Random, unix_ms: int, *, random_ids: bool) -> uuid.UUID:
    """A transfer id as the campus's clients make it at ``unix_ms``: UUIDv7 (time-ordered,
    ``ledger.ids``), or random UUIDv4 (``random_ids``), the random bits drawn from ``rng``."""
    if random_ids:
        return uuid.UUID(int=rng.getrandbits(128), version=4)
    return uuid7(unix_ms, rng.getrandbits(74))


class IdSource:
    """One client's transfer ids (``client_id`` at the wall clock's millisecond)."""

    __slots__ = ("_random", "_rng")

    def __init__(self, seed: int, *, stream: int, random_ids: bool = False) -> None:
        self._rng = random.Random(f"onecard-bench/{seed}/{stream}")
        self._random = random_ids

    def next(self) -> uuid.UUID:
        """The next id of this stream."""
        return client_id(self._rng, time.time_ns() // 1_000_000, random_ids=self._random)


class Mix:
    """One submitter's share of the workload: meals on the hot canteen, hot-water holds later
    settled, top-ups and the odd idempotent retry, drawn from its own seeded generator."""

    __slots__ = ("_again", "_c", "_holds", "_ids", "_plain", "_recent", "_rng")

    def __init__(self, c: Campus, *, seed: int, stream: int, plain: bool = False) -> None:
        """``plain``: no holds (hot-water draws become meals), for posters without holds."""
        self._c = c
        self._plain = plain
        self._rng = random.Random(seed * 1_000_003 + stream)
        self._ids = IdSource(seed, stream=stream, random_ids=c.random_ids)
        self._holds: list[uuid.UUID] = []
        self._recent: Transfer | None = None
        self._again: list[Transfer] | None = None

    def request(self, size: int) -> list[Transfer]:
        """The next request: ``size`` transfers (or the one handed to ``replay``)."""
        again, self._again = self._again, None
        if again is not None:
            return again
        return [self.transfer() for _ in range(size)]

    def replay(self, request: list[Transfer]) -> None:
        """Send ``request`` again next time (it was refused: a client retries it as is)."""
        self._again = request

    def transfer(self) -> Transfer:
        """The next transfer of the mix."""
        c, rng = self._c, self._rng
        draw = rng.random  # randrange/randint cost several Python calls each; this is one
        n = len(c.purses)
        roll = int(draw() * 1000)
        if roll < MEAL_PM or (self._plain and roll < MEAL_PM + HOLD_PM):
            t = Transfer(
                id=self._ids.next(),
                ledger=c.ledger,
                debit_account_id=c.purses[int(draw() * n)],
                credit_account_id=c.canteen,
                amount=MEAL_FEN[0] + int(draw() * (MEAL_FEN[1] - MEAL_FEN[0] + 1)),
                code=TransferCode.MEAL,
            )
        elif roll < MEAL_PM + HOLD_PM:
            if len(self._holds) >= OPEN_HOLDS_MAX or (self._holds and draw() < 0.5):
                t = Transfer(
                    id=self._ids.next(),
                    ledger=c.ledger,
                    amount=1 + int(draw() * HOT_WATER_HOLD_FEN),
                    flags=(TransferFlag.POST_PENDING,),
                    pending_id=self._holds.pop(0),
                )
            else:
                t = Transfer(
                    id=self._ids.next(),
                    ledger=c.ledger,
                    debit_account_id=c.purses[int(draw() * n)],
                    credit_account_id=c.water,
                    amount=HOT_WATER_HOLD_FEN,
                    code=TransferCode.HOT_WATER,
                    flags=(TransferFlag.PENDING,),
                    timeout_s=HOLD_TIMEOUT_S,
                )
                self._holds.append(t.id)
        elif roll < MEAL_PM + HOLD_PM + TOPUP_PM or self._recent is None:
            t = Transfer(
                id=self._ids.next(),
                ledger=c.ledger,
                debit_account_id=c.clearing,
                credit_account_id=c.purses[int(draw() * n)],
                amount=TOPUP_FEN,
                code=TransferCode.TOP_UP,
                user_data=f"bank-{rng.getrandbits(48):012x}",
            )
        else:
            return self._recent  # the retry answers `exists`; not remembered again
        self._recent = t
        return t


# -- scratch databases --------------------------------------------------------------------------


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name`` (URI form; query parameters kept)."""
    base, _, query = dsn.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


@contextlib.asynccontextmanager
async def scratch_database(
    maintenance_dsn: str,
    tag: str,
    *,
    keep: bool = False,
    schema: bool = True,
    prefix: str = "onecard_bench",
) -> AsyncIterator[str]:
    """A fresh database (migrated when ``schema``), dropped afterwards unless ``keep``."""
    name = f"{prefix}_{tag}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    conn = await asyncpg.connect(maintenance_dsn)
    try:
        # DDL takes no parameters; the name is ours (letters, digits and hex only).
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = with_database(maintenance_dsn, name)
    try:
        if schema:
            c = await asyncpg.connect(url)
            try:
                await migrate(c)
            finally:
                await c.close()
        yield url
    finally:
        if not keep:
            conn = await asyncpg.connect(maintenance_dsn)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()


# -- measurements -------------------------------------------------------------------------------


class Latencies:
    """Per-event latencies (seconds) in a compact array; percentiles on demand."""

    __slots__ = ("_a",)

    def __init__(self) -> None:
        self._a = array("d")

    def add(self, seconds: float, count: int = 1) -> None:
        """Record ``count`` events that took ``seconds`` each (a request's transfers)."""
        if count == 1:
            self._a.append(seconds)
        else:
            self._a.extend([seconds] * count)

    def __len__(self) -> int:
        return len(self._a)

    def percentiles_ms(self, *qs: float) -> list[float]:
        """The q-quantiles (0..1) in milliseconds; zeros when nothing was recorded."""
        if not self._a:
            return [0.0 for _ in qs]
        s = sorted(self._a)
        n = len(s)
        return [round(s[min(n - 1, int(q * n))] * 1000, 3) for q in qs]


class Stats(msgspec.Struct, kw_only=True):
    """One measured phase."""

    name: str
    concurrency: int
    duration_s: float
    transfers: int
    requests: int
    transfers_per_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int] = {}
    mean_batch: float | None = None
    errors: dict[str, int] = {}
    # CPU seconds per transfer (per request when there are no transfers) by process group, in
    # microseconds: unlike rates, these hold up on a machine shared with other work
    cpu_us: dict[str, float] = {}
    request_size: int | None = None  # transfers per request, when the phase fixes it
    note: str | None = None


def stats(
    name: str,
    *,
    concurrency: int,
    elapsed: float,
    transfers: int,
    requests: int,
    lat: Latencies,
    statuses: dict[str, int] | None = None,
    mean_batch: float | None = None,
    errors: dict[str, int] | None = None,
    cpu_s: dict[str, float] | None = None,
    note: str | None = None,
) -> Stats:
    """A Stats record from raw counts (``cpu_s``: CPU seconds spent in the window by group)."""
    p50, p99, pmax = lat.percentiles_ms(0.5, 0.99, 1.0)
    return Stats(
        name=name,
        concurrency=concurrency,
        duration_s=round(elapsed, 3),
        transfers=transfers,
        requests=requests,
        transfers_per_s=round(transfers / elapsed, 1) if elapsed > 0 else 0.0,
        requests_per_s=round(requests / elapsed, 1) if elapsed > 0 else 0.0,
        p50_ms=p50,
        p99_ms=p99,
        max_ms=pmax,
        statuses=dict(sorted((statuses or {}).items())),
        mean_batch=None if mean_batch is None else round(mean_batch, 1),
        errors=dict(errors or {}),
        cpu_us={k: round(v * 1e6 / max(transfers or requests, 1), 2)
                for k, v in (cpu_s or {}).items()},
        note=note,
    )


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


class CpuProbe:
    """CPU seconds used so far by this process, by named other processes, and by the
    PostgreSQL backends connected to one database (found by their process title)."""

    def __init__(self, *, database: str | None, pids: dict[str, int] | None = None,
                 own: str = "bench process") -> None:
        self.database = database
        self.pids = dict(pids or {})
        self.own = own

    def _backends(self) -> dict[int, float]:
        out: dict[int, float] = {}
        if self.database is None:
            return out
        needle = f" {self.database} ".encode()
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    title = f.read()
            except OSError:
                continue
            if title.startswith(b"postgres:") and needle in title:
                out[int(d)] = _proc_cpu_s(int(d))
        return out

    def snapshot(self) -> tuple[float, dict[str, float], dict[int, float]]:
        """The counters now."""
        r = resource.getrusage(resource.RUSAGE_SELF)
        return (r.ru_utime + r.ru_stime, {k: _proc_cpu_s(p) for k, p in self.pids.items()},
                self._backends())

    def delta(
        self, before: tuple[float, dict[str, float], dict[int, float]]
    ) -> dict[str, float]:
        """CPU seconds by group since ``before``."""
        own, procs, pg = self.snapshot()
        out = {self.own: own - before[0]}
        for k, v in procs.items():
            out[k] = v - before[1].get(k, 0.0)
        if self.database is not None:
            out["postgres backends"] = sum(v - before[2].get(pid, 0.0) for pid, v in pg.items())
        return out


def database_of(dsn: str) -> str:
    """The database name in a URI DSN."""
    return dsn.partition("?")[0].rpartition("/")[2]


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def children_peak_rss_mb() -> float:
    """Largest peak RSS among waited-for child processes, MiB."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


class Machine(msgspec.Struct, kw_only=True):
    """Where and under what load a run happened: numbers on a shared box need this context."""

    cpus: int
    python: str
    platform: str
    postgres: str
    synchronous_commit: str
    loadavg_before: list[float]
    loadavg_after: list[float] = []
    cpu_busy_pct: float | None = None  # whole machine, during the run
    own_cpu_s: float | None = None  # this process (and its waited children)


async def machine(dsn: str) -> Machine:
    """Facts about the machine and the PostgreSQL server behind ``dsn``."""
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("SHOW server_version")
        sync = await conn.fetchval("SHOW synchronous_commit")
    finally:
        await conn.close()
    return Machine(
        cpus=os.cpu_count() or 0,
        python=platform.python_version(),
        platform=platform.platform(),
        postgres=str(version),
        synchronous_commit=str(sync),
        loadavg_before=[round(x, 2) for x in os.getloadavg()],
    )


class CpuMeter:
    """Whole-machine CPU busy share between ``start`` and ``stop`` (from /proc/stat)."""

    def __init__(self) -> None:
        self._t0 = (0, 0)
        self._own0 = 0.0

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    @staticmethod
    def _own() -> float:
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def start(self) -> None:
        """Begin measuring."""
        self._t0 = self._read()
        self._own0 = self._own()

    def stop(self, m: Machine) -> None:
        """Record the busy share and own CPU seconds into ``m``."""
        total, idle = self._read()
        dt = total - self._t0[0]
        m.cpu_busy_pct = round(100 * (1 - (idle - self._t0[1]) / dt), 1) if dt else None
        m.own_cpu_s = round(self._own() - self._own0, 2)
        m.loadavg_after = [round(x, 2) for x in os.getloadavg()]


def count_statuses(into: dict[str, int], statuses: Sequence[str]) -> None:
    """Add each status name to the tally."""
    for s in statuses:
        into[s] = into.get(s, 0) + 1


def now_stamp() -> str:
    """A sortable UTC timestamp for result file names."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())

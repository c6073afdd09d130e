"""The terminal gateway in several processes: ``onecard serve --gateway-workers N``.

One event loop runs on one core. With N workers, serve runs the first gateway itself (beside
the HTTP API, over the same Campus) and N-1 more in child processes, each a whole engine of its
own (pool, committer, Campus, answer memory) on the same database. Every gateway binds the ISO
port with SO_REUSEPORT and the kernel spreads new connections among them. That is correct
because nothing a terminal relies on lives in one process: transfer ids derive from the
request's key, answers are stored before they are sent (a retransmission reaching another
worker gets the same bytes), reversals find their original in the database, and the ledger is
exact across engines. Only the daily limits count other processes' spending late (see
``engine.campus.Campus``: within ``SPEND_MEMORY_TTL_S``).

A child is ``python -m engine.cli.gateway_worker``: a subprocess rather than multiprocessing,
so its argv and environment are explicit, nothing is pickled and the parent's ``__main__`` is
never imported again. The DSN travels in ``ONECARD_DSN`` (the environment, not argv, which ``ps``
shows to everyone). A child prints ``ready`` on its standard output once it listens; it stops
(answering what it has read, draining its committer) on SIGTERM or SIGINT, or when its
standard input ends: the parent holds the other end, so even a parent killed outright does
not leave orphans serving the port. Children run in their own session: a terminal's Ctrl-C
reaches only the parent, which stops them itself, so no child ends before the parent knows
it is stopping.

A worker that dies is logged and started again (after ``GATEWAY_WORKER_RESTART_S``): the
other gateways take its share of new connections at once, its terminals reconnect and
retransmit (their answers are in the database), and the restart brings the capacity back;
the new worker's sweep also finishes the undo of anything the dead one had given up.
Stopping the whole of serve instead would take the HTTP API and every healthy gateway down
for one process's fault. A crash loop (more than ``GATEWAY_WORKER_RESTARTS`` deaths within
``GATEWAY_WORKER_RESTART_WINDOW_S``) is not something a restart fixes: serve then stops and
exits 1, for the service manager (and the operator) to see.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Final

import msgspec

from engine import limits
from engine.campus import Campus
from engine.service import Engine
from terminals.gateway import Gateway

log = logging.getLogger(__name__)

DSN_ENV: Final = "ONECARD_DSN"  # the DSN travels in the environment: argv is public (ps)
READY_LINE: Final = b"ready\n"  # a worker's standard output, once it listens
WORKER_MODULE: Final = "engine.cli.gateway_worker"  # never imported here: it runs with -m

SQL_CONNECTION_ROOM: Final = """
SELECT current_setting('max_connections')::int - (SELECT count(*) FROM pg_stat_activity)
"""


def workers_arg(value: str) -> int:
    """``--gateway-workers``: 1..GATEWAY_MAX_WORKERS."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= limits.GATEWAY_MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"expected 1..{limits.GATEWAY_MAX_WORKERS} gateway workers, got {value!r}")
    return n


class RestartBudget:
    """Deaths within a sliding window: ``spend`` is False once there were too many."""

    def __init__(self, *, restarts: int = limits.GATEWAY_WORKER_RESTARTS,
                 window_s: float = limits.GATEWAY_WORKER_RESTART_WINDOW_S) -> None:
        self.restarts = restarts
        self.window_s = window_s
        self._deaths: collections.deque[float] = collections.deque()

    def spend(self, now: float) -> bool:
        """Record a death at ``now`` (monotonic seconds); True when a restart is allowed."""
        self._deaths.append(now)
        while self._deaths and self._deaths[0] <= now - self.window_s:
            self._deaths.popleft()
        return len(self._deaths) <= self.restarts


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What every worker process is started with."""

    dsn: str
    host: str
    port: int
    data_dir: str

    def argv(self, index: int) -> list[str]:
        """The command line of worker ``index`` (1..N-1; serve's own gateway is 0)."""
        return [sys.executable, "-m", WORKER_MODULE, "--iso", f"{self.host}:{self.port}",
                "--data-dir", os.path.abspath(self.data_dir), "--index", str(index)]

    def env(self) -> dict[str, str]:
        """The parent's environment with the DSN of this serve."""
        return {**os.environ, DSN_ENV: self.dsn}


class GatewayWorkers:
    """The worker processes beside serve's own gateway: started, watched (restarted when one
    dies), stopped. ``on_failure`` is called once when a crash loop gives up (``failed``)."""

    def __init__(self, spec: WorkerSpec, count: int, *, on_failure: Callable[[], None],
                 budget: RestartBudget | None = None) -> None:
        self.spec = spec
        self.count = count
        self.failed = False
        self._on_failure = on_failure
        self._budget = budget or RestartBudget()
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        """Start every worker and wait until each listens; on any failure stop those started
        and raise RuntimeError."""
        started = await asyncio.gather(
            *(self._spawn(i) for i in range(1, self.count + 1)), return_exceptions=True
        )
        failures = [e for e in started if isinstance(e, BaseException)]
        if failures:
            await self.stop()
            raise failures[0]
        self._watchers = [
            asyncio.create_task(self._watch(i), name=f"onecard-gateway-worker-{i}")
            for i in range(1, self.count + 1)
        ]

    async def stop(self) -> None:
        """Stop watching, then SIGTERM every worker and reap it (SIGKILL past the timeout)."""
        self._stopping = True
        for w in self._watchers:
            w.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await asyncio.gather(*(self._end(i, p) for i, p in list(self._procs.items())))

    async def _spawn(self, index: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self.spec.argv(index), env=self.spec.env(), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, start_new_session=True,
        )
        self._procs[index] = proc
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(limits.GATEWAY_WORKER_START_TIMEOUT_S):
                line = await proc.stdout.readline()
        except TimeoutError:
            line = b"hung"
        if line != READY_LINE:
            # at EOF it is exiting by itself: a signal now would only blur its exit code
            await self._end(index, proc, ask=line != b"")
            raise RuntimeError(f"gateway worker {index} did not start (exit {proc.returncode})")
        log.info("gateway worker %d (pid %d) listening on %s:%d", index, proc.pid,
                 self.spec.host, self.spec.port)

    async def _watch(self, index: int) -> None:
        while True:
            proc = self._procs[index]
            code = await proc.wait()
            if self._stopping:
                return
            log.error("gateway worker %d (pid %d) died (exit %s)", index, proc.pid, code)
            if not self._budget.spend(time.monotonic()):
                log.critical("gateway workers died more than %d times in %.0f s: stopping",
                             self._budget.restarts, self._budget.window_s)
                self.failed = True
                self._on_failure()
                return
            await asyncio.sleep(limits.GATEWAY_WORKER_RESTART_S)
            with contextlib.suppress(RuntimeError):  # it died again: the next round counts it
                await self._spawn(index)

    async def _end(self, index: int, proc: asyncio.subprocess.Process, *, ask: bool = True
                   ) -> None:
        """SIGTERM (unless not ``ask``), wait for the exit, SIGKILL past the timeout."""
        if proc.returncode is None:
            if ask:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(limits.GATEWAY_WORKER_STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                log.error("gateway worker %d (pid %d) did not stop: killed", index, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.returncode not in (0, None) and self._stopping:
            log.warning("gateway worker %d (pid %d) exited %s", index, proc.pid,
                        proc.returncode)


class Gateways:
    """serve's terminal gateways: its own, in this process over the Campus it shares with the
    HTTP API, and ``workers - 1`` worker processes on the same port."""

    def __init__(self, engine: Engine, campus: Campus, *, workers: int, data_dir: str,
                 on_failure: Callable[[], None]) -> None:
        self.engine = engine
        self.own = Gateway(engine, campus=campus)
        self.workers = workers
        self.data_dir = data_dir
        self.pool: GatewayWorkers | None = None
        self._on_failure = on_failure

    @property
    def failed(self) -> bool:
        """True when the workers crash-looped (serve then exits non-zero)."""
        return self.pool is not None and self.pool.failed

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` here, then start the workers on the port bound (``port``
        may be 0) and wait until each listens."""
        await self.own.start(host, port, sweep=True, reuse_port=self.workers > 1)
        if self.workers == 1:
            return
        await self._warn_if_short_of_connections()
        spec = WorkerSpec(dsn=self.engine.dsn, host=host, port=self.own.port,
                          data_dir=self.data_dir)
        self.pool = GatewayWorkers(spec, self.workers - 1, on_failure=self._on_failure)
        try:
            await self.pool.start()
        except BaseException:
            await self.own.stop()
            raise

    async def stop(self) -> None:
        """Stop every gateway at once: each stops accepting and answers what it has read."""
        await asyncio.gather(self.own.stop(), *([self.pool.stop()] if self.pool else []))

    async def _warn_if_short_of_connections(self) -> None:
        # The workers' pools open lazily: too few connections show only under load, as 96s.
        need = (self.workers - 1) * (limits.DB_POOL_MAX + limits.GATEWAY_DB_POOL_MAX)
        async with self.engine.store.pool.acquire() as conn:
            room: int = await conn.fetchval(SQL_CONNECTION_ROOM)
        if need > room:
            log.warning("%d gateway workers may open %d PostgreSQL connections; the server has"
                        " room for %d more (raise max_connections)", self.workers - 1, need, room)

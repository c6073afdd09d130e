"""Load loops: closed (N workers, each sends its next request when the last is answered) and
open (requests are scheduled at a fixed rate; latency counts from the scheduled instant, so a
stalled server is not hidden by the generator slowing down), with a rich progress bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Final

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from bench.machine import CpuProbe
from bench.measure import Latencies, Stats, stats

# One request: returns how many transfers it carried and their statuses (or [] if none).
Request = Callable[[], Awaitable[tuple[int, Iterable[str]]]]
# What to read before and after a phase to derive the mean batch size: (sum, count).
BatchProbe = Callable[[], Awaitable[tuple[float, float]]]

TICK_S: Final = 0.25  # progress refresh
ERROR_BACKOFF_S: Final = 0.002  # a refused or failed request is retried after this pause
MAX_OPEN_BACKLOG: Final = 100_000  # scheduled-but-unsent requests before the open loop gives up

# Wide enough for the result table when the output is a file or a pipe.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


class Bar:
    """A rich progress display shared by every phase of a run (quiet when disabled)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._p = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
            console=console,
            disable=not enabled,
            refresh_per_second=4,
        )

    @contextlib.contextmanager
    def shown(self) -> Iterator[Bar]:
        """Display the bar for the duration of the block."""
        with self._p:
            yield self

    def task(self, description: str, total: float) -> TaskID:
        """A new progress line."""
        return self._p.add_task(description, total=total, rate="")

    def update(self, task: TaskID, *, completed: float, rate: str = "") -> None:
        """Move a progress line."""
        self._p.update(task, completed=completed, rate=rate)

    def note(self, text: str) -> None:
        """Print a line above the bars."""
        console.print(text)


class _Tally:
    __slots__ = ("errors", "lat", "requests", "statuses", "transfers")

    def __init__(self) -> None:
        self.transfers = 0
        self.requests = 0
        self.statuses: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.lat = Latencies()

    def ok(self, n: int, sts: Iterable[str], seconds: float) -> None:
        self.transfers += n
        self.requests += 1
        self.lat.add(seconds, max(n, 1))
        d = self.statuses
        for s in sts:
            d[s] = d.get(s, 0) + 1

    def error(self, e: BaseException) -> None:
        status = getattr(e, "status", None)  # HTTP errors are tallied by status code
        k = f"HTTP {status}" if isinstance(status, int) else type(e).__name__
        self.errors[k] = self.errors.get(k, 0) + 1


async def _ticker(bar: Bar, task: TaskID, t0: float, duration: float, tally: _Tally) -> None:
    last_n, last_t = 0, t0
    while True:
        await asyncio.sleep(TICK_S)
        now = time.perf_counter()
        rate = (tally.transfers - last_n) / (now - last_t) if now > last_t else 0.0
        last_n, last_t = tally.transfers, now
        bar.update(task, completed=min(now - t0, duration), rate=f"{rate:,.0f} transfers/s")


class _Probes:
    """What is read when the measured window opens and again when it closes: CPU seconds by
    process group and the batch-size histogram (sum, count)."""

    def __init__(self, cpu: CpuProbe | None, batch_probe: BatchProbe | None) -> None:
        self.cpu = cpu
        self.batch_probe = batch_probe
        self.cpu0: tuple[float, dict[str, float], dict[int, float]] | None = None
        self.batch0: tuple[float, float] = (0.0, 0.0)
        self.taken = False

    async def take_at(self, start: float) -> None:
        """Read the probes at ``start`` (a ``time.perf_counter`` instant)."""
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        if self.cpu is not None:
            self.cpu0 = self.cpu.snapshot()
        if self.batch_probe is not None:
            self.batch0 = await self.batch_probe()
        self.taken = True

    def cpu_s(self) -> dict[str, float] | None:
        """CPU seconds by group since the window opened (None without a CPU probe)."""
        return self.cpu.delta(self.cpu0) if self.cpu is not None and self.cpu0 is not None else None

    async def mean_batch(self) -> float | None:
        """Transfers per batch since the window opened (None when nothing was committed)."""
        if self.batch_probe is None or not self.taken:
            return None
        s1, c1 = await self.batch_probe()
        if c1 > self.batch0[1]:
            return (s1 - self.batch0[0]) / (c1 - self.batch0[1])
        return None


async def closed_loop(
    name: str,
    workers: list[Request],
    *,
    duration: float,
    warmup: float,
    bar: Bar,
    batch_probe: BatchProbe | None = None,
    cpu: CpuProbe | None = None,
) -> Stats:
    """Run every worker in a loop for ``warmup + duration`` seconds; measure the last
    ``duration`` seconds (requests answered inside that window)."""
    tally = _Tally()
    warm = _Tally()
    t0 = time.perf_counter()
    start = t0 + warmup
    end = start + duration
    probes = _Probes(cpu, batch_probe)

    async def work(req: Request) -> None:
        while True:
            s = time.perf_counter()
            if s >= end:
                return
            try:
                n, sts = await req()
            except Exception as e:
                (tally if s >= start else warm).error(e)
                await asyncio.sleep(ERROR_BACKOFF_S)
                continue
            f = time.perf_counter()
            (tally if s >= start else warm).ok(n, sts, f - s)

    task = bar.task(name, warmup + duration)
    ticker = asyncio.create_task(_ticker(bar, task, t0, warmup + duration, tally))
    prober = asyncio.create_task(probes.take_at(start))
    try:
        await asyncio.gather(*(work(w) for w in workers))
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    await prober
    elapsed = time.perf_counter() - start
    cpu_s = probes.cpu_s()
    mean_batch = await probes.mean_batch()
    bar.update(task, completed=warmup + duration, rate=f"{tally.transfers / elapsed:,.0f}/s")
    return stats(
        name,
        concurrency=len(workers),
        elapsed=elapsed,
        transfers=tally.transfers,
        requests=tally.requests,
        lat=tally.lat,
        statuses=tally.statuses,
        mean_batch=mean_batch,
        errors=tally.errors,
        cpu_s=cpu_s,
    )


async def _schedule(q: asyncio.Queue[float], t0: float, end: float, interval: float) -> None:
    """Put the instant of every request due from ``t0`` on, one per ``interval``, into ``q``
    until ``end`` (or until the backlog shows the workers hopelessly behind)."""
    k = 0
    while True:
        at = t0 + k * interval
        if at >= end:
            return
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if q.qsize() > MAX_OPEN_BACKLOG:
            return  # hopelessly behind: what was measured already says so
        q.put_nowait(at)
        k += 1


async def open_loop(
    name: str,
    workers: list[Request],
    *,
    rate: float,
    duration: float,
    warmup: float,
    bar: Bar,
    cpu: CpuProbe | None = None,
) -> Stats:
    """Offer ``rate`` requests/s, spread over the workers (one request in flight each).

    A request's latency runs from its scheduled instant, so time spent waiting for a free
    worker counts: the numbers are what a client arriving at that rate would see.
    """
    tally = _Tally()
    warm = _Tally()
    q: asyncio.Queue[float] = asyncio.Queue()
    t0 = time.perf_counter()
    start = t0 + warmup
    end = start + duration

    async def work(req: Request) -> None:
        while True:
            at = await q.get()
            try:
                n, sts = await req()
            except Exception as e:
                (tally if at >= start else warm).error(e)
            else:
                (tally if at >= start else warm).ok(n, sts, time.perf_counter() - at)
            finally:
                q.task_done()

    task = bar.task(name, warmup + duration)
    ticker = asyncio.create_task(_ticker(bar, task, t0, warmup + duration, tally))
    workers_t = [asyncio.create_task(work(w)) for w in workers]
    probes = _Probes(cpu, None)
    cpu_task = asyncio.create_task(probes.take_at(start))
    try:
        await _schedule(q, t0, end, 1.0 / rate)
        # let what was scheduled inside the window finish (bounded by the same duration)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(duration, 1.0)):
                await q.join()
    finally:
        ticker.cancel()
        for w in workers_t:
            w.cancel()
        await asyncio.gather(ticker, *workers_t, return_exceptions=True)
    elapsed = duration  # what was offered in the window, answered late or not
    await cpu_task
    cpu_s = probes.cpu_s()
    unsent = q.qsize()
    bar.update(task, completed=warmup + duration, rate=f"{tally.requests / duration:,.0f} req/s")
    return stats(
        name,
        concurrency=len(workers),
        elapsed=elapsed,
        transfers=tally.transfers,
        requests=tally.requests,
        lat=tally.lat,
        statuses=tally.statuses,
        errors={**tally.errors, **({"unsent": unsent} if unsent else {})},
        cpu_s=cpu_s,
        note=f"open loop at {rate:g} requests/s offered",
    )

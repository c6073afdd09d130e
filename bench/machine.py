"""The machine a run happens on: its facts and load (a number on a shared box needs them),
CPU seconds by process group, and peak memory."""

from __future__ import annotations

import os
import platform
import resource
from typing import Final

import asyncpg
import msgspec


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and of every process below it (serve's gateway workers)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", encoding="ascii") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += _proc_cpu_s(p)
        todo += kids.get(p, [])
    return total


class CpuProbe:
    """CPU seconds used so far by this process, by named other processes (each with the
    processes below it), and by the PostgreSQL backends connected to one database (found by
    their process title)."""

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
        return (r.ru_utime + r.ru_stime, {k: _tree_cpu_s(p) for k, p in self.pids.items()},
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

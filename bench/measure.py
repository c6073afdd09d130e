"""What a phase measured: latencies per event, and the Stats record built from the counts."""

from __future__ import annotations

from array import array

import msgspec


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

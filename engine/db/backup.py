"""``onecard backup``: a consistent physical base backup, verified before it counts.

``pg_basebackup`` copies the running cluster (plain format, ``-X stream``: the WAL that makes
the copy consistent is inside it) with a ``backup_manifest`` of every file's checksum;
``pg_verifybackup`` then checks the copy against that manifest and parses its WAL. Only then is
``onecard-backup.json`` (this module's marker) written and the directory renamed to its name::

    OUT/base/                  the cluster as of the end of the backup, with backup_manifest
    OUT/onecard-backup.json    written last: what was backed up, when, where its WAL goes

Everything is written into ``.OUT.partial-XXXX`` beside ``OUT`` first, so a backup killed at
any moment (kill -9 included: ``pg_basebackup`` dies with us) leaves no directory that
``onecard restore`` accepts: it needs the marker, and verifies the copy again.

The WAL archive (``engine.db.embedded``: ``wal-archive`` beside the cluster) is what brings a
restore from the end of the backup to any later moment; the marker names it. On a server of
your own (``--dsn``) the same command works where the server accepts replication connections
from this role, else it says what to configure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import tempfile
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Final

import asyncpg
import msgspec

from engine import limits
from engine.db.embedded import pg_program

MARKER: Final = "onecard-backup.json"
BASE: Final = "base"
FORMAT: Final = 1
_PR_SET_PDEATHSIG: Final = 1
_CANNOT_RUN: Final = 127  # the shell's exit status for a program it cannot run
_DEBIAN_BINDIR: Final = "/usr/lib/postgresql/{major}/bin"
_RHEL_BINDIR: Final = "/usr/pgsql-{major}/bin"

SQL_SERVER = """
SELECT current_setting('server_version_num')::int / 10000 AS major,
       current_setting('server_version') AS version,
       current_setting('wal_level') AS wal_level,
       current_setting('max_wal_senders')::int AS max_wal_senders,
       current_setting('archive_mode') AS archive_mode,
       current_setting('basic_archive.archive_directory', true) AS archive_directory,
       current_user AS role,
       (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user)
           AS can_replicate,
       clock_timestamp() AS now
"""
SQL_NOW = "SELECT clock_timestamp()"

CONFIGURE: Final = """\
To back up a PostgreSQL server of your own, configure it so:
  - postgresql.conf: wal_level = replica and max_wal_senders >= 2 (then restart);
  - a role with the REPLICATION attribute (ALTER ROLE {role} REPLICATION) in the --dsn;
  - pg_hba.conf: a line for replication connections from this host, e.g.
      host  replication  {role}  <this host's address>/32  scram-sha-256   (then reload);
  - for point-in-time recovery: archive_mode = on and an archive_command (or archive_library)
    that copies each finished WAL segment to a directory restore can read, fsyncing it."""


class BackupError(RuntimeError):
    """A backup or restore that cannot be done as asked; the message says what to do."""


class BackupInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The marker of a complete, verified backup (``onecard-backup.json``)."""

    format: int = FORMAT
    label: str
    started_at: datetime  # server clock, before the backup's checkpoint
    finished_at: datetime  # server clock, after the copy was complete
    server_version: str
    server_major: int
    start_wal: str  # the first WAL segment the backup needs (backup_label)
    timeline: int
    wal_archive: str | None  # where the server archives WAL (None: unknown to us)
    archive_mode: str
    bytes: int


class _Server(msgspec.Struct, frozen=True):
    major: int
    version: str
    wal_level: str
    max_wal_senders: int
    archive_mode: str
    archive_directory: str | None
    role: str
    can_replicate: bool
    now: datetime


def _guarded(parent: int) -> Callable[[], None]:
    """In the guard shell before exec: SIGTERM when ``parent`` dies (kill -9 too)."""

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the line above: nobody waits for us
            os._exit(1)

    return arm


# A PostgreSQL program runs under a shell in a process group of its own; when onecard dies
# (kill -9 too) the shell is told (PR_SET_PDEATHSIG) and kills the whole group:
# pg_basebackup *and* the child it forks to stream WAL, which would otherwise go on
# streaming, with a replication slot holding WAL back on the server, until it restarts.
_GUARD: Final = 'trap "kill -KILL 0" TERM; "$@" & wait $!'


async def run_program(
    argv: list[str], *, timeout_s: float, env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Run a PostgreSQL program (its arguments passed as they are, under the guard shell),
    with ``env`` added to ours; (exit status, its combined output)."""
    env = {**os.environ, **(env or {}), "LC_ALL": "C"}
    try:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", _GUARD, "onecard-guard", *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_guarded(os.getpid()),
        )  # fmt: skip
    except OSError as e:
        return _CANNOT_RUN, f"cannot run {argv[0]}: {e}"
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await proc.communicate()
    except BaseException as e:  # a timeout, or we are being stopped: the whole group goes
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(e, TimeoutError):
            name = Path(argv[0]).name
            raise BackupError(f"{name} took longer than {timeout_s:.0f}s") from None
        raise
    return proc.returncode or 0, out.decode("utf-8", "replace").strip()


async def program_major(program: Path) -> int | None:
    """The PostgreSQL major version of a program (``--version``), None if it is not one."""
    code, out = await run_program([str(program), "--version"], timeout_s=30)
    found = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(found.group(1)) if code == 0 and found else None


def _bindirs(major: int) -> list[Path]:
    candidates = [pg_program("pg_basebackup").parent]
    which = shutil.which("pg_basebackup")
    if which:  # Debian's is a wrapper script choosing by version: its real directory
        candidates.append(Path(os.path.realpath(which)).parent)
    return candidates + [Path(d.format(major=major)) for d in (_DEBIAN_BINDIR, _RHEL_BINDIR)]


async def tools_for(major: int) -> Path:
    """A bin directory whose pg_basebackup and pg_verifybackup are of PostgreSQL ``major``:
    the embedded wheel's, else the server's own client tools where distributions put them."""
    candidates = _bindirs(major)
    for bindir in candidates:
        if await program_major(bindir / "pg_verifybackup") == major and (
            await program_major(bindir / "pg_basebackup") == major
        ):
            return bindir
    raise BackupError(
        f"no pg_basebackup and pg_verifybackup of PostgreSQL {major} found (looked in "
        f"{', '.join(map(str, candidates))}): install the server's client tools "
        f"(e.g. the postgresql-client-{major} package)"
    )


async def _server(dsn: str) -> _Server:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(SQL_SERVER)
    finally:
        await conn.close()
    assert row is not None
    return _Server(**dict(row))


async def _server_now(dsn: str) -> datetime:
    conn = await asyncpg.connect(dsn)
    try:
        now: datetime = await conn.fetchval(SQL_NOW)
    finally:
        await conn.close()
    return now


def _refusal(server: _Server) -> str | None:
    """Why this server cannot be backed up over a replication connection, or None."""
    if server.wal_level == "minimal":
        return "wal_level is minimal"
    if server.max_wal_senders < 2:
        return f"max_wal_senders is {server.max_wal_senders} (a backup needs 2)"
    if not server.can_replicate:
        return f"role {server.role!r} has neither REPLICATION nor SUPERUSER"
    return None


def check_out(out: Path) -> Path:
    """``out`` as an absolute path; it must not exist, or be an empty directory (a backup
    never mixes with other files)."""
    out = Path(os.path.abspath(out))
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BackupError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise BackupError(f"{out} is not empty: a backup goes into a new or empty directory")
    return out


def _partial(out: Path) -> Path:
    """The directory the backup is written into, beside ``out`` (same file system)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _complete(partial: Path, out: Path, info: BackupInfo) -> None:
    """Mark the verified copy complete, then give it its name (atomic from here on)."""
    _write_marker(partial, info)
    check_out(out)  # nobody filled it meanwhile
    with contextlib.suppress(FileNotFoundError):
        out.rmdir()  # an empty directory is replaced
    partial.rename(out)
    _fsync_dir(out.parent)


def _backup_label(base: Path) -> tuple[str, int]:
    """(first WAL segment, timeline) from the copy's ``backup_label``."""
    text = (base / "backup_label").read_text()
    wal = re.search(r"^START WAL LOCATION: .*\(file ([0-9A-F]{24})\)", text, re.M)
    tli = re.search(r"^START TIMELINE: (\d+)", text, re.M)
    if wal is None or tli is None:
        raise BackupError(f"unexpected backup_label in {base}:\n{text}")
    return wal.group(1), int(tli.group(1))


def _tree_bytes(root: Path) -> int:
    return sum(
        (Path(d) / f).stat().st_size for d, _, files in os.walk(root) for f in files
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(directory: Path, info: BackupInfo) -> None:
    path = directory / MARKER
    with path.open("wb") as fh:
        fh.write(msgspec.json.format(msgspec.json.encode(info)) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(directory)


def read_marker(directory: Path) -> BackupInfo:
    """The marker of the complete backup in ``directory``; BackupError if there is none."""
    try:
        raw = (directory / MARKER).read_bytes()
    except FileNotFoundError:
        raise BackupError(
            f"{directory} is not a complete onecard backup (no {MARKER}; an interrupted "
            "backup never gets one): use another backup"
        ) from None
    try:
        info = msgspec.json.decode(raw, type=BackupInfo)
    except msgspec.ValidationError as e:
        raise BackupError(f"{directory / MARKER} is not a onecard backup marker: {e}") from e
    if info.format != FORMAT:
        raise BackupError(f"{directory} is a backup of format {info.format}, not {FORMAT}")
    return info


async def verify_copy(bindir: Path, base: Path) -> None:
    """``pg_verifybackup``: every file against the manifest, and the WAL it needs."""
    code, out = await run_program(
        [str(bindir / "pg_verifybackup"), "--quiet", str(base)], timeout_s=limits.BACKUP_TIMEOUT_S
    )
    if code != 0:
        raise BackupError(f"pg_verifybackup found {base} damaged:\n{out}")


def _without_password(dsn: str) -> tuple[str, dict[str, str]]:
    """A URI DSN without its password, and the password as PGPASSWORD: a program's arguments
    are visible to every user of the machine (ps), its environment is not."""
    parts = urllib.parse.urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql") or parts.password is None:
        return dsn, {}
    user = urllib.parse.quote(urllib.parse.unquote(parts.username or ""), safe="")
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}@{host}" if user else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), {
        "PGPASSWORD": urllib.parse.unquote(parts.password)
    }


async def _copy(bindir: Path, dsn: str, server: _Server, base: Path, label: str) -> None:
    dbname, secret = _without_password(dsn)
    argv = [
        str(bindir / "pg_basebackup"), "--dbname", dbname, "--pgdata", str(base),
        "--format", "plain", "--wal-method", "stream", "--checkpoint", "fast",
        "--label", label, "--no-password",
    ]  # fmt: skip
    code, out = await run_program(argv, timeout_s=limits.BACKUP_TIMEOUT_S, env=secret)
    if code != 0:
        raise BackupError(
            f"pg_basebackup failed (exit {code}):\n{out}\n\n{CONFIGURE.format(role=server.role)}"
        )


async def backup(dsn: str, out: Path) -> BackupInfo:
    """Back the database of ``dsn`` up into ``out`` (new or empty); see the module docstring.
    Raises BackupError with what to configure when the server does not allow it."""
    out = check_out(out)
    server = await _server(dsn)
    refused = _refusal(server)
    if refused is not None:
        raise BackupError(
            f"cannot back up this server: {refused}.\n{CONFIGURE.format(role=server.role)}"
        )
    bindir = await tools_for(server.major)
    partial = _partial(out)
    try:
        base = partial / BASE
        label = f"onecard {server.now.isoformat()}"
        await _copy(bindir, dsn, server, base, label)
        await verify_copy(bindir, base)
        start_wal, timeline = _backup_label(base)
        info = BackupInfo(
            label=label,
            started_at=server.now,
            finished_at=await _server_now(dsn),
            server_version=server.version,
            server_major=server.major,
            start_wal=start_wal,
            timeline=timeline,
            wal_archive=server.archive_directory or None,
            archive_mode=server.archive_mode,
            bytes=_tree_bytes(base),
        )
        _complete(partial, out, info)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return info

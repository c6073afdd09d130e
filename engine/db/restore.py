"""``onecard restore``: a new embedded cluster from a backup, as of a chosen moment.

The backup (``engine.db.backup``) is checked first: its marker must be there and
``pg_verifybackup`` must pass again (a copy can rot on its disk). Its cluster is copied into
the new data directory with ``recovery.signal`` and recovered by PostgreSQL itself:
``restore_command`` fetches the archived WAL segments after the backup, and with ``until`` the
replay stops before the first transaction that committed after it (``recovery_target_time``,
inclusive), so every transfer committed at or before ``until`` is there and none after. The
server is then promoted (a new timeline, so the restored cluster never writes over the
history it came from), stopped, and ``onecard serve --data-dir NEW`` serves it.

A moment the archive does not reach yet is refused, not approximated: PostgreSQL stops with
"recovery ended before configured recovery target was reached" and the new data directory is
removed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec

from engine import limits
from engine.db.backup import (
    BASE,
    BackupError,
    BackupInfo,
    program_major,
    read_marker,
    verify_copy,
)
from engine.db.embedded import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    pg_program,
)
from engine.db.embedded.layout import SHELL_UNSAFE

STAGED_WAL: Final = "restore-wal"
_NOT_REACHED: Final = "recovery ended before configured recovery target was reached"
_BEFORE_CONSISTENT: Final = "before consistent recovery point"
_SEGMENT = re.compile(r"[0-9A-F]{24}")


class Restored(msgspec.Struct, frozen=True, kw_only=True):
    """What a restore did: from which backup, up to when, and PostgreSQL's own account."""

    backup: BackupInfo
    until: datetime | None
    wal_archive: str | None
    log: list[str]


def _empty_target(pg: EmbeddedPostgres) -> None:
    new = pg.data_dir
    if new.is_symlink() or (new.exists() and not new.is_dir()):
        raise BackupError(f"{new} exists and is not a directory")
    if new.is_dir() and any(new.iterdir()):
        raise BackupError(f"refusing to restore into {new}: it is not empty")
    if os.path.lexists(pg.pgdata):
        raise BackupError(
            f"a cluster for {new} exists already at {pg.pgdata}: remove it, or choose another "
            "--data-dir"
        )


def _archive(info: BackupInfo, wal_archive: Path | None, until: datetime | None) -> Path | None:
    """The WAL archive to replay from: the one given, else the one the backup names."""
    if wal_archive is not None:
        if not wal_archive.is_dir():
            raise BackupError(f"--wal-archive {wal_archive} is not a directory")
        return wal_archive
    named = Path(info.wal_archive) if info.wal_archive else None
    if named is not None and named.is_dir():
        return named
    if until is not None:
        where = f"{named} is gone" if named else "the backup names no WAL archive"
        raise BackupError(f"--until needs the WAL archive, and {where}: give --wal-archive DIR")
    return None  # the backup alone: restored as of its end


def _stage(pg: EmbeddedPostgres, archive: Path, info: BackupInfo) -> Path:
    """A copy of the segments the restore needs (from the backup's first one on, and the
    timeline histories) that the server's OS user can read (root: the archive is not theirs)."""
    staged = pg.cluster_home / STAGED_WAL
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(mode=0o700)
    for p in archive.iterdir():
        segment = _SEGMENT.fullmatch(p.name) is not None and p.name[8:] >= info.start_wal[8:]
        if p.is_file() and (segment or p.name.endswith(".history")):
            shutil.copy2(p, staged / p.name)
    pg.give_to_server(staged)
    return staged


def _recovery_settings(archive: Path | None, until: datetime | None) -> dict[str, str]:
    if archive is None:
        command = "false"  # nothing to fetch: replay the backup's own WAL, then open
    else:
        if SHELL_UNSAFE.search(str(archive)):
            raise BackupError(f"the WAL archive path {archive} has characters a shell mangles")
        command = f'test -f "{archive}/%f" && cp "{archive}/%f" "%p"'
    settings = {"restore_command": _conf(command), "recovery_target_action": "'promote'"}
    if until is not None:
        stamp = until.astimezone(UTC).isoformat(sep=" ")
        settings |= {"recovery_target_time": _conf(stamp), "recovery_target_inclusive": "on"}
    return settings


def _conf(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _explain(e: EmbeddedPostgresError, info: BackupInfo, until: datetime | None) -> BackupError:
    text = str(e)
    if _NOT_REACHED in text:
        return BackupError(
            f"the WAL archive ends before --until {until}: nothing committed after that moment "
            "has been archived yet, so the restore cannot prove it has everything up to it. A "
            "running server archives its current segment within "
            f"{limits.EMBEDDED_ARCHIVE_TIMEOUT_S}s (or at once: SELECT pg_switch_wal()); retry "
            f"then, or restore without --until.\n\n{text}"
        )
    if _BEFORE_CONSISTENT in text:
        return BackupError(
            f"--until {until} is before this backup was complete ({info.finished_at}): "
            f"use an older backup.\n\n{text}"
        )
    return BackupError(f"recovery failed:\n{text}")


def _remove_created(pg: EmbeddedPostgres, *, existed: bool) -> None:
    """Undo a failed restore: NEW back to empty (or gone), the cluster home removed."""
    if pg.cluster_home != pg.data_dir:
        shutil.rmtree(pg.cluster_home, ignore_errors=True)
    if not existed:
        shutil.rmtree(pg.data_dir, ignore_errors=True)
        return
    for child in pg.data_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()


def _open_backup(source: Path) -> tuple[BackupInfo, Path]:
    """The marker and the base directory of the complete backup in ``source``."""
    source = source.resolve()
    info = read_marker(source)
    base = source / BASE
    if not (base / "PG_VERSION").is_file() or not (base / "backup_manifest").is_file():
        raise BackupError(f"{base} is not a base backup (no PG_VERSION or backup_manifest)")
    return info, base


async def _check_version(info: BackupInfo) -> None:
    """The embedded server can only open a cluster of its own major version."""
    embedded = await program_major(pg_program("postgres"))
    if embedded != info.server_major:
        raise BackupError(
            f"the backup is of PostgreSQL {info.server_major} and the embedded server is "
            f"{embedded}: restore it with PostgreSQL {info.server_major}'s own tools, or move "
            "the data with pg_dump and pg_restore"
        )


def _recover(
    pg: EmbeddedPostgres,
    base: Path,
    info: BackupInfo,
    archive: Path | None,
    until: datetime | None,
) -> tuple[list[str], Path | None]:
    """Copy, recover, promote, stop (long and synchronous: run in a thread); on failure the
    new data directory is emptied again. (PostgreSQL's log lines, the archive used)."""
    existed = pg.data_dir.is_dir()
    pg.prepare()
    try:
        if archive is not None and not pg.readable_by_server(archive):
            archive = _stage(pg, archive, info)
        settings = _recovery_settings(archive, until)
        try:
            log = pg.restore(base, settings, timeout_s=limits.RESTORE_TIMEOUT_S)
        except EmbeddedPostgresError as e:
            raise _explain(e, info, until) from e
        shutil.rmtree(pg.cluster_home / STAGED_WAL, ignore_errors=True)
    except BaseException:
        _remove_created(pg, existed=existed)
        raise
    return log, archive


async def restore(
    source: Path,
    data_dir: Path,
    *,
    until: datetime | None = None,
    wal_archive: Path | None = None,
) -> Restored:
    """Restore the backup in ``source`` into a new embedded cluster in ``data_dir`` (new or
    empty), as of ``until`` (default: as far as the archive goes). See the module docstring."""
    info, base = _open_backup(source)
    pg = EmbeddedPostgres(data_dir)
    _empty_target(pg)
    await _check_version(info)
    if until is not None and until < info.started_at:
        raise BackupError(
            f"--until {until} is before this backup began ({info.started_at}): use an older one"
        )
    archive = _archive(info, wal_archive, until)
    await verify_copy(pg_program("pg_verifybackup").parent, base)
    log, archive = await asyncio.to_thread(_recover, pg, base, info, archive, until)
    return Restored(
        backup=info, until=until, wal_archive=str(archive) if archive else None, log=log
    )

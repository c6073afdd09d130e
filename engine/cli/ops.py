"""Operations: ``backup`` and ``restore`` (contract §3; see engine/db/backup.py and
engine/db/restore.py for what they write and how a restore reaches its moment)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Final

from engine.cli.base import Command, console, instant_arg
from engine.db.backup import backup
from engine.db.restore import restore

_MiB: Final = 1024 * 1024


def _backup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="new or empty directory to write"
    )


async def _backup(args: argparse.Namespace, dsn: str) -> int:
    t0 = time.perf_counter()
    info = await backup(dsn, args.out)
    out = console()
    out.print(
        f"backed up PostgreSQL {info.server_version} into {args.out}: "
        f"{info.bytes / _MiB:,.0f} MiB, verified with pg_verifybackup, "
        f"in {time.perf_counter() - t0:.1f}s (consistent as of {info.finished_at.isoformat()})",
        soft_wrap=True,
    )
    if info.archive_mode == "off":
        out.print(
            "[yellow]warning: the server does not archive its WAL (archive_mode = off): this "
            "backup restores to its own end only, not to a later moment[/yellow]",
            soft_wrap=True,
        )
    elif info.wal_archive:
        out.print(
            f"WAL archive (needed to restore to a later moment): {info.wal_archive}",
            soft_wrap=True,
        )
    return 0


def _restore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from", dest="source", required=True, type=Path, metavar="DIR",
        help="a directory `backup` wrote",
    )
    p.add_argument(
        "--until",
        type=instant_arg,
        metavar="RFC3339",
        help="RFC 3339 moment: every transaction committed at or before it, none after "
        "(default: as far as the WAL archive goes)",
    )
    p.add_argument(
        "--wal-archive",
        type=Path,
        metavar="DIR",
        help="the archived WAL segments (default: the archive the backup names)",
    )


async def _restore(args: argparse.Namespace, dsn: str) -> int:
    if args.dsn:
        raise ValueError("restore makes a new embedded cluster in --data-dir; it takes no --dsn")
    t0 = time.perf_counter()
    done = await restore(
        args.source, Path(args.data_dir), until=args.until, wal_archive=args.wal_archive
    )
    out = console()
    for line in done.log:
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    moment = done.until.isoformat() if done.until else "the end of the WAL archive"
    out.print(
        f"restored {args.source} into {args.data_dir} as of {moment} in "
        f"{time.perf_counter() - t0:.1f}s; serve it with: "
        f"onecard serve --data-dir {args.data_dir}",
        markup=False,
        soft_wrap=True,
    )
    return 0


BACKUP: Final = Command(
    "backup", "write a verified base backup of the database", _backup_args, _backup
)
RESTORE: Final = Command(
    "restore",
    "make a new embedded cluster from a backup, as of a moment",
    _restore_args,
    _restore,
    database=False,
)

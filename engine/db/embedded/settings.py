"""The cluster's configuration files: ``onecard.conf`` (the server settings, WAL archiving
included), the line that includes it from ``postgresql.conf``, and ``pg_hba.conf``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from engine import limits
from engine.db.embedded.layout import PORT, RunAs, write_file

_MiB: Final = 1024 * 1024


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


HBA_CONF: Final = """\
# Written by onecard (engine/db/embedded/): unix-socket only, no TCP.
# The socket is mode 0700 in a 0700 directory, so only the cluster's OS user (and root)
# can reach it.
# TYPE  DATABASE     USER  METHOD
local   all          all   trust
local   replication  all   trust
"""

INCLUDE_LINE: Final = (
    "\n# onecard: settings managed by engine/db/embedded/ (use ALTER SYSTEM to override)\n"
    "include_if_exists = 'onecard.conf'\n"
)


def write_settings(
    pgdata: Path,
    socket_dir: Path,
    archive_dir: Path,
    *,
    recovery: Mapping[str, str] | None,
    owner: RunAs | None,
) -> None:
    """(Re)write ``onecard.conf`` (with ``recovery``'s settings too) and ``pg_hba.conf``."""
    settings = _postgres_settings(socket_dir, archive_dir)
    settings.update(recovery or {})
    body = "".join(f"{k} = {v}\n" for k, v in settings.items())
    write_file(
        pgdata / "onecard.conf",
        "# Managed by onecard (engine/db/embedded/); rewritten at every start.\n" + body,
        mode=0o600,
        owner=owner,
    )
    # Rewritten too, so that clusters made before a line was added get it.
    write_file(pgdata / "pg_hba.conf", HBA_CONF, mode=0o600, owner=owner)

"""Where an embedded cluster lives and whose it is: the names of its user, directories and
files, the error every part raises, and writing files with the right owner and mode.
(The full picture is engine/db/embedded/__init__.py's docstring.)"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

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

# pg_ctl passes -D / -l to /bin/sh inside double quotes without escaping.
SHELL_UNSAFE: Final = re.compile(r'["$`\\\x00-\x1f\x7f]')
_LOG_TAIL_LINES: Final = 40


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be located, initialised, started or stopped."""


@dataclass(frozen=True)
class RunAs:
    """An OS identity to run PostgreSQL programs as (only used when we are root)."""

    name: str
    uid: int
    gid: int

    def subprocess_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def write_file(path: Path, text: str, *, mode: int, owner: RunAs | None) -> None:
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


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def own(path: Path, mode: int, owner: RunAs | None) -> None:
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)

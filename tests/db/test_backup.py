"""``onecard backup`` / ``onecard restore`` on the real embedded PostgreSQL (engine/db/backup.py,
engine/db/restore.py): the restore drill of issue 16, a kill -9 during a backup, the refusals,
and a server of one's own that does not allow replication."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import asyncpg
import httpx
import pytest

from bench.fixture import Campus, campus_ids, load_campus
from engine.db.backup import MARKER, BackupError, _without_password, backup, read_marker
from engine.db.embedded import EmbeddedPostgres
from engine.db.restore import restore
from engine.service import Engine
from ledger.status import TransferStatus
from ledger.transfer import Transfer
from ledger.types import TransferCode, TransferFlag
from tests.databases import with_database
from tests.db.conftest import process_gone
from tests.engine.test_cli import (
    PYTHON,
    READ,
    REPO_ROOT,
    _env,
    _kill,
    _run,
    _serve,
    _terminate,
    _wait_healthy,
)

LEDGER: Final = 16
PURSES: Final = 20
CLI_LIMIT_S: Final = 300.0  # a backup or restore of a small cluster takes seconds
EMBEDDED_START_S: Final = 120.0

DataDirs = Callable[[str], Path]


# -- helpers -------------------------------------------------------------------------------------


async def _post(engine: Engine, c: Campus, rng: random.Random, n: int) -> set[uuid.UUID]:
    """``n`` transfers (meals, and a hot-water hold every 10th), all acknowledged CREATED."""
    batch: list[Transfer] = []
    for i in range(n):
        purse = rng.choice(c.purses[1:])  # the first purse is the bench's poor one
        if i % 10 == 0:
            batch.append(Transfer(
                id=uuid.uuid4(), ledger=c.ledger, debit_account_id=purse,
                credit_account_id=c.water, amount=500, code=TransferCode.HOT_WATER,
                flags=(TransferFlag.PENDING,), timeout_s=3600))
        else:
            batch.append(Transfer(
                id=uuid.uuid4(), ledger=c.ledger, debit_account_id=purse,
                credit_account_id=c.canteen, amount=rng.randint(1, 100), code=TransferCode.MEAL))
    results = await engine.batcher.submit(batch)
    assert [r.status for r in results] == [TransferStatus.CREATED] * n
    return {t.id for t in batch}


async def _fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _state(dsn: str) -> tuple[set[uuid.UUID], dict[int, tuple[int, ...]]]:
    """The ledger's transfer ids and every account's four balance fields."""
    ids = {r["id"] for r in await _fetch(dsn, "SELECT id FROM transfers WHERE ledger = $1",
                                         LEDGER)}
    balances = {
        r["id"]: (r["debits_posted"], r["credits_posted"], r["debits_pending"],
                  r["credits_pending"])
        for r in await _fetch(dsn, "SELECT * FROM accounts WHERE ledger = $1", LEDGER)
    }
    return ids, balances


async def _archive_now(dsn: str) -> None:
    """Close the current WAL segment and wait until the archiver has it (else the archive
    ends at the last full segment and a restore to a later moment is rightly refused)."""
    conn = await asyncpg.connect(dsn)
    try:
        segment = await conn.fetchval("SELECT pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + 60
        while (await conn.fetchval("SELECT last_archived_wal FROM pg_stat_archiver") or "") < (
            segment
        ):
            assert time.monotonic() < deadline, "the archiver did not archive the segment"
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


def _listing(directory: Path, pattern: str | None = None) -> list[Path]:
    """Entries of ``directory`` (dot files too), or those matching ``pattern``."""
    return sorted(directory.iterdir() if pattern is None else directory.glob(pattern))


async def _cli(*args: str) -> tuple[int, str]:
    code, out, err = await _run(*args, limit_s=CLI_LIMIT_S)
    return code, out + err


async def _small_backup(data_dirs: DataDirs, tmp_path: Path) -> tuple[str, Path]:
    """A started embedded cluster with one table, and a backup of it."""
    dsn = EmbeddedPostgres(data_dirs("src")).start()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 10)")
    finally:
        await conn.close()
    out = tmp_path / "backup"
    await backup(dsn, out)
    return dsn, out


# -- the drill -----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_restore_drill(data_dirs: DataDirs, tmp_path: Path) -> None:
    """Load, back up while posting, note T, post more, restore to T: exactly the transfers
    committed at or before T, the balances read at T, `verify` clean, `serve` serves it."""
    src, new, out = data_dirs("src"), data_dirs("new"), tmp_path / "backup"
    pg = EmbeddedPostgres(src)
    dsn = pg.start()
    engine = Engine(dsn)
    await engine.start()
    rng = random.Random(16)
    c = campus_ids(LEDGER, PURSES, base=0)
    try:
        await load_campus(engine.store, c, seed=16)
        posted = await _post(engine, c, rng, 200)
        stop = asyncio.Event()

        async def keep_posting() -> None:
            while not stop.is_set():
                posted.update(await _post(engine, c, rng, 20))

        poster = asyncio.create_task(keep_posting())
        code, output = await _cli("backup", "--data-dir", str(src), "--out", str(out))
        stop.set()
        await poster
        assert code == 0, output
        assert "verified with pg_verifybackup" in output
        posted.update(await _post(engine, c, rng, 100))  # after the backup
        at_t = await _state(dsn)
        [row] = await _fetch(dsn, "SELECT clock_timestamp() AS t")
        t: datetime = row["t"]
        await asyncio.sleep(0.05)
        later = await _post(engine, c, rng, 100)
        await _archive_now(dsn)
    finally:
        await engine.stop()
    pg.stop()
    ids_t, balances_t = at_t
    assert ids_t >= posted and not ids_t & later

    code, output = await _cli("restore", "--from", str(out), "--until", t.isoformat(),
                              "--data-dir", str(new))
    assert code == 0, output
    assert "recovery stopping before commit" in output
    code, output = await _cli("verify", "--data-dir", str(new), "--stop-embedded")
    assert code == 0, output

    restored = EmbeddedPostgres(new)
    try:
        ids_new, balances_new = await _state(restored.start())
    finally:
        restored.stop()
    assert ids_new == ids_t  # every transfer committed at or before T, none after
    assert balances_new == balances_t

    s = await _serve(tmp_path, "--data-dir", str(new))
    try:
        await _wait_healthy(s, EMBEDDED_START_S)
        async with httpx.AsyncClient(base_url=s.url, timeout=10) as client:
            r = await client.get(f"/v1/accounts/{c.canteen}/balance",
                                 headers={"Authorization": f"Bearer {READ}"})
        assert r.status_code == 200, r.text
        assert r.json()["credits_posted"] == balances_t[c.canteen][1]
        code, _ = await _terminate(s, limit_s=90)
        assert code == 0, s.output()
    finally:
        await _kill(s)


# -- kill -9 -------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_kill_9_during_backup_leaves_nothing_restore_accepts(
    data_dirs: DataDirs, tmp_path: Path
) -> None:
    src = data_dirs("src")
    dsn = EmbeddedPostgres(src).start()
    conn = await asyncpg.connect(dsn)
    try:  # ~200 MB, so that the copy is still running when it is killed
        await conn.execute("CREATE TABLE filler AS SELECT g, repeat(md5(g::text), 30) AS pad "
                           "FROM generate_series(1, 200000) g")
    finally:
        await conn.close()
    out = tmp_path / "backup"
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "engine.cli", "backup", "--data-dir", str(src), "--out", str(out),
        cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + CLI_LIMIT_S
    partial: list[Path] = []
    while not partial or not (partial[0] / "base" / "base").is_dir():
        assert proc.returncode is None, "the backup ended before it could be killed"
        assert time.monotonic() < deadline
        partial = _listing(tmp_path, ".backup.partial-*")
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()

    assert not out.exists()
    copiers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _copies_into(p, partial[0])]
    deadline = time.monotonic() + 10
    while not all(process_gone(p) for p in copiers):  # pg_basebackup dies with its parent
        assert time.monotonic() < deadline, f"pg_basebackup outlived its parent: {_ps(copiers)}"
        await asyncio.sleep(0.05)
    assert not (partial[0] / MARKER).exists()
    for candidate in (out, partial[0]):
        with pytest.raises(BackupError, match="not a complete onecard backup"):
            await restore(candidate, data_dirs("new"))
    code, output = await _cli("restore", "--from", str(partial[0]), "--data-dir",
                              str(data_dirs("new2")))
    assert code == 2 and "not a complete onecard backup" in output
    # the leftover is in nobody's way: the next backup completes
    await backup(dsn, out)
    assert read_marker(out).server_major == 18


def _ps(pids: list[int]) -> str:
    return subprocess.run(["ps", "-o", "pid,ppid,stat,args", "-p", ",".join(map(str, pids))],
                          capture_output=True, text=True, check=False).stdout


def _copies_into(pid: str, directory: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(str(directory).encode() in arg for arg in cmdline)


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_restore_refusals(data_dirs: DataDirs, tmp_path: Path) -> None:
    dsn, out = await _small_backup(data_dirs, tmp_path)
    info = read_marker(out)

    full = data_dirs("full")
    full.mkdir()
    (full / "keep-me").write_text("operator's file")
    with pytest.raises(BackupError, match="not empty"):
        await restore(out, full)
    assert (full / "keep-me").read_text() == "operator's file"

    with pytest.raises(BackupError, match="before this backup began"):
        await restore(out, data_dirs("early"), until=info.started_at.replace(year=2000))

    # a moment the archive does not reach yet is refused, and the new data dir is left empty
    [row] = await _fetch(dsn, "SELECT clock_timestamp() AS t")
    late = data_dirs("late")
    late.mkdir()
    with pytest.raises(BackupError, match="WAL archive ends before --until"):
        await restore(out, late, until=row["t"])
    assert _listing(late) == []
    assert not EmbeddedPostgres(late).pgdata.exists()

    # a backup that rotted on its disk fails pg_verifybackup
    relation = max((out / "base" / "base").rglob("[0-9]*"), key=lambda p: p.stat().st_size)
    with relation.open("r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 16)
    with pytest.raises(BackupError, match="damaged"):
        await restore(out, data_dirs("rotten"))

    with pytest.raises(BackupError, match="not empty"):
        await backup(dsn, out)  # a backup never writes into a used directory


async def _count(data_dir: Path) -> int:
    pg = EmbeddedPostgres(data_dir)
    try:
        [row] = await _fetch(pg.start(), "SELECT count(*) AS n FROM t")
    finally:
        pg.stop()
    n: int = row["n"]
    return n


@pytest.mark.slow
async def test_restore_to_the_end_of_the_archive_and_from_a_copy_of_it(
    data_dirs: DataDirs, tmp_path: Path
) -> None:
    dsn, out = await _small_backup(data_dirs, tmp_path)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO t SELECT generate_series(11, 25)")
        t = await conn.fetchval("SELECT clock_timestamp()")
        await asyncio.sleep(0.05)
        await conn.execute("INSERT INTO t SELECT generate_series(26, 30)")
    finally:
        await conn.close()
    await _archive_now(dsn)

    done = await restore(out, data_dirs("end"))  # no --until: as far as the archive goes
    assert done.until is None and done.wal_archive == read_marker(out).wal_archive
    assert await _count(data_dirs("end")) == 30

    # the archive as an operator brings it back from another disk: a copy of their own (as
    # root, one the server's OS user cannot read: the restore stages what it needs)
    copy = tmp_path / "archive-copy"
    shutil.copytree(str(read_marker(out).wal_archive), copy)
    os.chmod(copy, 0o700)
    new = data_dirs("copy")
    done = await restore(out, new, until=t, wal_archive=copy)
    staged = EmbeddedPostgres(new).cluster_home / "restore-wal"
    assert done.wal_archive == str(staged if os.geteuid() == 0 else copy)
    assert await _count(new) == 25
    assert not staged.exists()  # staged for the recovery only


@pytest.mark.slow
async def test_a_cluster_of_the_previous_release_gets_archiving_on_its_next_start(
    data_dirs: DataDirs, tmp_path: Path
) -> None:
    src = data_dirs("src")
    pg = EmbeddedPostgres(src)
    pg.start()
    pg.stop()
    # what engine/embedded.py wrote before WAL archiving (abc9096)
    (pg.pgdata / "pg_hba.conf").write_text("local   all       all   trust\n")
    conf = pg.pgdata / "onecard.conf"
    conf.write_text("".join(
        line for line in conf.read_text().splitlines(keepends=True)
        if not line.startswith(("archive", "basic_archive", "wal_level", "max_wal_senders"))
    ))
    dsn = pg.start()
    try:
        [row] = await _fetch(dsn, "SELECT current_setting('archive_mode') AS mode, "
                                  "current_setting('archive_library') AS lib")
        assert (row["mode"], row["lib"]) == ("on", "basic_archive")
        info = await backup(dsn, tmp_path / "backup")
        assert info.wal_archive == str(pg.wal_archive)
        assert oct(pg.wal_archive.stat().st_mode & 0o777) == "0o700"
    finally:
        pg.stop()


# -- a server of one's own -----------------------------------------------------------------------


async def test_dsn_role_without_replication_is_told_what_to_configure(
    admin_dsn: str, tmp_path: Path
) -> None:
    role = f"onecard_norepl_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN NOREPLICATION NOSUPERUSER")
        dsn = with_database(admin_dsn, "postgres").replace("postgres@", f"{role}@", 1)
        with pytest.raises(BackupError) as caught:
            await backup(dsn, tmp_path / "backup")
    finally:
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()
    message = str(caught.value)
    assert f"role {role!r} has neither REPLICATION nor SUPERUSER" in message
    for what in ("wal_level = replica", "max_wal_senders", f"ALTER ROLE {role} REPLICATION",
                 "pg_hba.conf", "host  replication", "archive_mode = on"):
        assert what in message
    assert _listing(tmp_path) == []  # nothing half-written


def test_a_password_goes_to_the_environment_not_the_command_line() -> None:
    # a program's arguments are visible to every user of the machine (ps); PGPASSWORD is not
    assert _without_password("postgresql://ops:s%40cret@db.campus:5432/onecard?sslmode=require") \
        == ("postgresql://ops@db.campus:5432/onecard?sslmode=require", {"PGPASSWORD": "s@cret"})
    embedded = "postgresql://postgres@/onecard?host=/var/lib/onecard/x/pgdata&port=5432"
    assert _without_password(embedded) == (embedded, {})

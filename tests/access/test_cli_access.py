"""The command line of contract §6 as a real subprocess: operators (password from standard
input, never echoed or logged), API keys (printed once, stored hashed), and an operator log
entry for every write it makes."""

from __future__ import annotations

import asyncio
import getpass
import secrets
import subprocess
import sys

import asyncpg

from engine.access import apikeys
from engine.service import Engine
from ledger.account import Account
from ledger.types import AccountKind
from tests.conftest import Ids
from tests.faults.harness import REPO_ROOT

PASSWORD = "a long secret pw " + secrets.token_hex(4)


def onecard(dsn: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args, "--dsn", dsn], input=stdin,
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)


async def run(dsn: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(onecard, dsn, *args, stdin=stdin)


async def log_of(dsn: str, action: str, needle: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(
            "SELECT * FROM operator_log WHERE action = $1 AND target LIKE '%' || $2 || '%' "
            "ORDER BY id", action, needle))
    finally:
        await conn.close()


async def test_operator_commands(dsn: str) -> None:
    name = "clerk-" + secrets.token_hex(3)
    short = await run(dsn, "operator", "add", "--username", name, "--role", "card_office",
                      stdin="too short\n")
    assert short.returncode == 2 and "at least 10" in short.stderr
    added = await run(dsn, "operator", "add", "--username", name, "--role", "card_office",
                      stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == f"operator {name}: created"
    again = await run(dsn, "operator", "add", "--username", name, "--role", "admin",
                      stdin=PASSWORD + "\n")
    assert again.returncode == 1 and "exists" in again.stdout
    bad_role = await run(dsn, "operator", "add", "--username", name, "--role", "topup",
                         stdin=PASSWORD + "\n")
    assert bad_role.returncode == 2  # argparse: not an operator role
    listed = await run(dsn, "operator", "list")
    assert name in listed.stdout and "card_office" in listed.stdout
    off = await run(dsn, "operator", "disable", "--username", name)
    assert off.returncode == 0 and off.stdout.strip() == f"operator {name}: disabled"
    assert (await run(dsn, "operator", "disable", "--username", name)).returncode == 1
    for p in (short, added, again, bad_role, listed, off):
        assert PASSWORD not in p.stdout + p.stderr and "too short" not in p.stdout + p.stderr
    adds = await log_of(dsn, "operator add", f"username={name} ")
    disables = await log_of(dsn, "operator disable", f"username={name}")
    assert [r["outcome"] for r in adds] == ["created", "exists"]
    assert [r["outcome"] for r in disables] == ["disabled", "already_disabled"]
    for r in adds + disables:
        assert (r["actor"], r["role"]) == (f"cli:{getpass.getuser()}", "cli")
        assert PASSWORD not in str(dict(r))


async def test_apikey_commands(dsn: str, engine: Engine, ids: Ids) -> None:
    ledger, clearing, purse = ids.ledger(), *ids.accounts(2)
    await engine.store.create_accounts([
        Account(id=clearing, ledger=ledger, kind=AccountKind.CLEARING, code=1),
        Account(id=purse, ledger=ledger, kind=AccountKind.PURSE, code=1),
    ])
    name = "wechat-" + secrets.token_hex(3)
    refused = [
        await run(dsn, "apikey", "create", "--role", "topup", "--name", name),
        await run(dsn, "apikey", "create", "--role", "admin", "--clearing", str(clearing)),
        await run(dsn, "apikey", "create", "--role", "topup", "--clearing", str(purse)),
    ]
    assert [p.returncode for p in refused] == [1, 1, 1]
    assert [p.stderr.split(": ")[-1].strip() for p in refused] == [
        "clearing_required", "clearing_not_allowed", "not_a_clearing_account"]
    made = await run(dsn, "apikey", "create", "--role", "topup", "--clearing", str(clearing),
                     "--name", name)
    assert made.returncode == 0, made.stderr
    key = next(line[5:] for line in made.stdout.splitlines() if line.startswith("key: "))
    assert apikeys.looks_like_key(key)
    assert f"clearing: {clearing} (ledger {ledger})" in made.stdout
    async with engine.store.pool.acquire() as conn:
        stored = await conn.fetchrow("SELECT * FROM api_keys WHERE name = $1", name)
    assert stored is not None and bytes(stored["key_hash"]) == apikeys.key_hash(key)
    assert key not in str(dict(stored))
    listed = await run(dsn, "apikey", "list")
    assert name in listed.stdout and key not in listed.stdout
    revoked = await run(dsn, "apikey", "revoke", "--name", name)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert (await run(dsn, "apikey", "revoke", "--name", name)).returncode == 1
    entries = await log_of(dsn, "apikey create", f"name={name}")
    assert [r["outcome"] for r in entries] == ["clearing_required", "created"]
    assert [r["outcome"] for r in await log_of(dsn, "apikey revoke", f"name={name}")] == [
        "revoked", "already_revoked"]
    for r in entries:
        assert key not in str(dict(r))

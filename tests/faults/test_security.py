"""Security of the edges: who may write, secrets kept out of logs and answers, constant-time
comparisons, parameterised SQL, and what the server listens on."""

from __future__ import annotations

import ast
import asyncio
import re
import secrets
import signal
import sys
from pathlib import Path

import httpx

from terminals.client import TerminalClient
from terminals.iso8583 import decode_message, encode_message
from tests.databases import database_name, with_database
from tests.faults.conftest import IsoTarget, Target
from tests.faults.harness import (
    ADMIN,
    ADMIN_TOKEN,
    READ,
    READ_TOKEN,
    REPO_ROOT,
    Pos,
    ServerProcess,
    free_port,
    scratch_database,
    terminate_backends,
)

SOURCE_DIRS = ("engine", "ledger", "terminals")
SECRET_NAMES = re.compile(r"token|mac|secret|pin(?!_threshold)|password|key_bytes", re.I)
SQL_CALLS = {"execute", "executemany", "fetch", "fetchrow", "fetchval", "prepare", "cursor"}


def _sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO_ROOT / d).rglob("*.py"))


# -- who may write -------------------------------------------------------------------------------


async def test_read_token_cannot_write_anywhere(target: Target) -> None:
    async with httpx.AsyncClient(base_url=target.url, timeout=10) as c:
        doc = (await c.get("/openapi.json")).json()
        posts = [
            p.replace("{card_no}", "12345678") for p, ops in doc["paths"].items() if "post" in ops
        ]
        assert "/v1/transfers" in posts
        meal = [
            {
                "id": "0b6c1e1e-0000-4000-8000-000000000009",
                "ledger": target.book.ledger,
                "debit_account_id": target.book.purses[0],
                "credit_account_id": target.book.merchants[0],
                "amount": 1,
                "code": 1,
            }
        ]
        before = await target.fingerprint()
        for path in posts:
            r = await c.post(path, json=meal, headers=READ)
            assert r.status_code == 403 and r.json()["error"] == "forbidden", (path, r.text)
            for headers in (
                {},
                {"Authorization": "Bearer nope"},
                {"Authorization": ADMIN_TOKEN},
                {"Authorization": f"Basic {ADMIN_TOKEN}"},
                {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
                {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
            ):
                r = await c.post(path, json=meal, headers=headers)
                assert r.status_code == 401 and r.json()["error"] == "unauthorized", (path, r.text)
                assert ADMIN_TOKEN not in r.text
        assert await target.fingerprint() == before
        # Reads: the read token works, no token does not.
        balance = f"/v1/accounts/{target.book.purses[0]}/balance"
        assert (await c.get(balance, headers=READ)).status_code == 200
        assert (await c.get(balance, headers=ADMIN)).status_code == 200
        assert (await c.get(balance)).status_code == 401
        for open_path in ("/healthz", "/metrics", "/openapi.json"):
            r = await c.get(open_path)
            assert r.status_code == 200, open_path
            assert ADMIN_TOKEN not in r.text and READ_TOKEN not in r.text


# -- secrets stay out of logs --------------------------------------------------------------------


async def test_no_secret_in_logs_or_answers(admin_dsn: str, tmp_path: Path) -> None:
    """A verbose server with a password in its DSN goes through bad tokens, a registered
    terminal key, database faults and a shutdown; then a start-up failure. No secret may
    appear in anything it printed."""
    password = "pw-" + secrets.token_hex(8)
    mac_key = secrets.token_hex(32)
    async with scratch_database(admin_dsn) as dsn:
        head, _, rest = dsn.partition("://")
        user, _, host = rest.partition("@")
        secret_dsn = f"{head}://{user}:{password}@{host}"
        server = ServerProcess(secret_dsn, tmp_path / "server.log", verbose=True)
        server.start()
        try:
            await server.wait_ready()
            async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as c:
                for token in (ADMIN_TOKEN + "x", READ_TOKEN):
                    await c.post(
                        "/v1/transfers", json=[], headers={"Authorization": f"Bearer {token}"}
                    )
                await c.post(
                    "/v1/accounts", json=[{"id": 1, "ledger": 1, "kind": "utility"}], headers=ADMIN
                )
                r = await c.post(
                    "/v1/terminals",
                    headers=ADMIN,
                    json={
                        "terminal_id": "T0000001",
                        "merchant_id": "M00000000000001",
                        "ledger": 1,
                        "kind": "pos",
                        "account_id": 1,
                        "mac_key": mac_key,
                    },
                )
                assert r.status_code in (200, 404), r.text
                assert mac_key not in r.text
                for _ in range(3):
                    await terminate_backends(admin_dsn, database_name(dsn))
                    await c.get("/v1/accounts/1/balance", headers=READ)
                    await asyncio.sleep(0.1)
                assert mac_key not in (await c.get("/metrics")).text
            server.send_signal(signal.SIGTERM)
            assert await server.wait_exit() == 0
        finally:
            await server.stop()
        log = server.log_text()
        # A failed start names what failed, not the password.
        bad = with_database(f"{head}://{user}:{password}@127.0.0.1:{free_port()}/x", "x")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--dsn",
            bad,
            "--no-iso",
            "--http",
            f"127.0.0.1:{free_port()}",
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode not in (0, None)
    assert "HTTP API on" in log  # the verbose server did log
    for name, secret in [
        ("admin token", ADMIN_TOKEN),
        ("read token", READ_TOKEN),
        ("DSN password", password),
        ("MAC key", mac_key),
        ("MAC key", mac_key.upper()),
    ]:
        assert secret not in log, f"{name} in the server log"
        assert secret not in out.decode(errors="replace"), f"{name} in the start-up error"


# -- static guarantees over the source -----------------------------------------------------------


def _identifiers(node: ast.AST) -> set[str]:
    names: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "len":
            continue
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, ast.Attribute):
            names.add(n.attr)
    return names


def _compare_offenders(paths: list[Path]) -> list[str]:
    """``==``/``!=`` comparisons touching a token, MAC, PIN or key."""
    offenders = []
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                continue
            operands = [node.left, *node.comparators]
            if any(
                isinstance(o, ast.Call) and getattr(o.func, "id", "") == "len" for o in operands
            ):
                continue
            if all(isinstance(o, ast.Constant) and o.value is None for o in node.comparators):
                continue
            hits = {n for o in operands for n in _identifiers(o) if SECRET_NAMES.search(n)}
            if hits:
                offenders.append(f"{path.name}:{node.lineno} {sorted(hits)}")
    return offenders


def test_secrets_are_compared_in_constant_time() -> None:
    """No ``==``/``!=`` on tokens, MACs, PINs or keys anywhere: hmac.compare_digest only."""
    assert not (offenders := _compare_offenders(_sources())), offenders
    api = (REPO_ROOT / "engine" / "http" / "auth.py").read_text()  # the token check
    mac = (REPO_ROOT / "terminals" / "mac.py").read_text()
    assert "hmac.compare_digest" in api and "hmac.compare_digest" in mac


def _dynamic(node: ast.AST) -> bool:
    """True for SQL text built at run time: f-strings, +, % or .format()."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
        return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("format", "join", "replace")
    )


def _sql_offenders(paths: list[Path]) -> list[str]:
    """Database calls, inside functions, whose statement text is built at run time."""
    offenders = []
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            built = {
                t.id
                for n in ast.walk(fn)
                if isinstance(n, ast.Assign) and _dynamic(n.value)
                for t in n.targets
                if isinstance(t, ast.Name)
            }
            for call in ast.walk(fn):
                if not (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr in SQL_CALLS
                    and call.args
                ):
                    continue
                sql = call.args[0]
                if _dynamic(sql) or (isinstance(sql, ast.Name) and sql.id in built):
                    offenders.append(f"{path.name}:{call.lineno}")
    return offenders


def test_all_sql_is_parameterised() -> None:
    """Every statement handed to the database is a named constant or literal text; values
    travel as parameters. Module-level statements may be assembled from constants at import
    time, but nothing inside a function may build SQL text."""
    assert not (offenders := _sql_offenders(_sources())), offenders


def test_the_source_checks_catch_violations(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "SQL_OK = f'SELECT {1}'\n"
        "async def f(conn, who, token, mac):\n"
        "    await conn.execute(SQL_OK, who)\n"
        "    await conn.fetch(f'SELECT * FROM t WHERE name = {who}')\n"
        "    q = 'SELECT ' + who\n"
        "    await conn.fetchrow(q)\n"
        "    await conn.fetchval('SELECT %s' % who)\n"
        "    if token == 'x' or len(mac) != 8 or mac is None:\n"
        "        return request.mac != mac\n"
    )
    assert _sql_offenders([bad]) == ["bad.py:4", "bad.py:6", "bad.py:7"]
    assert _compare_offenders([bad]) == ["bad.py:8 ['token']", "bad.py:9 ['mac']"]


def test_server_binds_loopback_by_default() -> None:
    from engine.config import DEFAULT_HTTP, DEFAULT_ISO

    assert DEFAULT_HTTP.startswith("127.0.0.1:") and DEFAULT_ISO.startswith("127.0.0.1:")


# -- terminals -----------------------------------------------------------------------------------


async def test_a_terminal_touches_only_its_own_account_and_transfers(iso_target: IsoTarget) -> None:
    """A terminal cannot reverse another terminal's purchase (field 90 is read in its own
    namespace), cannot pose as another merchant (03) or another terminal (63), and an unknown
    terminal gets an unMACed 63. Only the one honest purchase moves money."""
    campus = iso_target.campus
    a, b = campus.terminals[0], campus.terminals[1]
    holder = campus.holders[1]

    def client(pos: Pos, *, tid: str | None = None, mid: str | None = None) -> TerminalClient:
        return TerminalClient(
            "127.0.0.1",
            iso_target.port,
            terminal_id=tid or pos.terminal_id,
            merchant_id=mid or pos.merchant_id,
            mac_key=pos.key,
            timeout_s=5,
        )

    async def balances() -> dict[int, int]:
        async with httpx.AsyncClient(base_url=iso_target.server.base_url, timeout=10) as c:
            out = {}
            for acc in (a.account, b.account, holder.purse, holder.subsidy):
                r = await c.get(f"/v1/accounts/{acc}/balance", headers=READ)
                out[acc] = r.json()["balance"]
            return out

    before = await balances()
    async with client(b) as cb, client(a) as ca:
        bought = cb.purchase(holder.card_no, 100)
        assert (await cb.request(bought)).response_code == "00"
        # A names B's purchase in field 90: A's own namespace, so nothing of B's is undone.
        assert (await ca.request(ca.reversal(bought))).response_code == "00"
    async with client(a, mid=b.merchant_id) as posing:
        assert (await posing.request(posing.purchase(holder.card_no, 100))).response_code == "03"
    async with client(a, tid=b.terminal_id, mid=b.merchant_id) as forged:
        # The 63 is MACed with B's key, which A cannot check: read it raw.
        raw = await forged.send_raw(encode_message(forged.purchase(holder.card_no, 100), a.key))
        assert raw is not None and decode_message(raw).message.response_code == "63"
    async with client(a, tid="NOSUCH01") as stranger:
        assert (
            await stranger.request(stranger.purchase(holder.card_no, 100))
        ).response_code == "63"
    after = await balances()
    assert after[b.account] - before[b.account] == 100
    assert after[a.account] == before[a.account]
    spent = (before[holder.purse] + before[holder.subsidy]) - (
        after[holder.purse] + after[holder.subsidy]
    )
    assert spent == 100
    log = iso_target.server.log_text()
    for pos in campus.terminals:
        assert pos.key.hex() not in log.lower()

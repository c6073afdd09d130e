"""``onecard rotate-secret`` keeps every terminal and PIN working: a real ISO 8583 purchase with
a PIN over TCP before the rotation, after it on the same running gateway (its key file is
re-read), and after a restart that knows only the new key."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from engine.access import sealing
from engine.access.secretbox import SecretBox, SecretError, box_for, read_key_file
from engine.campus import Campus
from engine.db.migrate import migrate
from engine.service import Engine
from terminals.client import TerminalClient
from terminals.gateway import Gateway
from tests.conftest import Ids
from tests.databases import scratch_database
from tests.faults.harness import REPO_ROOT
from tests.terminals.test_gateway_flows import World

PIN = "4321"


@pytest.fixture
async def scratch(admin_dsn: str) -> AsyncIterator[str]:
    """A database of its own: every secret in it is sealed under this test's key."""
    async with scratch_database(admin_dsn, prefix="onecard_rotate") as url:
        conn = await asyncpg.connect(url)
        await migrate(conn)
        await conn.close()
        yield url


async def _buy(world: World, client_of: str, card: str, amount: int, pin: str) -> str:
    client = getattr(world, client_of)
    ans = await client.request(client.purchase(card, amount, pin=pin))
    code: str = ans.response_code
    return code


def _rotate(dsn: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ONECARD_SECRET_KEY"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "rotate-secret", "--dsn", dsn, "--data-dir",
         str(data_dir)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


async def test_rotation_keeps_every_terminal_and_pin_working(
    scratch: str, tmp_path: Path, ids: Ids, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ONECARD_SECRET_KEY", raising=False)
    engine = Engine(scratch)
    await engine.start(run_migrations=False)
    box = box_for(tmp_path)  # as `onecard serve --data-dir tmp_path` would
    campus = Campus(engine, secrets=box)
    gateway = Gateway(engine, campus=campus)
    await gateway.start("127.0.0.1", 0)
    world = await World(engine, campus, gateway, ids).setup()
    restarted: Gateway | None = None
    try:
        p = await world.person(cash=10_000, pin=PIN, pin_threshold=0)
        assert await _buy(world, "pos", p.card, 100, PIN) == "00"
        assert await _buy(world, "pos", p.card, 100, "0000") == "55"
        old_key = box.key_id

        done = await asyncio.to_thread(_rotate, scratch, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "re-sealed 1 PINs and 4 MAC keys" in done.stdout
        ring = read_key_file(tmp_path / "secret.key", create=False)
        new_only = SecretBox(ring[:1])
        assert new_only.key_id != old_key
        async with engine.store.pool.acquire() as conn:
            assert await sealing.key_ids(conn) == {new_only.key_id: 5}
            entry = await conn.fetchrow("SELECT * FROM operator_log WHERE action = "
                                        "'rotate-secret' ORDER BY id DESC LIMIT 1")
        assert entry is not None and entry["role"] == "cli"
        assert entry["target"] == f"key {old_key} -> {new_only.key_id}"
        assert entry["outcome"] == "pins=1 mac_keys=4"

        # the running gateway: its terminals' keys are in memory, the PIN is re-read sealed
        # under the new key, which it loads from the key file
        assert await _buy(world, "pos", p.card, 100, PIN) == "00"
        assert await _buy(world, "pos", p.card, 100, "9999") == "55"
        # a card issued after the rotation, by the running engine, is sealed under the new key
        q = await world.person(cash=1_000, pin="1357", pin_threshold=0)
        async with engine.store.pool.acquire() as conn:
            assert await sealing.key_ids(conn) == {new_only.key_id: 6}

        # a restart that knows only the new key: terminals (MAC) and PINs all work
        restarted = Gateway(engine, campus=Campus(engine, secrets=new_only))
        await restarted.start("127.0.0.1", 0)
        for term in (world.pos, world.kiosk):
            async with TerminalClient("127.0.0.1", restarted.port, terminal_id=term.terminal_id,
                                      merchant_id=term.merchant_id, mac_key=world.key,
                                      timeout_s=10) as c:
                assert (await c.request(c.sign_on(stan="900001"))).response_code == "00"
                # STANs of its own: the first client's STANs within the same second (field 7)
                # would be retransmissions of other requests
                for stan, card, pin in (("900002", p.card, PIN), ("900003", q.card, "1357")):
                    ans = await c.request(c.purchase(card, 10, pin=pin, stan=stan))
                    assert ans.response_code == "00", (term.terminal_id, card)
                ans = await c.request(c.purchase(p.card, 10, pin="0000", stan="900004"))
                assert ans.response_code == "55"
        # and the old key alone opens nothing any more: its terminals are unknown (63)
        old_only = Campus(engine, secrets=SecretBox(ring[1:]))
        assert await old_only.terminal(world.meter.terminal_id) is None
        with pytest.raises(SecretError, match="unknown key"):
            await old_only.get_card(p.card)
    finally:
        await world.close()
        await gateway.stop()
        if restarted is not None:
            await restarted.stop()
        await engine.stop()

"""Secrets at rest (contract §6 via issue 12): card PINs and terminal MAC keys are sealed with
AES-256-GCM under a key outside the database. A dump of the tables reveals neither; an older
database's clear values are sealed on first start; a wrong key refuses to start."""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.access import sealing
from engine.access.secretbox import (
    SecretBox,
    SecretError,
    SecretKeyError,
    box_for,
    new_key,
    open_pin,
    read_key_file,
    seal_mac_key,
    seal_pin,
    write_key_file,
)
from engine.campus import (
    Campus,
    Card,
    HolderKind,
    HolderResult,
    Outcome,
    RegistryStatus,
    TerminalKind,
)
from engine.campus.pin import pin_block
from engine.db.embedded.programs import wheel_install
from engine.service import Engine
from ledger.account import Account
from ledger.types import AccountKind
from tests.databases import scratch_database

PIN = "802461"


def test_sealed_values_open_only_for_their_row_and_key() -> None:
    box = SecretBox([new_key()])
    blob = seal_pin(box, 1, "12345678", PIN)
    assert PIN.encode() not in blob and len(blob) == 1 + 4 + 12 + len(PIN) + 16
    assert open_pin(box, 1, "12345678", blob) == PIN
    with pytest.raises(SecretError, match="another row"):
        open_pin(box, 1, "87654321", blob)  # copied onto another card
    with pytest.raises(SecretError, match="another row"):
        open_pin(box, 2, "12345678", blob)  # or another ledger
    with pytest.raises(SecretError, match="altered"):
        open_pin(box, 1, "12345678", blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(SecretError, match="unknown key"):
        open_pin(SecretBox([new_key()]), 1, "12345678", blob)
    with pytest.raises(SecretError):
        open_pin(box, 1, "12345678", b"\x01short")
    # a ring opens what any of its keys sealed, and seals with its first key
    old, new = new_key(), new_key()
    sealed_old = seal_pin(SecretBox([old]), 1, "12345678", PIN)
    ring = SecretBox([new, old])
    assert open_pin(ring, 1, "12345678", sealed_old) == PIN
    assert open_pin(SecretBox([new]), 1, "12345678", seal_pin(ring, 1, "12345678", PIN)) == PIN


def test_key_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONECARD_SECRET_KEY", raising=False)
    box = box_for(tmp_path)
    key_file = tmp_path / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert box_for(tmp_path).key_id == box.key_id  # created once, then read
    os.chmod(key_file, 0o640)
    with pytest.raises(SecretKeyError, match="chmod 600"):
        box_for(tmp_path)
    os.chmod(key_file, 0o600)
    with pytest.raises(SecretKeyError, match="does not exist"):
        box_for(tmp_path / "elsewhere", create=False)
    a, b = new_key(), new_key()
    monkeypatch.setenv("ONECARD_SECRET_KEY", f"{a.hex()},{b.hex()}")
    env = box_for(None)
    assert env.key_id == SecretBox([a]).key_id
    monkeypatch.setenv("ONECARD_SECRET_KEY", "not-hex")
    with pytest.raises(SecretKeyError, match="hex"):
        box_for(None)


def test_a_box_follows_a_rotated_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.delenv("ONECARD_SECRET_KEY", raising=False)
    running = box_for(tmp_path)
    old = read_key_file(tmp_path / "secret.key", create=False)
    fresh = new_key()
    write_key_file(tmp_path / "secret.key", [fresh, old[0]], replace=True)
    sealed_new = seal_pin(SecretBox([fresh]), 3, "11112222", PIN)
    running.maybe_reload(force=True)
    assert open_pin(running, 3, "11112222", sealed_new) == PIN
    assert running.key_id == SecretBox([fresh]).key_id  # and it now seals with the new key


# -- the database ---------------------------------------------------------------------------------


@pytest.fixture
async def scratch(admin_dsn: str) -> AsyncIterator[str]:
    async with scratch_database(admin_dsn, prefix="onecard_secrets") as url:
        yield url


def dump(dsn: str, *tables: str) -> str:
    """pg_dump (the embedded wheel's) of the data of ``tables``."""
    args = [str(wheel_install().bin("pg_dump")), "--data-only", "--no-owner"]
    for t in tables:
        args += ["-t", t]
    out = subprocess.run([*args, dsn], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


def copy_block(text: str, table: str) -> str:
    """The COPY rows of one table in a dump."""
    start = text.index(f"COPY public.{table} ")
    return text[start : text.index("\\.", start)]


async def _world(engine: Engine, campus: Campus, mac_key: bytes) -> tuple[str, str]:
    ledger, merchant = 5, 500
    await engine.store.create_accounts([Account(id=merchant, ledger=ledger,
                                                kind=AccountKind.MERCHANT, code=1)])
    r = await campus.create_holder(holder_id="D1", ledger=ledger, name="n",
                                   kind=HolderKind.STUDENT)
    assert isinstance(r, HolderResult)
    card = "6200" + "".join(secrets.choice("0123456789") for _ in range(12))
    c = await campus.create_card(card_no=card, holder_id="D1", ledger=ledger, pin=PIN)
    assert isinstance(c, Card)
    tid = "D" + secrets.token_hex(4)[:7].upper()
    st = await campus.register_terminal(terminal_id=tid, merchant_id="M" * 15, ledger=ledger,
                                        kind=TerminalKind.POS, account_id=merchant,
                                        mac_key=mac_key)
    assert st is RegistryStatus.CREATED
    return card, tid


async def test_a_dump_reveals_no_pin_and_no_mac_key(scratch: str) -> None:
    engine = Engine(scratch)
    await engine.start()
    try:
        box = SecretBox([new_key()])
        mac_key = secrets.token_bytes(32)
        card, tid = await _world(engine, Campus(engine, secrets=box), mac_key)
        text = await asyncio.to_thread(dump, scratch)  # every table
        cards = copy_block(text, "cards")
        assert card in cards and PIN not in cards
        for form in (mac_key.hex(), mac_key.hex().upper()):
            assert form not in text
        # and yet the engine with the key still has both (a fresh campus: nothing cached)
        reader = Campus(engine, secrets=box)
        term = await reader.terminal(tid)
        assert term is not None and term.mac_key == mac_key
        got = await reader.get_card(card)
        assert got is not None and got.pin == PIN
    finally:
        await engine.stop()


async def test_first_start_seals_an_older_databases_clear_secrets(scratch: str) -> None:
    engine = Engine(scratch)
    await engine.start()
    try:
        box = SecretBox([new_key()])
        mac_key = secrets.token_bytes(32)
        card, tid = await _world(engine, Campus(engine, secrets=box), mac_key)
        async with engine.store.pool.acquire() as conn:
            # what an engine before secrets at rest left behind: the values in clear
            await conn.execute("UPDATE cards SET pin = $2, pin_enc = NULL WHERE card_no = $1",
                               card, PIN)
            await conn.execute("UPDATE terminals SET mac_key = $2, mac_key_enc = NULL "
                               "WHERE terminal_id = $1", tid, mac_key)
            before = await asyncio.to_thread(dump, scratch, "cards", "terminals")
            assert PIN in copy_block(before, "cards") and mac_key.hex() in before
            with pytest.raises(SecretKeyError, match="sealed under key id"):
                # a value sealed under another key: this engine's key is the wrong one
                await conn.execute("UPDATE cards SET pin_enc = $2 WHERE card_no = $1", card,
                                   seal_pin(SecretBox([new_key()]), 5, card, PIN))
                await sealing.prepare(conn, box)
            await conn.execute("UPDATE cards SET pin_enc = NULL WHERE card_no = $1", card)
            done = await sealing.prepare(conn, box)
            assert (done.pins, done.mac_keys) == (1, 1)
            assert (await sealing.prepare(conn, box)) == sealing.Sealed(0, 0)  # once
        after = await asyncio.to_thread(dump, scratch, "cards", "terminals")
        assert PIN not in copy_block(after, "cards") and mac_key.hex() not in after
        campus = Campus(engine, secrets=box)
        term = await campus.terminal(tid)
        assert term is not None and term.mac_key == mac_key
        got = await campus.get_card(card)
        assert got is not None and got.pin == PIN
    finally:
        await engine.stop()


async def test_rotation_reseals_everything_in_one_transaction(scratch: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.delenv("ONECARD_SECRET_KEY", raising=False)
    engine = Engine(scratch)
    await engine.start()
    try:
        box = box_for(tmp_path)
        mac_key = secrets.token_bytes(32)
        card, tid = await _world(engine, Campus(engine, secrets=box), mac_key)
        async with engine.store.pool.acquire() as conn:
            old_ids = await sealing.key_ids(conn)
            assert old_ids == {box.key_id: 2}
            # a value that does not open stops the rotation before anything changes
            await conn.execute("UPDATE terminals SET mac_key_enc = $2 WHERE terminal_id = $1",
                               tid, seal_mac_key(box, 5, "WRONGROW", mac_key))
            with pytest.raises(SecretKeyError, match=f"terminal {tid}"):
                await sealing.rotate(conn, box, SecretBox([new_key()]))
            assert await sealing.key_ids(conn) == old_ids
            await conn.execute("UPDATE terminals SET mac_key_enc = $2 WHERE terminal_id = $1",
                               tid, seal_mac_key(box, 5, tid, mac_key))
            done = await sealing.rotate_installation(conn, tmp_path)
            assert (done.sealed.pins, done.sealed.mac_keys) == (1, 1)
            assert await sealing.key_ids(conn) == {done.new_key_id: 2}
        ring = read_key_file(tmp_path / "secret.key", create=False)
        only_new = SecretBox(ring[:1])
        assert only_new.key_id == done.new_key_id
        fresh = Campus(engine, secrets=only_new)
        term = await fresh.terminal(tid)
        assert term is not None and term.mac_key == mac_key
        got = await fresh.get_card(card)
        assert got is not None and got.pin == PIN
    finally:
        await engine.stop()


async def test_a_pin_that_does_not_open_fails_only_its_own_payment(scratch: str) -> None:
    engine = Engine(scratch)
    await engine.start()
    try:
        box = SecretBox([new_key()])
        campus = Campus(engine, secrets=box)
        mac_key = secrets.token_bytes(32)
        card, tid = await _world(engine, campus, mac_key)
        other = "6300" + "".join(secrets.choice("0123456789") for _ in range(12))
        r = await campus.create_holder(holder_id="D2", ledger=5, name="m",
                                       kind=HolderKind.STUDENT)
        assert isinstance(r, HolderResult)
        assert isinstance(await campus.create_card(card_no=other, holder_id="D2", ledger=5,
                                                   pin=PIN, pin_threshold=0), Card)
        async with engine.store.pool.acquire() as conn:  # a value copied from another row
            await conn.execute("UPDATE cards SET pin_enc = $2, pin_threshold = 0 "
                               "WHERE card_no = $1", card, seal_pin(box, 5, other, PIN))
        term = await campus.terminal(tid)
        assert term is not None
        results = await asyncio.gather(*(
            campus.purchase(term, card_no=c, amount=1, key=uuid.uuid4(),
                            pin_block=pin_block(mac_key, c, PIN))
            for c in (card, other)))
        # the copied PIN is refused; the other card in the same shared read is judged on its
        # own (insufficient funds: its PIN was right)
        assert [x.outcome for x in results] == [Outcome.INCORRECT_PIN, Outcome.INSUFFICIENT_FUNDS]
    finally:
        await engine.stop()

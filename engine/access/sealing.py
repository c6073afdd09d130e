"""The database side of secrets at rest: seal the clear values left by an older engine, check
that this key opens what is stored, and re-seal everything under a new key (rotation).

``prepare`` runs on every start of ``onecard serve`` and ``onecard migrate`` (the migration path
of an existing database: its clear PINs and MAC keys are sealed under the key on first start).
``rotate`` is ``onecard rotate-secret``: one transaction re-seals every PIN and MAC key; cards and
terminals are locked against writes meanwhile (reads, hence payments, go on).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from engine.access.secretbox import (
    ENV_KEY,
    KEY_FILE,
    SecretBox,
    SecretError,
    SecretKeyError,
    key_id,
    new_key,
    open_mac_key,
    open_pin,
    parse_keys,
    read_key_file,
    seal_mac_key,
    seal_pin,
    write_key_file,
)

Conn = asyncpg.Connection | PoolConnectionProxy

# The key ids (bytes 2..5 of a sealed value) in use, with how many values each seals.
SQL_KEY_IDS: Final = """
SELECT kid, sum(n)::bigint AS n FROM (
    SELECT substring(pin_enc FROM 2 FOR 4) AS kid, count(*) AS n FROM cards
    WHERE pin_enc IS NOT NULL GROUP BY 1
    UNION ALL
    SELECT substring(mac_key_enc FROM 2 FOR 4), count(*) FROM terminals
    WHERE mac_key_enc IS NOT NULL GROUP BY 1
) k GROUP BY kid
"""
SQL_LOCK: Final = "LOCK TABLE cards, terminals IN SHARE ROW EXCLUSIVE MODE"
SQL_CARD_SECRETS: Final = """
SELECT ledger, card_no, pin, pin_enc FROM cards
WHERE pin IS NOT NULL OR (pin_enc IS NOT NULL AND $1)
"""
SQL_TERMINAL_SECRETS: Final = """
SELECT ledger, terminal_id, mac_key, mac_key_enc FROM terminals
WHERE mac_key IS NOT NULL OR (mac_key_enc IS NOT NULL AND $1)
"""
SQL_SEAL_CARDS: Final = """
UPDATE cards c SET pin_enc = x.enc, pin = NULL
FROM unnest($1::int[], $2::text[], $3::bytea[]) AS x(ledger, card_no, enc)
WHERE c.ledger = x.ledger AND c.card_no = x.card_no
"""
SQL_SEAL_TERMINALS: Final = """
UPDATE terminals t SET mac_key_enc = x.enc, mac_key = NULL
FROM unnest($1::int[], $2::text[], $3::bytea[]) AS x(ledger, terminal_id, enc)
WHERE t.ledger = x.ledger AND t.terminal_id = x.terminal_id
"""


class Sealed(msgspec.Struct, frozen=True):
    """How many card PINs and terminal MAC keys a step sealed."""

    pins: int
    mac_keys: int


async def key_ids(conn: Conn) -> dict[str, int]:
    """Hex key id -> how many stored values it seals."""
    return {bytes(r["kid"]).hex(): r["n"] for r in await conn.fetch(SQL_KEY_IDS)}


async def check_keys(conn: Conn, box: SecretBox) -> None:
    """Raise SecretKeyError unless ``box`` holds every key the stored values were sealed with
    (an engine started with the wrong key would refuse every PIN and every terminal)."""
    box.maybe_reload(force=True)
    unknown = [kid for kid in await key_ids(conn) if not box.knows(bytes.fromhex(kid))]
    if unknown:
        raise SecretKeyError(
            f"values in this database are sealed under key id(s) {', '.join(unknown)}, which "
            f"this engine's key (id {box.key_id}) is not: restore the right secret.key or "
            "ONECARD_SECRET_KEY"
        )


async def _reseal(conn: Conn, old: SecretBox, new: SecretBox, *, every: bool) -> Sealed:
    """Seal the clear values (and, when ``every``, re-seal the sealed ones) under ``new``."""
    cards = await conn.fetch(SQL_CARD_SECRETS, every)
    pins = []
    for r in cards:
        try:
            pin = r["pin"] or open_pin(old, r["ledger"], r["card_no"], r["pin_enc"])
        except SecretError as e:
            raise SecretKeyError(f"card {r['card_no']}: its PIN {e}") from None
        pins.append(seal_pin(new, r["ledger"], r["card_no"], pin))
    await conn.execute(SQL_SEAL_CARDS, [r["ledger"] for r in cards],
                       [r["card_no"] for r in cards], pins)
    terminals = await conn.fetch(SQL_TERMINAL_SECRETS, every)
    keys = []
    for r in terminals:
        tid = r["terminal_id"]
        try:
            clear = r["mac_key"]
            key = bytes(clear) if clear is not None else open_mac_key(
                old, r["ledger"], tid, r["mac_key_enc"])
        except SecretError as e:
            raise SecretKeyError(f"terminal {tid}: its MAC key {e}") from None
        keys.append(seal_mac_key(new, r["ledger"], tid, key))
    await conn.execute(SQL_SEAL_TERMINALS, [r["ledger"] for r in terminals],
                       [r["terminal_id"] for r in terminals], keys)
    return Sealed(len(pins), len(keys))


async def prepare(conn: Conn, box: SecretBox) -> Sealed:
    """On start: check the key against what is stored, then seal any clear PIN and MAC key
    (rows an engine before secrets at rest wrote), in one transaction."""
    async with conn.transaction():
        await check_keys(conn, box)
        return await _reseal(conn, box, box, every=False)


async def rotate(conn: Conn, old: SecretBox, new: SecretBox) -> Sealed:
    """Re-seal every PIN and MAC key (clear ones too) from ``old`` to ``new`` in one
    transaction; nothing changes if any value does not open."""
    async with conn.transaction():
        await conn.execute(SQL_LOCK)
        return await _reseal(conn, old, new, every=True)


class Rotation(msgspec.Struct, frozen=True):
    """What ``rotate_installation`` did: from which key id to which, and how much it re-sealed."""

    old_key_id: str
    new_key_id: str
    sealed: Sealed


async def rotate_installation(conn: Conn, data_dir: str | Path) -> Rotation:
    """``onecard rotate-secret``. With a key file: a new key is made, written first in the file
    with the old one after it (so every engine keeps opening both, whatever it reads when),
    then everything is re-sealed under it in one transaction. With ``ONECARD_SECRET_KEY``
    (which this process cannot change): everything is re-sealed under the first key listed
    there, so rotating means listing ``NEW,OLD``, running this, then dropping OLD."""
    env = os.environ.get(ENV_KEY, "").strip()
    if env:
        ring = parse_keys(env, origin=ENV_KEY)
        old, new = SecretBox(ring), SecretBox(ring[:1])
        await check_keys(conn, old)
        return Rotation(old.key_id, new.key_id, await rotate(conn, old, new))
    path = Path(data_dir) / KEY_FILE
    ring = read_key_file(path, create=False)
    old = SecretBox(ring)
    await check_keys(conn, old)  # before the file changes: a wrong key stops here
    fresh = new_key()
    write_key_file(path, [fresh, ring[0]], replace=True)
    return Rotation(old.key_id, key_id(fresh).hex(), await rotate(conn, old, SecretBox([fresh])))

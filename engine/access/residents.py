"""Residents (contract §6): which dorm room a holder lives in, at most one at a time.

The room and the holder must be of the same campus (ledger); the holder is found by id alone
(its ledger decides where the room is looked up). A holder living elsewhere must be removed
from that room first: moving someone is two deliberate steps, never a silent overwrite.
"""

from __future__ import annotations

import enum
import time
from typing import Final

from engine.access.holders import resolve_holder
from engine.access.lockout import Conn
from engine.access.refused import Refused

SQL_ROOM_EXISTS: Final = "SELECT 1 FROM rooms WHERE ledger = $1 AND room_id = $2"
SQL_ADD: Final = """
INSERT INTO room_residents (ledger, holder_id, room_id, created_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (ledger, holder_id) DO NOTHING RETURNING room_id
"""
SQL_ROOM_OF: Final = "SELECT room_id FROM room_residents WHERE ledger = $1 AND holder_id = $2"
SQL_REMOVE: Final = """
DELETE FROM room_residents WHERE ledger = $1 AND holder_id = $2 AND room_id = $3
RETURNING holder_id
"""
SQL_RESIDENTS: Final = """
SELECT holder_id FROM room_residents WHERE ledger = $1 AND room_id = $2 ORDER BY holder_id
"""


class ResidentStatus(enum.StrEnum):
    """Outcome of adding or removing a resident (contract §6)."""

    CREATED = "created"
    EXISTS = "exists"
    REMOVED = "removed"


async def _place(conn: Conn, room_id: str, holder_id: str) -> int | Refused:
    ledger = await resolve_holder(conn, holder_id)
    if isinstance(ledger, Refused):
        return ledger
    if await conn.fetchval(SQL_ROOM_EXISTS, ledger, room_id) is None:
        return Refused("room_not_found", f"no room {room_id!r} in ledger {ledger}",
                       not_found=True)
    return ledger


async def add_resident(
    conn: Conn, room_id: str, holder_id: str, *, now: int | None = None
) -> ResidentStatus | Refused:
    """The holder lives in the room from now on: CREATED, or EXISTS when it already did;
    refused when the holder lives in another room."""
    ledger = await _place(conn, room_id, holder_id)
    if isinstance(ledger, Refused):
        return ledger
    added = await conn.fetchval(SQL_ADD, ledger, holder_id, room_id,
                                now if now is not None else time.time_ns())
    if added is not None:
        return ResidentStatus.CREATED
    current = await conn.fetchval(SQL_ROOM_OF, ledger, holder_id)
    if current == room_id:
        return ResidentStatus.EXISTS
    return Refused("holder_lives_elsewhere",
                   f"holder {holder_id!r} lives in room {current!r}; remove them there first")


async def remove_resident(conn: Conn, room_id: str, holder_id: str) -> ResidentStatus | Refused:
    """The holder no longer lives in the room: REMOVED, or refused (404) when they did not."""
    ledger = await _place(conn, room_id, holder_id)
    if isinstance(ledger, Refused):
        return ledger
    if await conn.fetchval(SQL_REMOVE, ledger, holder_id, room_id) is None:
        return Refused("not_resident", f"holder {holder_id!r} does not live in room {room_id!r}",
                       not_found=True)
    return ResidentStatus.REMOVED


async def room_of(conn: Conn, ledger: int, holder_id: str) -> str | None:
    """The room the holder lives in, or None (the self-service electricity page)."""
    room: str | None = await conn.fetchval(SQL_ROOM_OF, ledger, holder_id)
    return room


async def residents(conn: Conn, ledger: int, room_id: str) -> list[str]:
    """The holder ids living in the room."""
    return [r["holder_id"] for r in await conn.fetch(SQL_RESIDENTS, ledger, room_id)]

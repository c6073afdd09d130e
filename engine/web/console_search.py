"""The holder search of the console (contract §8): by holder id, name (any case) or card number,
each a prefix, each an index range scan (migration 0025's "C"-collated indexes)."""

from __future__ import annotations

from typing import Any, Final

import asyncpg
import msgspec
from litestar import Request, Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromQuery

from engine import limits
from engine.access.roles import Right
from engine.web import render
from engine.web.console_auth import require

# A prefix range in byte order: [$1, $2) over the "C"-collated indexes of migration 0025.
SQL_SEARCH_ID: Final = """
SELECT ledger, id, name, kind FROM holders
WHERE id COLLATE "C" >= $1 AND id COLLATE "C" < $2 ORDER BY id COLLATE "C", ledger LIMIT $3
"""
SQL_SEARCH_NAME: Final = """
SELECT ledger, id, name, kind FROM holders
WHERE lower(name) COLLATE "C" >= $1 AND lower(name) COLLATE "C" < $2
ORDER BY lower(name) COLLATE "C", ledger, id LIMIT $3
"""
# Every holder with exactly this id (one per ledger at most): the holders_id index.
SQL_SAME_ID: Final = """
SELECT ledger, id, name, kind FROM holders WHERE id = $1 ORDER BY ledger LIMIT $2
"""
SQL_SEARCH_CARD: Final = """
SELECT h.ledger, h.id, h.name, h.kind FROM cards c
JOIN holders h ON h.ledger = c.ledger AND h.id = c.holder_id
WHERE c.card_no COLLATE "C" >= $1 AND c.card_no COLLATE "C" < $2
ORDER BY c.card_no COLLATE "C", c.ledger LIMIT $3
"""

class Found(msgspec.Struct, frozen=True):
    """A holder in the search's answer."""

    ledger: int
    id: str
    name: str
    kind: str


def prefix_range(prefix: str) -> tuple[str, str]:
    """The byte-order range [low, high) of every text starting with ``prefix`` (non-empty)."""
    head = prefix.rstrip("\U0010ffff")
    if not head:  # only the last code point: no upper bound short of everything
        return prefix, "\U0010ffff" * (len(prefix) + 1)
    return prefix, head[:-1] + chr(ord(head[-1]) + 1)


async def search_holders(conn: asyncpg.Connection[Any] | Any, text: str) -> list[Found]:
    """Holders whose id, name (any case) or card number starts with ``text``."""
    q = text.strip()
    if not q:
        return []
    rows_limit = limits.CONSOLE_SEARCH_ROWS
    found: dict[tuple[int, str], Found] = {}
    lowered = q.lower()
    for sql, key in ((SQL_SEARCH_ID, q), (SQL_SEARCH_CARD, q), (SQL_SEARCH_NAME, lowered)):
        low, high = prefix_range(key)
        for r in await conn.fetch(sql, low, high, rows_limit):
            found.setdefault((r["ledger"], r["id"]), Found(*r))
    return list(found.values())[:rows_limit]


async def holders_with_id(conn: asyncpg.Connection[Any] | Any, holder_id: str) -> list[Found]:
    """The holders whose id is ``holder_id``, one per ledger that has it, by ledger."""
    rows = await conn.fetch(SQL_SAME_ID, holder_id, limits.CONSOLE_SEARCH_ROWS)
    return [Found(*r) for r in rows]


@get("/holders", name="console-holders")
async def holders(request: Request[Any, Any, Any], q: FromQuery[str] = "") -> Response[bytes]:
    """The holder search (by id, name or card number)."""
    await require(request, Right.READ)
    q = q[: limits.WEB_MAX_FIELD_CHARS].replace("\x00", "")
    async with request.app.state.engine.store.pool.acquire(
        timeout=limits.DB_ACQUIRE_TIMEOUT_S
    ) as conn:
        found = await search_holders(conn, q)
    return render.page(request, "console/holders.html", q=q, found=found)


HANDLERS: Final[list[HTTPRouteHandler]] = [holders]

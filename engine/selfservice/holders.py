"""A logged-in holder and what the home page of /self shows them.

A session names a holder by id only (the login form has no ledger); ``find_holder`` resolves it
to the holder's ledger and purses, and an id present in several ledgers resolves to nothing
(it cannot log in either). The mapping never changes (holders are never moved or deleted, and
their purse ids are derived), so it is cached.

The home page's figures (both purses, the card, the holder's own limit, the room and its
purse) are one row of ``SQL_OVERVIEWS``; concurrent page loads of one ledger share one
statement through a :class:`Coalescer`, exactly as the terminal path's reads do, so a page load
costs the session's read and at most this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import asyncpg
import msgspec

from engine import limits
from engine.campus import CardStatus
from engine.db.coalesce import Coalescer, Connection

# The ledger key of the holder lookups: a holder id is looked up across ledgers.
_ANY_LEDGER: Final = 0

SQL_FIND_HOLDERS: Final = """
SELECT q.holder_id, h.ledger, h.name, h.purse_account_id, h.subsidy_account_id
FROM unnest($1::text[]) AS q(holder_id)
JOIN holders h ON h.id = q.holder_id
"""
# Available = credits posted - debits posted - debits pending (credit-normal purses). The card
# shown is the holder's active card, else a lost one, else the latest; only one can be active.
SQL_OVERVIEWS: Final = """
SELECT q.i,
       p.credits_posted - p.debits_posted - p.debits_pending AS cash,
       s.credits_posted - s.debits_posted - s.debits_pending AS subsidy,
       c.card_no, c.status, c.daily_limit, hl.daily_limit AS own_limit,
       r.room_id, ra.credits_posted - ra.debits_posted - ra.debits_pending AS room_available
FROM unnest($2::text[], $3::bigint[], $4::bigint[])
     WITH ORDINALITY AS q(holder_id, purse_id, subsidy_id, i)
JOIN accounts p ON p.ledger = $1 AND p.id = q.purse_id
JOIN accounts s ON s.ledger = $1 AND s.id = q.subsidy_id
LEFT JOIN LATERAL (
    SELECT c.card_no, c.status, c.daily_limit FROM cards c
    WHERE c.ledger = $1 AND c.holder_id = q.holder_id
    ORDER BY c.status = 'active' DESC, c.status = 'lost' DESC, c.updated_at DESC, c.card_no
    LIMIT 1
) c ON true
LEFT JOIN holder_limits hl ON hl.ledger = $1 AND hl.holder_id = q.holder_id
LEFT JOIN room_residents r ON r.ledger = $1 AND r.holder_id = q.holder_id
LEFT JOIN rooms rm ON rm.ledger = $1 AND rm.room_id = r.room_id
LEFT JOIN accounts ra ON ra.ledger = $1 AND ra.id = rm.account_id
"""


class HolderRef(msgspec.Struct, frozen=True):
    """A holder as the pages know them: id, ledger and the two purses."""

    holder_id: str
    ledger: int
    name: str
    purse_id: int
    subsidy_id: int

    @property
    def purses(self) -> tuple[int, int]:
        """(cash purse, subsidy purse)."""
        return self.purse_id, self.subsidy_id


class CardView(msgspec.Struct, frozen=True):
    """The holder's card as the home page shows it."""

    card_no: str
    status: CardStatus
    daily_limit: int | None  # the card office's

    @property
    def last4(self) -> str:
        """The only digits of the number a page shows."""
        return self.card_no[-4:]


class Overview(msgspec.Struct, frozen=True):
    """Everything the home page shows, read in one statement."""

    cash: int  # available fen
    subsidy: int
    card: CardView | None
    own_limit: int | None  # the holder's own daily limit
    room_id: str | None
    room_available: int | None
    low_balance_fen: int
    low_room_fen: int

    @property
    def total(self) -> int:
        """Both purses together: what the card can spend."""
        return self.cash + self.subsidy

    @property
    def effective_limit(self) -> int | None:
        """The daily limit payments are checked against: the lower of the card office's and
        the holder's own (either may be absent)."""
        return lower_limit(self.card.daily_limit if self.card else None, self.own_limit)

    @property
    def low_balance(self) -> bool:
        """The purses together are under the warning threshold."""
        return self.total < self.low_balance_fen

    @property
    def low_room(self) -> bool:
        """The room's electricity is under its warning threshold."""
        return self.room_available is not None and self.room_available < self.low_room_fen


def lower_limit(office: int | None, own: int | None) -> int | None:
    """The limit in effect: the lower of the two, or the one that is set, or None."""
    if office is None:
        return own
    return office if own is None else min(office, own)


class _OverviewQuery(msgspec.Struct, frozen=True):
    ref: HolderRef


class HolderReads:
    """The coalesced reads of the pages: holders by id, and the home page's overview.

    ``low_balance_fen`` and ``low_room_fen`` are the warning thresholds (contract §7, issue 13:
    by default 20.00 yuan for the purses and 10.00 yuan for the room)."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        *,
        low_balance_fen: int = limits.SELF_LOW_BALANCE_FEN,
        low_room_fen: int = limits.SELF_LOW_ROOM_FEN,
        max_batch: int = limits.SELF_COALESCE_MAX_BATCH,
    ) -> None:
        self.low_balance_fen = low_balance_fen
        self.low_room_fen = low_room_fen
        self._holders: dict[str, HolderRef] = {}
        self._finds: Coalescer[str, HolderRef | None] = Coalescer(
            pool, self._read_holders, max_batch=max_batch, name="onecard-self-holders")
        self._overviews: Coalescer[_OverviewQuery, Overview | None] = Coalescer(
            pool, self._read_overviews, max_batch=max_batch, name="onecard-self-overviews")

    @property
    def statements(self) -> int:
        """Statements run so far (each serves a batch of page loads)."""
        return self._finds.statements + self._overviews.statements

    async def find_holder(self, holder_id: str) -> HolderRef | None:
        """The holder with this id, or None when there is none or it is in several ledgers."""
        found = self._holders.get(holder_id)
        if found is None:
            if not 0 < len(holder_id) <= limits.SELF_HOLDER_ID_MAX_CHARS or "\x00" in holder_id:
                return None  # cannot be stored (holders CHECK); must not fail a shared read
            found = await self._finds.ask(_ANY_LEDGER, holder_id)
            if found is None:
                return None  # not cached: the holder may be registered a moment later
            if len(self._holders) >= limits.SELF_MAX_CACHED_HOLDERS:
                self._holders.pop(next(iter(self._holders)))
            self._holders[holder_id] = found
        return found

    async def overview(self, ref: HolderRef) -> Overview:
        """The home page's figures for a holder found by ``find_holder``."""
        found = await self._overviews.ask(ref.ledger, _OverviewQuery(ref))
        assert found is not None, "holders and their accounts are never deleted"
        return found

    @staticmethod
    async def _read_holders(
        conn: Connection, _: int, holder_ids: list[str]
    ) -> list[HolderRef | None]:
        rows = await conn.fetch(SQL_FIND_HOLDERS, list(set(holder_ids)))
        found: dict[str, list[HolderRef]] = {}
        for r in rows:
            found.setdefault(r["holder_id"], []).append(
                HolderRef(r["holder_id"], r["ledger"], r["name"], r["purse_account_id"],
                          r["subsidy_account_id"]))
        # an id in several ledgers is nobody's here: which holder it means is not known
        return [refs[0] if len(refs := found.get(h, [])) == 1 else None for h in holder_ids]

    async def _read_overviews(
        self, conn: Connection, ledger: int, qs: list[_OverviewQuery]
    ) -> list[Overview | None]:
        rows = await conn.fetch(
            SQL_OVERVIEWS, ledger, [q.ref.holder_id for q in qs], [q.ref.purse_id for q in qs],
            [q.ref.subsidy_id for q in qs])
        out: list[Overview | None] = [None] * len(qs)
        for r in rows:
            card = None
            if r["card_no"] is not None:
                card = CardView(r["card_no"], CardStatus(r["status"]), r["daily_limit"])
            out[r["i"] - 1] = Overview(
                cash=r["cash"], subsidy=r["subsidy"], card=card, own_limit=r["own_limit"],
                room_id=r["room_id"], room_available=r["room_available"],
                low_balance_fen=self.low_balance_fen, low_room_fen=self.low_room_fen)
        return out

"""A live API with credentials of every kind: the two tokens and an API key per role, over a
campus ledger of its own (clearing, fund, merchant and utility accounts, a holder with a card,
a room), served by uvicorn on a real socket."""

from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any, Final

import httpx
from litestar import Litestar

from engine.access.apikeys import Created, create_key
from engine.access.roles import (
    ADMIN_TOKEN_RIGHTS,
    READ_TOKEN_RIGHTS,
    Right,
    Role,
    rights_of,
)
from engine.campus.accounts import holder_account_ids
from engine.http.app import create_app
from engine.service import Engine
from tests.conftest import Ids
from tests.faults.harness import serve_app

ADMIN_TOKEN: Final = "access-admin-token"
READ_TOKEN: Final = "access-read-token"
NOBODY: Final = "nobody"  # no Authorization header at all


def principal_rights(name: str) -> frozenset[Right]:
    """What the contract's table grants each credential of :class:`Door` (NOBODY: nothing)."""
    if name == "admin-token":
        return ADMIN_TOKEN_RIGHTS
    if name == "read-token":
        return READ_TOKEN_RIGHTS
    if name == NOBODY:
        return frozenset()
    return rights_of(Role(name))


class Door:
    """The served app, its world and a bearer header per credential."""

    def __init__(self, url: str, app: Litestar, engine: Engine, ledger: int) -> None:
        self.url = url
        self.app = app
        self.engine = engine
        self.ledger = ledger
        self.keys: dict[str, str] = {}  # role -> key secret
        self.key_names: dict[str, str] = {}
        self.headers: dict[str, dict[str, str]] = {
            NOBODY: {},
            "admin-token": {"Authorization": f"Bearer {ADMIN_TOKEN}"},
            "read-token": {"Authorization": f"Bearer {READ_TOKEN}"},
        }

    @property
    def principals(self) -> list[str]:
        """Every credential name, NOBODY included."""
        return list(self.headers)

    def client(self) -> httpx.AsyncClient:
        """A new client on the live API."""
        return httpx.AsyncClient(base_url=self.url, timeout=30)

    def topup(self, amount: int = 100, *, code: int = 4, debit: int | None = None,
              tid: str | None = None) -> dict[str, Any]:
        """One transfer from the topup key's clearing account to the holder's purse."""
        return {"id": tid or str(uuid.uuid4()), "ledger": self.ledger,
                "debit_account_id": self.clearing if debit is None else debit,
                "credit_account_id": self.purse, "amount": amount, "code": code}

    async def setup(self, ids: Ids) -> Door:
        """Accounts, a holder with a card, a room, and a key of every role."""
        self.clearing, self.other_clearing, self.fund, self.canteen = ids.accounts(4)
        self.holder = "H" + secrets.token_hex(5)
        self.purse, self.subsidy = holder_account_ids(self.ledger, self.holder)
        self.card = "77" + "".join(secrets.choice("0123456789") for _ in range(14))
        self.room = "R" + secrets.token_hex(5)
        admin = self.headers["admin-token"]
        async with self.client() as c:
            accounts = [
                {"id": self.clearing, "ledger": self.ledger, "kind": "clearing", "code": 1},
                {"id": self.other_clearing, "ledger": self.ledger, "kind": "clearing",
                 "code": 1},
                {"id": self.fund, "ledger": self.ledger, "kind": "fund", "code": 1},
                {"id": self.canteen, "ledger": self.ledger, "kind": "merchant", "code": 1},
            ]
            for path, body in [
                ("/v1/accounts", accounts),
                ("/v1/holders", {"id": self.holder, "ledger": self.ledger, "name": "Li Lei",
                                 "kind": "student"}),
                ("/v1/cards", {"card_no": self.card, "holder_id": self.holder,
                               "ledger": self.ledger, "pin": "2468", "pin_threshold": 0}),
                ("/v1/rooms", {"room_id": self.room, "ledger": self.ledger}),
            ]:
                r = await c.post(path, json=body, headers=admin)
                assert r.status_code == 200, r.text
        async with self.engine.store.pool.acquire() as conn:
            for role in Role:
                made = await create_key(
                    conn, role=role, name=f"{role}-{self.ledger}",
                    clearing=self.clearing if role is Role.TOPUP else None)
                assert isinstance(made, Created), made
                self.keys[str(role)] = made.secret
                self.key_names[str(role)] = made.key.name
                self.headers[str(role)] = {"Authorization": f"Bearer {made.secret}"}
        return self

    async def fingerprint(self) -> tuple[Any, ...]:
        """Everything a write could change in this world (balances, campus rows, keys)."""
        async with self.engine.store.pool.acquire() as conn:
            accounts = await conn.fetch(
                "SELECT id, debits_posted, credits_posted, debits_pending, credits_pending, "
                "flags FROM accounts WHERE ledger = $1 ORDER BY id", self.ledger)
            counts = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM transfers WHERE ledger = $1) AS t,"
                " (SELECT count(*) FROM holders WHERE ledger = $1) AS h,"
                " (SELECT string_agg(card_no || status, ',' ORDER BY card_no) FROM cards"
                "  WHERE ledger = $1) AS c,"
                " (SELECT count(*) FROM terminals) AS te,"
                " (SELECT count(*) FROM rooms WHERE ledger = $1) AS r,"
                " (SELECT count(*) FROM room_residents WHERE ledger = $1) AS re,"
                " (SELECT count(*) FROM holder_credentials WHERE ledger = $1) AS hc",
                self.ledger)
        return (*(tuple(r) for r in accounts), tuple(counts or ()))


@contextlib.asynccontextmanager
async def served(engine: Engine, ids: Ids) -> AsyncIterator[Door]:
    """A fresh app over ``engine`` on a free port, with its world set up."""
    app = create_app(engine, admin_token=ADMIN_TOKEN, read_token=READ_TOKEN)
    try:
        async with serve_app(app) as url:
            yield await Door(url, app, engine, ids.ledger()).setup(ids)
    finally:
        await app.state.access.close()

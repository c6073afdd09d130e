"""Card numbers and terminal ids are unique across ledgers by a key on the value itself
(engine/campus/unique.py, migration 0026), not by an advisory lock: concurrent creators in
different ledgers, refusals that must leave the value free, and the database's own refusal."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg
import pytest

from engine.campus import (
    Campus,
    Card,
    HolderKind,
    HolderResult,
    Refusal,
    Refused,
    RegistryStatus,
    TerminalKind,
)
from engine.service import Engine
from ledger.account import Account
from ledger.status import AccountStatus
from ledger.types import AccountKind
from tests.campus.test_campus import World, card_number, make_world, terminal_id
from tests.conftest import Ids


@pytest.fixture
def campus(engine: Engine) -> Campus:
    return Campus(engine)


async def _holders(campus: Campus, ids: Ids, n: int) -> list[tuple[int, str]]:
    """``n`` holders, each in a ledger of its own."""
    out = []
    for _ in range(n):
        ledger, holder = ids.ledger(), "U" + secrets.token_hex(4)
        r = await campus.create_holder(holder_id=holder, ledger=ledger, name="n",
                                       kind=HolderKind.STUDENT)
        assert isinstance(r, HolderResult) and r.status is RegistryStatus.CREATED
        out.append((ledger, holder))
    return out


async def _owners(engine: Engine, card_no: str) -> list[int]:
    async with engine.store.pool.acquire() as conn:
        rows = await conn.fetch("SELECT ledger FROM card_numbers WHERE card_no = $1", card_no)
    return [r["ledger"] for r in rows]


async def test_concurrent_issuers_in_different_ledgers_get_one_card(
    engine: Engine, campus: Campus, ids: Ids
) -> None:
    holders = await _holders(campus, ids, 6)
    number = card_number()
    results = await asyncio.gather(*(
        campus.create_card(card_no=number, holder_id=h, ledger=ledger) for ledger, h in holders
    ))
    cards = [r for r in results if isinstance(r, Card)]
    assert len(cards) == 1
    assert all(r.reason is Refusal.CARD_NUMBER_TAKEN for r in results if isinstance(r, Refused))
    assert await _owners(engine, number) == [cards[0].ledger]
    found = await campus.get_card(number)
    assert found is not None and (found.ledger, found.holder_id) == (
        cards[0].ledger, cards[0].holder_id)


async def test_a_refused_issue_leaves_the_number_free(
    engine: Engine, campus: Campus, ids: Ids
) -> None:
    w = await make_world(engine, campus, ids)
    number = card_number()
    busy = await campus.create_card(card_no=number, holder_id=w.holder, ledger=w.ledger)
    assert isinstance(busy, Refused) and busy.reason is Refusal.HOLDER_HAS_ACTIVE_CARD
    nobody = await campus.create_card(card_no=number, holder_id="nobody", ledger=w.ledger)
    assert isinstance(nobody, Refused) and nobody.reason is Refusal.HOLDER_NOT_FOUND
    assert await _owners(engine, number) == []
    [(ledger, holder)] = await _holders(campus, ids, 1)
    card = await campus.create_card(card_no=number, holder_id=holder, ledger=ledger)
    assert isinstance(card, Card) and await _owners(engine, number) == [ledger]


async def test_a_refused_replacement_leaves_the_new_number_free(
    engine: Engine, campus: Campus, ids: Ids
) -> None:
    w = await make_world(engine, campus, ids)
    number = card_number()
    other = card_number()
    second = await _holders(campus, ids, 1)
    [(ledger, holder)] = second
    assert isinstance(await campus.create_card(card_no=other, holder_id=holder, ledger=ledger),
                      Card)
    taken = await campus.replace_card(w.card, other)  # another ledger's card
    assert isinstance(taken, Refused) and taken.reason is Refusal.CARD_NUMBER_TAKEN
    assert await _owners(engine, other) == [ledger]
    closed = await campus.close_card(w.card)
    assert isinstance(closed, Card)
    refused = await campus.replace_card(w.card, number)  # a closed card cannot be replaced
    assert isinstance(refused, Refused) and refused.reason is Refusal.INVALID_TRANSITION
    assert await _owners(engine, number) == []


async def test_a_terminal_id_is_one_terminal_across_ledgers(
    engine: Engine, campus: Campus, ids: Ids
) -> None:
    a = await make_world(engine, campus, ids)
    b = World(engine, campus, ids)
    st = await engine.store.create_accounts(
        [Account(id=b.canteen, ledger=b.ledger, kind=AccountKind.MERCHANT, code=1)])
    assert st == [AccountStatus.CREATED]
    t = a.pos
    again = await campus.register_terminal(
        terminal_id=t.terminal_id, merchant_id=t.merchant_id, ledger=b.ledger,
        kind=TerminalKind.POS, account_id=b.canteen, mac_key=t.mac_key)
    assert again is RegistryStatus.EXISTS_WITH_DIFFERENT_FIELDS
    found = await campus.terminal(t.terminal_id)
    assert found is not None and found.ledger == a.ledger
    # a refused registration leaves its id free
    tid = terminal_id()
    refused = await campus.register_terminal(
        terminal_id=tid, merchant_id="M" * 15, ledger=b.ledger, kind=TerminalKind.POS,
        account_id=ids.account(), mac_key=t.mac_key)
    assert isinstance(refused, Refused) and refused.reason is Refusal.ACCOUNT_NOT_FOUND
    created = await campus.register_terminal(
        terminal_id=tid, merchant_id="M" * 15, ledger=b.ledger, kind=TerminalKind.POS,
        account_id=b.canteen, mac_key=t.mac_key)
    assert created is RegistryStatus.CREATED


async def test_the_database_refuses_a_second_ledger_for_a_value(
    engine: Engine, campus: Campus, ids: Ids
) -> None:
    w = await make_world(engine, campus, ids)
    async with engine.store.pool.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO card_numbers (card_no, ledger) VALUES ($1, $2)",
                               w.card, w.ledger + 1)
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO terminal_ids (terminal_id, ledger) VALUES ($1, $2)",
                               w.pos.terminal_id, w.ledger + 1)

"""The gateway under concurrency, over real TCP on the real campus and PostgreSQL: the answer
memory and the campus share their statements across requests, terminals signing on together
are looked up together, and a request that outlives its deadline answers 96 while its work
finishes and is remembered for the retransmission."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from uuid import UUID

import pytest

from engine.campus import Campus, PaymentResult, Terminal, TerminalKind
from engine.service import Engine
from terminals.client import TerminalClient
from terminals.gateway import Gateway
from terminals.operations import _base36, auth_id_for, rrn_for
from tests.conftest import Ids
from tests.terminals.test_gateway_flows import World


@pytest.fixture
async def fresh(engine: Engine, ids: Ids) -> AsyncIterator[tuple[Campus, Gateway, World]]:
    campus = Campus(engine)
    gw = Gateway(engine, campus=campus)
    await gw.start("127.0.0.1", 0)
    w = await World(engine, campus, gw, ids).setup()
    yield campus, gw, w
    await w.close()
    await gw.stop()


async def test_concurrent_terminals_share_statements(
    fresh: tuple[Campus, Gateway, World],
) -> None:
    campus, gw, w = fresh
    people = [await w.person(cash=2_000, subsidy=100) for _ in range(20)]
    terms = [await w.terminal(TerminalKind.POS, w.canteen) for _ in range(60)]
    for t in terms:  # signed on: terminals are known, cards are what the payments look up
        assert (await t.request(t.sign_on())).response_code == "00"
    assert gw._memory is not None
    memory0, campus0 = gw._memory.statements, campus.statements

    async def pay(i: int, t: TerminalClient) -> str | None:
        return (await t.request(t.purchase(people[i % 20].card, 100 + i))).response_code

    codes = await asyncio.gather(*(pay(i, t) for i, t in enumerate(terms)))
    assert codes == ["00"] * 60
    memory, reads = gw._memory.statements - memory0, campus.statements - campus0
    # one statement per request would be 120 memory and 180 campus statements
    assert memory <= 20, memory
    assert reads <= 30, reads
    for n, p in enumerate(people):
        spent = sum(100 + i for i in range(n, 60, 20))
        assert await w.purses(p) == (2_000 - (spent - 100), 0)
    assert await w.balance(w.canteen) == sum(100 + i for i in range(60))


async def test_terminals_signing_on_together_are_looked_up_together(
    engine: Engine, ids: Ids
) -> None:
    campus = Campus(engine)
    gw = Gateway(engine, campus=campus)
    await gw.start("127.0.0.1", 0)
    w = await World(engine, Campus(engine), gw, ids).setup()  # registered elsewhere
    try:
        terms = [await w.terminal(TerminalKind.POS, w.canteen) for _ in range(40)]
        before = campus.statements
        codes = await asyncio.gather(*(t.request(t.sign_on()) for t in terms))
        assert [c.response_code for c in codes] == ["00"] * 40
        assert campus.statements - before <= 5  # not 40
        assert all(await asyncio.gather(*(campus.terminal(t.terminal_id) for t in terms)))
        assert campus.statements - before <= 5  # cached since
    finally:
        await w.close()
        await gw.stop()


class _Slow(Campus):
    """The real campus, slower than the gateway's deadline on purchases."""

    async def purchase(self, term: Terminal, *, card_no: str, amount: int, key: UUID,
                       pin_block: bytes | None = None, force: bool = False) -> PaymentResult:
        await asyncio.sleep(0.4)
        return await super().purchase(term, card_no=card_no, amount=amount, key=key,
                                      pin_block=pin_block, force=force)


async def test_late_answer_is_96_and_the_work_moves_nothing(engine: Engine, ids: Ids) -> None:
    """Contract §5 v4: a 96 moved no money, ever. The work still going on at the deadline is
    given up (its 96 stored with its own reversal), so when it runs it posts nothing, and the
    retransmission gets the stored 96 (tests/faults/test_no_charge_behind_96.py: the work
    stuck in a stalled ledger write instead, posting after the 96)."""
    campus = _Slow(engine)
    gw = Gateway(engine, campus=campus, request_timeout_s=0.1)
    await gw.start("127.0.0.1", 0)
    w = await World(engine, campus, gw, ids).setup()
    try:
        p = await w.person(cash=1_000)
        req = w.pos.purchase(p.card, 300)
        first = await w.pos.request(req)
        assert first.response_code == "96" and first.rrn is not None  # stored: the answer
        for _ in range(50):  # the flight goes on without its caller
            await asyncio.sleep(0.05)
            if not gw._flights.by_key:
                break
        assert not gw._flights.by_key
        assert await w.purses(p) == (1_000, 0)  # and moved nothing
        again = await w.pos.request(req)  # the retransmission
        assert again == first
        assert await w.purses(p) == (1_000, 0)
    finally:
        await w.close()
        await gw.stop()


def test_rrn_and_auth_id_never_change() -> None:
    """Stored answers carry them: a faster base-36 must give exactly the old digits."""
    k = UUID("27550517-1e7c-5e53-939a-ff7d64c3588b")
    assert (rrn_for(k), rrn_for(k, 3), auth_id_for(k)) == ("Z6LH3K9E488H", "DCQ7XPOSHYDB",
                                                           "Y9JJ01")
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for i in range(2_000):
        data = hashlib.sha256(i.to_bytes(4, "big")).digest()[: 8 + i % 9]
        n, expected = int.from_bytes(data, "big"), []
        for _ in range(1 + i % 13):
            n, r = divmod(n, 36)
            expected.append(digits[r])
        assert _base36(data, 1 + i % 13) == "".join(expected)

"""Terminal amounts are bounded, and nothing is posted that its answer could not show.

Offline advices and room meter advices post with ``force``: without a bound, a faulty terminal
or a leaked key drove a purse past -10^12 fen, and from then on every operation of the card was
posted but answered 96 (field 54 holds 12 digits). Now an amount above
``limits.TERMINAL_MAX_AMOUNT_FEN`` is 13, and so is an operation that would leave a purse or
room beyond field 54, both before anything is posted. Real TCP, the real campus and ledger
(the world of test_gateway_flows.py).
"""

from __future__ import annotations

import uuid

from engine import limits
from ledger.status import TransferStatus
from ledger.transfer import Transfer
from ledger.types import TransferCode, TransferFlag
from tests.terminals.test_gateway_flows import World, blocks, campus, gateway, w

__all__ = ["campus", "gateway", "w"]  # fixtures, used by name

MAX = limits.TERMINAL_MAX_AMOUNT_FEN
EDGE = limits.TERMINAL_FIELD_MAX_FEN  # the largest balance field 54 can show


async def force(w: World, debit: int, credit: int, amount: int) -> None:
    """A raw ledger transfer past the no-overdraft rule (what the advices did, in one go)."""
    [r] = await w.engine.batcher.submit([Transfer(
        id=uuid.uuid4(), ledger=w.ledger, debit_account_id=debit, credit_account_id=credit,
        amount=amount, code=TransferCode.MEAL, flags=(TransferFlag.FORCE,))])
    assert r.status is TransferStatus.CREATED, r


def test_the_maximum_is_10000_yuan() -> None:
    assert MAX == 1_000_000 and EDGE == 10**12 - 1


async def test_amount_over_the_maximum_is_13_and_posts_nothing(w: World) -> None:
    p = await w.person(cash=3 * MAX)
    room = await w.room(balance=3 * MAX)
    over = MAX + 1
    refused = {
        "purchase": (w.pos, w.pos.purchase(p.card, over)),
        "advice": (w.pos, w.pos.offline_advice(p.card, over)),
        "hold": (w.water, w.water.hold(p.card, over)),
        "electricity": (w.kiosk, w.kiosk.electricity_purchase(p.card, over, room.room_id)),
        "meter advice": (w.meter, w.meter.meter_advice(room.room_id, over)),
    }
    for name, (terminal, req) in refused.items():
        ans = await terminal.request(req)
        assert ans.response_code == "13", (name, ans)
    assert await w.purses(p) == (3 * MAX, 0)
    assert await w.balance(room.account_id) == 3 * MAX
    assert await w.balance(w.canteen) == await w.balance(w.power_acc) == 0
    # the maximum itself is allowed, and so is a completion up to it
    assert (await w.pos.request(w.pos.purchase(p.card, MAX))).response_code == "00"
    hold = w.water.hold(p.card, MAX)
    assert (await w.water.request(hold)).response_code == "00"
    assert (await w.water.request(w.water.completion(hold, MAX + 1))).response_code == "13"
    assert (await w.water.request(w.water.completion(hold, MAX))).response_code == "00"
    assert await w.purses(p) == (MAX, 0)


async def test_advice_that_would_leave_the_purse_beyond_field_54_is_13(w: World) -> None:
    p = await w.person()
    await force(w, p.purse, w.canteen, EDGE - MAX)  # years of offline advices
    # down to exactly what field 54 can show: posted and shown
    ans = await w.pos.request(w.pos.offline_advice(p.card, MAX))
    assert ans.response_code == "00" and blocks(ans) == {"00": -EDGE, "10": -EDGE, "20": 0}
    # one fen more could not be shown: refused before posting
    ans = await w.pos.request(w.pos.offline_advice(p.card, 1))
    assert ans.response_code == "13", ans
    assert await w.purses(p) == (-EDGE, 0)
    assert await w.balance(w.canteen) == EDGE
    # and the card still gets answers (not 96) for everything else
    assert (await w.pos.request(w.pos.purchase(p.card, 1))).response_code == "51"
    ans = await w.pos.request(w.pos.inquiry(p.card))
    assert ans.response_code == "00" and blocks(ans)["00"] == -EDGE


async def test_meter_advice_that_would_leave_the_room_beyond_field_54_is_13(w: World) -> None:
    room = await w.room()
    await force(w, room.account_id, w.power_acc, EDGE - 10)
    ans = await w.meter.request(w.meter.meter_advice(room.room_id, 10))
    assert ans.response_code == "51" and blocks(ans) == {"30": -EDGE}
    ans = await w.meter.request(w.meter.meter_advice(room.room_id, 1))
    assert ans.response_code == "13", ans
    assert await w.balance(room.account_id) == -EDGE


async def test_electricity_that_would_fill_the_room_beyond_field_54_is_13(w: World) -> None:
    p = await w.person(cash=100)
    room = await w.room(balance=EDGE - 10)
    ans = await w.kiosk.request(w.kiosk.electricity_purchase(p.card, 11, room.room_id))
    assert ans.response_code == "13", ans
    assert await w.purses(p) == (100, 0)
    ans = await w.kiosk.request(w.kiosk.electricity_purchase(p.card, 10, room.room_id))
    assert ans.response_code == "00" and blocks(ans) == {"10": 90, "30": EDGE}


async def test_a_balance_already_beyond_field_54_is_answered_not_96(w: World) -> None:
    """A purse pushed out of range some other way (raw transfers with force): its answers
    leave field 54 out rather than answer 96 (a 96 must mean no money moved)."""
    p = await w.person()
    await force(w, p.purse, w.canteen, EDGE + 5)
    ans = await w.pos.request(w.pos.purchase(p.card, 100))
    assert ans.response_code == "51" and ans.additional_amounts is None, ans
    ans = await w.pos.request(w.pos.inquiry(p.card))
    assert ans.response_code == "00" and ans.additional_amounts is None, ans
    assert await w.purses(p) == (-EDGE - 5, 0)

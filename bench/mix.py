"""The transfer mix: what one submitter sends, drawn from its own seeded generator."""

from __future__ import annotations

import random
import uuid
from typing import Final

from bench.fixture import Campus, IdSource
from ledger.transfer import Transfer
from ledger.types import TransferCode, TransferFlag

# per mille of requests
MEAL_PM: Final = 850
HOLD_PM: Final = 90  # hot water: a hold, settled later by the same submitter
TOPUP_PM: Final = 50
# the remaining 10 per mille re-submit an earlier transfer (idempotent retry: `exists`)
MEAL_FEN: Final = (300, 2_500)
HOT_WATER_HOLD_FEN: Final = 500
HOLD_TIMEOUT_S: Final = 600
TOPUP_FEN: Final = 50_000
OPEN_HOLDS_MAX: Final = 8  # a submitter settles its oldest hold beyond this many


class Mix:
    """One submitter's share of the workload: meals on the hot canteen, hot-water holds later
    settled, top-ups and the odd idempotent retry, drawn from its own seeded generator."""

    __slots__ = ("_again", "_c", "_holds", "_ids", "_plain", "_recent", "_rng")

    def __init__(self, c: Campus, *, seed: int, stream: int, plain: bool = False) -> None:
        """``plain``: no holds (hot-water draws become meals), for posters without holds."""
        self._c = c
        self._plain = plain
        self._rng = random.Random(seed * 1_000_003 + stream)
        self._ids = IdSource(seed, stream=stream, random_ids=c.random_ids)
        self._holds: list[uuid.UUID] = []
        self._recent: Transfer | None = None
        self._again: list[Transfer] | None = None

    def request(self, size: int) -> list[Transfer]:
        """The next request: ``size`` transfers (or the one handed to ``replay``)."""
        again, self._again = self._again, None
        if again is not None:
            return again
        return [self.transfer() for _ in range(size)]

    def replay(self, request: list[Transfer]) -> None:
        """Send ``request`` again next time (it was refused: a client retries it as is)."""
        self._again = request

    def transfer(self) -> Transfer:
        """The next transfer of the mix."""
        c, rng = self._c, self._rng
        draw = rng.random  # randrange/randint cost several Python calls each; this is one
        n = len(c.purses)
        roll = int(draw() * 1000)
        if roll < MEAL_PM or (self._plain and roll < MEAL_PM + HOLD_PM):
            t = Transfer(
                id=self._ids.next(),
                ledger=c.ledger,
                debit_account_id=c.purses[int(draw() * n)],
                credit_account_id=c.canteen,
                amount=MEAL_FEN[0] + int(draw() * (MEAL_FEN[1] - MEAL_FEN[0] + 1)),
                code=TransferCode.MEAL,
            )
        elif roll < MEAL_PM + HOLD_PM:
            if len(self._holds) >= OPEN_HOLDS_MAX or (self._holds and draw() < 0.5):
                t = Transfer(
                    id=self._ids.next(),
                    ledger=c.ledger,
                    amount=1 + int(draw() * HOT_WATER_HOLD_FEN),
                    flags=(TransferFlag.POST_PENDING,),
                    pending_id=self._holds.pop(0),
                )
            else:
                t = Transfer(
                    id=self._ids.next(),
                    ledger=c.ledger,
                    debit_account_id=c.purses[int(draw() * n)],
                    credit_account_id=c.water,
                    amount=HOT_WATER_HOLD_FEN,
                    code=TransferCode.HOT_WATER,
                    flags=(TransferFlag.PENDING,),
                    timeout_s=HOLD_TIMEOUT_S,
                )
                self._holds.append(t.id)
        elif roll < MEAL_PM + HOLD_PM + TOPUP_PM or self._recent is None:
            t = Transfer(
                id=self._ids.next(),
                ledger=c.ledger,
                debit_account_id=c.clearing,
                credit_account_id=c.purses[int(draw() * n)],
                amount=TOPUP_FEN,
                code=TransferCode.TOP_UP,
                user_data=f"bank-{rng.getrandbits(48):012x}",
            )
        else:
            return self._recent  # the retry answers `exists`; not remembered again
        self._recent = t
        return t

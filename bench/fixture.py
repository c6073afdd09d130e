"""The campus fixture every workload loads: purses, the hot canteen, hot water and the bank's
clearing account in one ledger, every purse funded; and the transfer ids its clients make.

Everything is deterministic for a given ``--seed``: account ids, the order of transfers and
their amounts; transfer ids are UUIDv7 (the wall-clock millisecond, then seeded random bits), as
the README advises clients, or seeded random UUIDv4 with ``--random-ids``.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Final

import msgspec

from engine.store import Store
from ledger.account import Account
from ledger.ids import uuid7
from ledger.status import TransferStatus
from ledger.transfer import Transfer
from ledger.types import AccountFlag, AccountKind, TransferCode

PURSES: Final = 10_000
PURSE_FUNDS_FEN: Final = 5_000_000  # 50,000 yuan: a purse never runs dry during a run...
POOR_EVERY: Final = 100  # ...except every 100th, funded with a single meal's worth
POOR_FUNDS_FEN: Final = 2_000
LOAD_CHUNK: Final = 8190  # transfers per funding batch (one engine batch)


class Campus(msgspec.Struct, frozen=True):
    """The account ids of one loaded ledger."""

    ledger: int
    purses: list[int]
    canteen: int
    water: int
    clearing: int
    random_ids: bool = False  # its clients' transfer ids: UUIDv4 rather than UUIDv7


def campus_ids(ledger: int, purses: int, *, base: int, random_ids: bool = False) -> Campus:
    """Account ids of a campus: purses ``base+1..base+purses``, then the three hot accounts."""
    top = base + purses
    return Campus(
        ledger=ledger,
        purses=list(range(base + 1, top + 1)),
        canteen=top + 1,
        water=top + 2,
        clearing=top + 3,
        random_ids=random_ids,
    )


def campus_accounts(c: Campus) -> list[Account]:
    """The accounts of a campus, as created over the API."""
    no_overdraft = (AccountFlag.DEBITS_MUST_NOT_EXCEED_CREDITS,)
    accounts = [
        Account(id=a, ledger=c.ledger, kind=AccountKind.PURSE, code=1, flags=no_overdraft)
        for a in c.purses
    ]
    accounts += [
        Account(id=c.canteen, ledger=c.ledger, kind=AccountKind.MERCHANT, code=2, name="canteen"),
        Account(id=c.water, ledger=c.ledger, kind=AccountKind.UTILITY, code=3, name="hot water"),
        Account(id=c.clearing, ledger=c.ledger, kind=AccountKind.CLEARING, code=4, name="bank"),
    ]
    return accounts


def client_id(rng: random.Random, unix_ms: int, *, random_ids: bool) -> uuid.UUID:
    """A transfer id as the campus's clients make it at ``unix_ms``: UUIDv7 (time-ordered,
    ``ledger.ids``), or random UUIDv4 (``random_ids``), the random bits drawn from ``rng``."""
    if random_ids:
        return uuid.UUID(int=rng.getrandbits(128), version=4)
    return uuid7(unix_ms, rng.getrandbits(74))


class IdSource:
    """One client's transfer ids (``client_id`` at the wall clock's millisecond)."""

    __slots__ = ("_random", "_rng")

    def __init__(self, seed: int, *, stream: int, random_ids: bool = False) -> None:
        self._rng = random.Random(f"onecard-bench/{seed}/{stream}")
        self._random = random_ids

    def next(self) -> uuid.UUID:
        """The next id of this stream."""
        return client_id(self._rng, time.time_ns() // 1_000_000, random_ids=self._random)


def funding(c: Campus, *, seed: int) -> list[Transfer]:
    """One top-up per purse from the clearing account."""
    ids = IdSource(seed, stream=-1, random_ids=c.random_ids)  # Mix streams are >= 0
    return [
        Transfer(
            id=ids.next(),
            ledger=c.ledger,
            debit_account_id=c.clearing,
            credit_account_id=p,
            amount=POOR_FUNDS_FEN if i % POOR_EVERY == 0 else PURSE_FUNDS_FEN,
            code=TransferCode.TOP_UP,
            user_data=f"load-{p}",
        )
        for i, p in enumerate(c.purses)
    ]


async def load_campus(store: Store, c: Campus, *, seed: int) -> None:
    """Create a campus's accounts and fund its purses through the engine's own batch path."""
    accounts = campus_accounts(c)
    for i in range(0, len(accounts), LOAD_CHUNK):
        statuses = await store.create_accounts(accounts[i : i + LOAD_CHUNK])
        bad = {s for s in statuses if s.value != "created"}
        if bad:
            raise RuntimeError(f"loading accounts answered {bad}")
    tops = funding(c, seed=seed)
    for i in range(0, len(tops), LOAD_CHUNK):
        outcome = await store.post_batch(c.ledger, tops[i : i + LOAD_CHUNK])
        bad_t = {s for s in outcome.statuses if s is not TransferStatus.CREATED}
        if bad_t:
            raise RuntimeError(f"funding answered {bad_t}")

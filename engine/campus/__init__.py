"""The campus layer: holders, cards, terminals and rooms on top of the ledger (contract §2).

A holder owns two ledger accounts, a cash ``purse`` and a ``subsidy`` purse; a dorm room owns a
``room`` purse. Their ids are derived from (ledger, owner, kind), so creating them again is
harmless. A card points at a holder and carries the state machine and the spending rules:

- ``active -> lost`` (report-lost) freezes both purses *in the same database transaction*;
  ``lost -> active`` (found), ``active|lost -> replaced`` (a new card takes over the same purses,
  no money moves) and ``active|lost -> closed``. The purses are frozen exactly while the holder
  has a lost card and no active one.
- ``daily_limit``: today's campus-local spending (meals, hot water, electricity; holds count
  while they hold, reversed spending does not) plus the new amount must not exceed it.
- ``pin`` / ``pin_threshold``: above the threshold the terminal must prove the PIN (field 52).
  Wrong PINs are counted per card and campus-local day (``pin_tries``): after
  ``limits.PIN_TRIES_PER_DAY`` every PIN check of the card fails until the next day or a reset.

Terminal operations (``purchase`` … ``reverse``) return a :class:`PaymentResult`; every transfer
they post has an id derived from the request ``key``, so a retransmission never posts twice,
and goes through the engine's batcher (group commit). Registry operations used by the HTTP API
return their result or a :class:`Refused` with the reason.

Reversals are remembered in ``reversals`` before anything else happens, and every original
re-reads that memory after it posted: whichever of the two comes second sees the other, so an
original and its reversal racing on two connections (or two processes) always net to zero.

The hot path makes no database round trip of its own per request. Every read a terminal
operation needs (the card, the purses, today's spending, the reversal memory, an earlier
attempt's transfers, the balances after) goes through a coalescer (engine/db/coalesce.py): the
requests that arrive while one statement runs share the next one, exactly as the batcher's
group commit shares a transaction, so the reads grow with the load in rows, not in round
trips. Card numbers map to holders and purses through a cache (that mapping never changes);
the card's state itself is read fresh in the shared statement, so a report-lost, replacement
or closure takes effect at once, from any process. Today's spending is remembered per holder
after a first read and kept up to date from every commit the batcher reports, whatever its
door (see engine/campus/spending.py).

Layout, bottom up: ``model`` (vocabulary), ``accounts`` (derived ids), ``reads`` (the coalesced
hot-path reads and their caches), ``posting`` (pure decisions), ``spending`` (today's spending
per holder), ``pin`` (PIN blocks and tries), ``locks`` (per-holder turns), ``shared`` (what one
Campus's operations share), the operations ``reversals``, ``payments``, ``water`` and
``electricity``, ``registry`` (holders, terminals, rooms), ``cards`` (the card office's cards
and their state machine), ``subsidies``, and ``service`` (:class:`Campus`, the facade). This
module only names the public API.
"""

from engine.campus.model import (
    Card,
    CardBalance,
    CardStatus,
    Holder,
    HolderKind,
    HolderResult,
    Outcome,
    PaymentResult,
    Purse,
    PurseBalances,
    Refusal,
    Refused,
    RegistryStatus,
    Replacement,
    Room,
    Terminal,
    TerminalKind,
)
from engine.campus.service import Campus

__all__ = [
    "Campus",
    "Card",
    "CardBalance",
    "CardStatus",
    "Holder",
    "HolderKind",
    "HolderResult",
    "Outcome",
    "PaymentResult",
    "Purse",
    "PurseBalances",
    "Refusal",
    "Refused",
    "RegistryStatus",
    "Replacement",
    "Room",
    "Terminal",
    "TerminalKind",
]

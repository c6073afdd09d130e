"""The hold expirer: releases holds whose timeout has passed, in every ledger."""

from __future__ import annotations

import asyncio
import logging

from engine import limits, metrics
from engine.faults import RETRYABLE
from engine.store import Store, now_ns

__all__ = ["expire_due_holds", "run_expirer"]

log = logging.getLogger(__name__)


async def run_expirer(store: Store, *, interval_s: float = limits.EXPIRER_INTERVAL_S) -> None:
    """Release holds whose timeout has passed, in every ledger, forever (cancel to stop)."""
    while True:
        try:
            await expire_due_holds(store)
        except RETRYABLE as e:
            log.warning("expirer: database unavailable (%s)", e)
        await asyncio.sleep(interval_s)


async def expire_due_holds(store: Store) -> int:
    """One pass of the expirer; returns how many holds it released.

    One indexed statement asks which ledgers have a pending hold past its timeout, for all
    ledgers at once (an idle server with 10,000 ledgers asks one question a second, not
    10,000). Only those ledgers get expiry batches: empty batches with ``expire_due``, the
    same transaction shape, clock and locks as any batch, so they cannot race the committer
    or another engine process; an expiry batch takes the ledger's clock, which sends the
    batch being prepared down the locked path, hence only where there is something to do.
    """
    released = 0
    for ledger in await store.ledgers_with_due_holds(now_ns()):
        try:
            released += await _expire_ledger(store, ledger)
        except RETRYABLE as e:
            if not store.distributed:
                raise  # the one server is away: every other ledger would fail the same way
            # on a cluster, one worker away: the ledgers on the others go on
            log.warning("expirer: ledger %d unavailable (%s)", ledger, e)
    return released


async def _expire_ledger(store: Store, ledger: int) -> int:
    """Release the ledger's overdue holds, a bounded batch at a time; how many."""
    released = 0
    while True:
        outcome = await store.post_batch(ledger, (), expire_due=True)
        metrics.HOLDS_EXPIRED.inc(len(outcome.expired))
        released += len(outcome.expired)
        if len(outcome.expired) < limits.MAX_EXPIRED_PER_RUN:
            return released

"""Answering the callers of a committed batch (engine/batcher.py): every transfer's result,
delivered once, at the latest when the next batch's write is on the server."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import cast

import msgspec

from engine import metrics
from engine.grouping import Group, Request, TransferResult
from ledger.apply import BatchOutcome
from ledger.status import TransferStatus
from ledger.transfer import Transfer

__all__ = ["Answers", "fail", "id_strings"]

log = logging.getLogger(__name__)


class Answers:
    """A committed batch's answers, delivered once (results built, futures resolved, counted)."""

    __slots__ = ("_answers", "_done", "_posted", "_requests", "_timer")

    def __init__(
        self,
        requests: list[Request],
        answers: list[list[TransferResult | None]],
        posted: list[tuple[Group, BatchOutcome]],
    ) -> None:
        self._requests = requests
        self._answers = answers
        self._posted = posted
        self._done = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def size(self) -> int:
        """Transfers answered."""
        return sum(len(g.transfers) for g, _ in self._posted)

    def deliver_by(self, delay_s: float) -> None:
        """Deliver at the latest ``delay_s`` from now (at the next await after it)."""
        self._timer = asyncio.get_running_loop().call_later(delay_s, self.deliver)

    def deliver(self) -> None:
        """Answer every caller of the batch (idempotent; never raises: it also runs as a hook
        inside the next batch's write)."""
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        try:
            self._resolve()
        except Exception as e:  # a bug here must not leave callers waiting forever
            log.exception("answering a batch failed")
            for r in self._requests:
                if not r.future.done():
                    r.future.set_exception(e)

    def _resolve(self) -> None:
        answers = self._answers
        for g, outcome in self._posted:
            ids = id_strings(g.transfers)
            sts, stamps = outcome.statuses, outcome.timestamps
            assert len(ids) == len(sts) == len(stamps), "one answer per transfer"
            for ri, k0, j0, n in g.spans:
                answers[ri][k0 : k0 + n] = [
                    TransferResult(i, st, ts or None)
                    for i, st, ts in zip(
                        ids[j0 : j0 + n], sts[j0 : j0 + n], stamps[j0 : j0 + n], strict=True
                    )
                ]
        tally: Counter[TransferStatus] = Counter()
        for r, a in zip(self._requests, answers, strict=True):
            assert None not in a, "every transfer gets an answer"
            done = cast(list[TransferResult], a)
            tally.update([x.status for x in done])
            if not r.future.done():  # the caller may have gone away
                r.future.set_result(done)
        for status, n in tally.items():  # one labelled increment per status, not per transfer
            metrics.TRANSFERS.labels(status.value).inc(n)


_encode_ids = msgspec.json.Encoder().encode
_decode_strs = msgspec.json.Decoder(list[str]).decode


def id_strings(transfers: list[Transfer]) -> list[str]:
    """The canonical string of every transfer id: one C round trip through msgspec for the
    whole batch rather than a Python-level ``UUID.__str__`` per transfer."""
    return _decode_strs(_encode_ids([t.id for t in transfers]))


def fail(requests: list[Request], e: BaseException) -> None:
    for r in requests:
        if not r.future.done():
            r.future.set_exception(e)

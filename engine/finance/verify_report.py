"""What ``onecard verify`` reports: which check found a problem (``Rank``), the problem, and
the run's counts (``Report``)."""

from __future__ import annotations

import enum
from typing import Final

import msgspec

from engine.calendar import campus_tz, from_ns

MAX_PROBLEMS: Final = 1000  # problems kept per run (the first is the one that matters)


class Rank(enum.IntEnum):
    """Which check found a problem; lower ranks are reported first within a ledger."""

    CHAIN = 0
    HOLD = 1
    SNAPSHOT = 2
    ACCOUNT = 3
    LEDGER = 4
    OPERATOR_LOG = 5  # the installation's chain, reported under ledger 0


class Problem(msgspec.Struct, frozen=True):
    """One thing that is wrong: ``subject`` names the transfer, account or batch."""

    ledger: int
    rank: Rank
    seq: int
    subject: str
    detail: str

    def __str__(self) -> str:
        if self.rank is Rank.OPERATOR_LOG:
            return f"{self.subject}: {self.detail}"
        return f"ledger {self.ledger}: {self.subject}: {self.detail}"


class Report(msgspec.Struct, kw_only=True):
    """What ``verify`` checked and what it found."""

    ledgers: int = 0
    transfers: int = 0
    batches: int = 0
    snapshots: int = 0
    accounts: int = 0
    expired_holds: int = 0
    operator_log: int = 0  # entries of the operator log checked
    problems: list[Problem] = msgspec.field(default_factory=list)
    more_problems: int = 0  # found beyond MAX_PROBLEMS
    found: int = 0  # problems found so far (numbers them in discovery order)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems

    def first(self) -> Problem | None:
        """The problem to report: the lowest ledger, then the lowest rank, then the earliest."""
        return min(self.problems, key=lambda p: (p.ledger, p.rank, p.seq), default=None)

    def ordered(self) -> list[Problem]:
        """Every kept problem in report order."""
        return sorted(self.problems, key=lambda p: (p.ledger, p.rank, p.seq))


def fmt_ts(ts: int) -> str:
    return f"{ts} ({from_ns(ts, campus_tz()).isoformat(timespec='microseconds')})"

"""What the simulator keeps from the answers alone: the money they moved (``Books``) and how
they came back (``Stats``: codes by message type, latencies, everything that went wrong)."""

from __future__ import annotations

import enum
from collections import Counter

from engine import limits


class Op(enum.StrEnum):
    """Message types as the report names them."""

    SIGN_ON = "0800 sign-on"
    MEAL = "0200 purchase"
    INQUIRY = "0200 inquiry"
    ELECTRICITY = "0200 electricity"
    ADVICE = "0220 offline advice"
    HOLD = "0100 hot-water hold"
    COMPLETION = "0220 completion"
    METER = "0220 room meter"
    REVERSAL = "0400 reversal"
    RETRANSMISSION = "retransmission"


class Books:
    """Expected balances kept from the answers: each non-holder account's balance on its
    normal side (clearing and fund are debit-normal); holders keep theirs in SimHolder."""

    def __init__(self, debit_normal: set[int]) -> None:
        self.debit_normal = debit_normal
        self.balance: Counter[int] = Counter()

    def move(self, debit: int, credit: int, amount: int) -> None:
        """``amount`` went from ``debit`` to ``credit``."""
        self.balance[debit] += amount if debit in self.debit_normal else -amount
        self.balance[credit] += -amount if credit in self.debit_normal else amount


class Stats:
    """Answer counts, latencies and everything that went wrong."""

    def __init__(self) -> None:
        self.codes: Counter[tuple[Op, str]] = Counter()
        self.latencies: list[float] = []
        self.problems: list[str] = []
        self.unresolved = 0
        self.retransmit_mismatch = 0
        self.unexpected = 0

    @property
    def answered(self) -> int:
        """Answers received (every attempt)."""
        return sum(self.codes.values())

    def problem(self, text: str) -> None:
        """Record a problem for the report (the first SIMULATOR_MAX_PROBLEMS)."""
        if len(self.problems) < limits.SIMULATOR_MAX_PROBLEMS:
            self.problems.append(text)

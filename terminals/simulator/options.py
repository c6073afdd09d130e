"""What to simulate: the options of ``onecard simulate`` and the bounds they must keep."""

from __future__ import annotations

from typing import Final

import msgspec

from engine import limits

DEFAULT_WORKERS: Final = 1  # processes driving the terminals (0: this process)


class Options(msgspec.Struct, frozen=True, kw_only=True):
    """What to simulate."""

    terminals: int = 500
    duration: float = 60.0
    rate: float = 2000.0
    seed: int = 0
    holders: int | None = None
    ledger: int | None = None
    iso: tuple[str, int] | None = None
    progress: bool = True
    workers: int = DEFAULT_WORKERS


def check_options(o: Options) -> None:
    """ValueError, saying which flag, unless ``o`` describes a run that can be simulated."""
    if o.terminals < limits.SIMULATOR_MIN_TERMINALS:
        raise ValueError(f"--terminals must be at least {limits.SIMULATOR_MIN_TERMINALS}")
    if o.duration <= 0 or o.rate <= 0:
        raise ValueError("--duration and --rate must be positive")
    if not 0 <= o.workers <= limits.SIMULATOR_MAX_WORKERS:
        raise ValueError(f"--workers must be in 0..{limits.SIMULATOR_MAX_WORKERS}")

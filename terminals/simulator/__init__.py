"""``onecard simulate``: a canteen lunch rush of ISO 8583 terminals, then a consistency check.

The simulator builds a fresh campus in its own ledger through the Campus API (``world``:
holders, cards, canteen merchants, POS terminals, water valves, kiosks, dorm rooms with meters,
top-ups and subsidies), starts an in-process Gateway (or drives one already running, ``--iso``),
and lets every terminal talk to it over real TCP (``driver``): meals most of the time, balance
inquiries, hot-water holds and their completions, electricity purchases and meter readings,
~2 % retransmissions (whose answers must be identical), ~0.5 % reversals, and a burst of
offline advices from the tills cut off by a simulated outage.

The terminals run in ``--workers`` separate processes (``workers``; default 1, 0 runs them in
this one), each driving its share of the terminals over its own connections: a load generator
must not eat the CPU of the gateway it measures. Each worker reports the money its answers
moved and the parent adds it up.

It keeps its own books from the answers alone (``books``: an approval moved the money,
anything else did not) and at the end compares every account of the ledger with them, checks
that nothing is left pending and that debits equal credits (``checks``). Any difference, any
unexpected response code, any retransmission answered differently, or any request left without
a definitive answer makes the exit code 1 (``report``). ``run`` puts it together.

This module is the package's public face: the modules inside import each other directly.
"""

from terminals.simulator.books import Op
from terminals.simulator.options import DEFAULT_WORKERS, Options
from terminals.simulator.report import Report, show
from terminals.simulator.run import simulate
from terminals.simulator.world import World

__all__ = ["DEFAULT_WORKERS", "Op", "Options", "Report", "World", "show", "simulate"]

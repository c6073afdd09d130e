"""tests/engine/test_snapshots.py on the cluster: the daily snapshot taken once per day across
restarts and schedulers, ``onecard serve`` taking it (and running its retention pruner without
a fault), balances as of any moment."""

from __future__ import annotations

import pytest

from tests.engine.test_snapshots import *  # noqa: F403 - the module's tests and fixtures, run here

pytestmark = pytest.mark.citus

ONE_SERVER_ONLY = {
    "test_balance_at_reads_only_the_window_after_the_snapshot":
        "it reads the plan's index scans; on a cluster the plan is one task on the ledger's "
        "worker (tests/citus/test_router.py)",
}

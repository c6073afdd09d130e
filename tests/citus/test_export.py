"""tests/engine/test_export.py on the cluster: a business day's journal and settlement files,
the same whatever snapshots surround the day, accepted by bean-check, ``onecard export``, and a
day loaded by COPY into the distributed tables."""

from __future__ import annotations

import pytest

from tests.engine.test_export import *  # noqa: F403 - the module's tests and fixtures, run here

pytestmark = pytest.mark.citus

ONE_SERVER_ONLY = {
    "test_a_busy_day_exports_every_posting": "it builds its own database on the test server",
}

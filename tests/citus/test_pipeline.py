"""tests/engine/test_pipeline.py on the cluster: batches prepared while the previous one commits,
under load; a flag changed in SQL obeyed by the next batch; two engines on one ledger."""

from __future__ import annotations

import pytest

from tests.engine.test_pipeline import *  # noqa: F403 - the module's tests and fixtures, run here

pytestmark = pytest.mark.citus

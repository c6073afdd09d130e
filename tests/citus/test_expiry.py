"""tests/engine/test_expiry.py on the cluster: the hold expirer: holds released without traffic, in
every ledger."""

from __future__ import annotations

import pytest

from tests.engine.test_expiry import *  # noqa: F403 - the module's tests and fixtures, run here

pytestmark = pytest.mark.citus

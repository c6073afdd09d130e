"""tests/engine/test_statement.py on the cluster: an account's statement, paged, with holds and
their states."""

from __future__ import annotations

import pytest

from tests.engine.test_statement import *  # noqa: F403 - the module's tests and fixtures, run here

pytestmark = pytest.mark.citus

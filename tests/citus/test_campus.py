"""tests/campus/test_campus.py on the cluster: the campus layer through the batcher: meals subsidy
first, holds, electricity, reversals, the card registry, daily limits."""

from __future__ import annotations

import pytest

from tests.campus.test_campus import *  # noqa: F403 - the module's tests and fixtures, run here

pytestmark = pytest.mark.citus

"""tests/campus/test_unique.py on the cluster: card numbers and terminal ids unique across ledgers:
concurrent issuers in different ledgers, refusals leaving the value free, the database's own
refusal (reference tables here)."""

from __future__ import annotations

import pytest

from tests.campus.test_unique import *  # noqa: F403 - the module's tests and fixtures, run here

pytestmark = pytest.mark.citus

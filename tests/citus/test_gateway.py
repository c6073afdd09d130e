"""tests/terminals/test_gateway.py on the cluster: the gateway's server over real TCP: framing,
MACs, sign-on, many terminals at once."""

from __future__ import annotations

import pytest

from tests.terminals.test_gateway import *  # noqa: F403 - the module's tests and fixtures, run here

pytestmark = pytest.mark.citus

"""tests/terminals/test_gateway_flows.py on the cluster: the gateway over real TCP (ISO 8583):
purchases, subsidy first, retransmissions answered identically and posted once, reversals, holds
and completions, electricity."""

from __future__ import annotations

import pytest

from tests.terminals.test_gateway_flows import *  # noqa: F403 - the module's tests and fixtures, run here

pytestmark = pytest.mark.citus

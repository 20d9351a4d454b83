"""The userspace backend passes the shared backend suite (tests/lb/backend_suite.py) on
loopback, under both the default event loop and uvloop (the agent's); what only a
proxy does is in test_userspace_proxy.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.lb.backend_suite import BackendSuite
from tests.lb.loopback import LoopbackHarness
from tests.lb.weights_suite import WeightsSuite


@pytest.fixture
async def harness() -> AsyncIterator[LoopbackHarness]:
    made = LoopbackHarness()
    await made.start_reals()
    try:
        yield made
    finally:
        await made.close()


class TestUserspaceBackend(BackendSuite):
    pass


class TestUserspaceWeights(WeightsSuite):
    """Exact smooth weighted round robin, draining, least connections (issue 19)."""

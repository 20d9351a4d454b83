"""The userspace proxy runs under uvloop in the agent and must work on the default
loop too: its tests run under both (the kernel backends' tests need only one)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
import uvloop

BOTH_LOOPS = ("tests.lb.test_userspace_backend", "tests.lb.test_userspace_proxy")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Any] | None:
    module = getattr(item, "module", None)
    if module is not None and module.__name__ in BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}

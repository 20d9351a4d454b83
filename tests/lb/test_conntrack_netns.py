"""Flushing a sandbox's conntrack flows must not look like a SIGTERM to the agent (root).

pyroute2's `netns=` opens its socket from a forked child and stops it with
SIGTERM; the child shares the agent's event-loop signal wakeup fd, so the
agent read that SIGTERM as its own and stopped (found by the issue-15 e2e
tests: the agent stopped whenever a sandboxed task was removed).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator

import pytest
import uvloop

from lb.nft.conntrack import ConntrackFlusher
from lb.table import Real, VirtualKey


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    name = f"t15cli-ct-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=10)


@pytest.mark.parametrize("make_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_flushing_a_sandboxs_flows_is_not_a_signal_to_the_agent(
    namespace: str, make_loop: object
) -> None:
    async def flush() -> tuple[int, list[str]]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        loop.add_signal_handler(signal.SIGTERM, seen.append, "SIGTERM")
        try:
            removed = [(VirtualKey("tcp", "10.9.9.9", 80), Real("10.9.9.10", 80))]
            deleted = await ConntrackFlusher(namespace).flush(removed)
            await asyncio.sleep(0.5)  # a signal written to the wakeup fd is read by now
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
        return deleted, seen

    loop = make_loop()  # type: ignore[operator]
    try:
        deleted, seen = loop.run_until_complete(flush())
    finally:
        loop.close()
    assert (deleted, seen) == (0, [])

"""Members' large push-pulls still pass the limits put on strangers (gossip/aio.py).

Three in-process gossip shells on loopback, one of them holding a 6 MiB state
(random bytes: nothing compresses them), more than a stranger may announce to
a node that has seen no state (UNAUTHENTICATED_FLOOR, 4 MiB). A node started
with that state, and a node that joined and so received it, both take that
member's push-pull; a node that has seen no state refuses it after the length
prefix, unbuffered.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable

from gossip import aio
from gossip.config import GossipConfig
from gossip.membership import Membership
from gossip.messages import Addr
from tests.helpers.agent import free_port

BIG = 6 << 20


class State:
    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.merged: list[int] = []

    def local_state(self, join: bool) -> bytes:
        return self.data

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        self.merged.append(len(data))

    def notify_user(self, payload: bytes, source: str) -> None:
        pass


async def _shell(name: str, addr: Addr, state: State) -> aio.GossipShell:
    loop = asyncio.get_running_loop()
    core = Membership(
        GossipConfig.local(), name, addr, rng=random.Random(1), now=loop.time(), state=state
    )
    shell = aio.GossipShell(core, addr[0], addr[1], tcp_timeout=5.0)
    await shell.start()
    return shell


async def _until(check: Callable[[], object], within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the bound"
        await asyncio.sleep(0.05)


def test_large_state_push_pulls_between_members() -> None:
    async def scenario() -> None:
        port = free_port()
        big, joiner, empty = State(os.urandom(BIG)), State(), State()
        a = await _shell("a", ("127.0.0.21", port), big)
        b = await _shell("b", ("127.0.0.22", port), joiner)
        c = await _shell("c", ("127.0.0.23", port), empty)
        try:
            # Started with its state: it takes a push-pull that large from anyone.
            assert a.unauthenticated_limit() >= 2 * BIG
            assert c.unauthenticated_limit() == aio.UNAUTHENTICATED_FLOOR
            # b dials a: a's 6 MiB answer is a reply on b's own stream (up to MAX_STREAM).
            b.core.join([a.core.members()[0].addr], b.now())
            b.flush()
            await _until(lambda: joiner.merged, 10)
            assert joiner.merged == [BIG]
            assert b.unauthenticated_limit() >= 2 * BIG
            # Now a pushes to b: b has seen that state, so a's frame is accepted.
            a.core.join([("127.0.0.22", port)], a.now())
            a.flush()
            await _until(lambda: len(joiner.merged) == 2, 10)
            # c has seen no state: a's push is refused after its length prefix.
            before = c.drops["oversized"]
            a.core.join([("127.0.0.23", port)], a.now())
            a.flush()
            await _until(lambda: c.drops["oversized"] == before + 1, 10)
            assert empty.merged == []
            limits = {s.core.members()[0].name: s.unauthenticated_limit() >> 20 for s in (a, b, c)}
            print(f"\nstranger limits (MiB): {limits}")
        finally:
            for shell in (a, b, c):
                await shell.stop()

    asyncio.run(scenario())

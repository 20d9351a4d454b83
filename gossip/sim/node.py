"""One simulated process: its core, a recording StateDelegate, and the sim's view of it."""

from __future__ import annotations

from collections.abc import Callable

from gossip.membership import Membership
from gossip.messages import Addr
from gossip.sim.clock import EventQueue

PORT = 7946


def node_addr(index: int) -> Addr:
    return (f"10.0.{index // 256}.{index % 256}", PORT)


class RecordingDelegate:
    """A StateDelegate that keeps no state and records user payloads as they arrive."""

    __slots__ = ("_clock", "_on_first", "name", "received")

    def __init__(
        self, name: str, clock: EventQueue, on_first: Callable[[str, bytes, float], None]
    ) -> None:
        self.name = name
        self._clock = clock
        self._on_first = on_first
        self.received: dict[bytes, float] = {}

    def __repr__(self) -> str:
        return f"<RecordingDelegate {self.name} received={len(self.received)}>"

    def local_state(self, join: bool) -> bytes:
        return b""

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        pass  # no state to merge: the simulator measures the core's own traffic

    def notify_user(self, payload: bytes, source: str) -> None:
        if payload in self.received:
            return
        now = self._clock.now
        self.received[payload] = now
        self._on_first(self.name, payload, now)


class SimNode:
    """One simulated process: a core, its delegate, and the sim's view of it."""

    __slots__ = (
        "addr",
        "core",
        "delegate",
        "generation",
        "index",
        "known",
        "left",
        "name",
        "sent_bytes",
        "timer_at",
        "up",
    )

    def __init__(self, index: int, core: Membership, delegate: RecordingDelegate) -> None:
        self.index = index
        self.name = f"n{index}"
        self.addr = node_addr(index)
        self.core = core
        self.delegate = delegate
        self.generation = 0  # +1 per restart: stale timers and replies are ignored
        self.up = True
        self.left = False  # left gracefully (still up while it gossips the leave)
        self.timer_at: float | None = None
        self.sent_bytes = 0  # UDP + TCP, this node's lifetime across restarts
        self.known: set[str] = set()  # other members this node holds alive or suspect

    def __repr__(self) -> str:
        state = "up" if self.up else "down"
        return f"<SimNode {self.name} {state} gen={self.generation} known={len(self.known)}>"

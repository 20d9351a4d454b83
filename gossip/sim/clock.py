"""Virtual time: one event heap ordered by (time, sequence number).

The simulator never reads a real clock. Every future happening (a packet
arriving, a stream completing, a node's timer) is an entry on one heap;
`pop` returns the earliest and moves `now` to its time. Ties in time are
broken by the order of scheduling (the sequence number), so a run is a pure
function of its inputs and its seed: same seed, same trace, byte for byte.

Entries are plain tuples `(time, seq, kind, node, payload)` (no per-event
objects beyond the tuple itself: this is the simulator's hottest path).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

# Event kinds (ints: cheap to compare and to dispatch on).
PACKET = 0  # payload: (source index, messages or bytes, size)
STREAM = 1  # payload: (source index, message or bytes): a stream reaching its target
REPLY = 2  # payload: (target index, reply or None): the stream's answer back at the opener
TIMER = 3  # payload: None; stale entries are skipped by the cluster (lazy cancel)
CALL = 4  # payload: a zero-argument callable (scenario actions: crash, broadcast, ...)

Entry = tuple[float, int, int, int, Any]


class EventQueue:
    """A min-heap of future events and the virtual clock they drive."""

    __slots__ = ("_heap", "_seq", "now")

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._heap: list[Entry] = []
        self._seq = 0

    def __repr__(self) -> str:
        return f"<EventQueue now={self.now:.3f} pending={len(self._heap)}>"

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, time: float, kind: int, node: int, payload: Any = None) -> None:
        """Schedule an event; a time in the past is clamped to now (time never runs back)."""
        if time < self.now:
            time = self.now
        self._seq += 1
        heapq.heappush(self._heap, (time, self._seq, kind, node, payload))

    def pop(self) -> Entry:
        """Remove and return the earliest event, advancing `now` to its time."""
        entry = heapq.heappop(self._heap)
        self.now = entry[0]
        return entry

    def run_until(self, time: float, dispatch: Callable[[Entry], None]) -> None:
        """Pop and `dispatch` every event due at or before `time`, then set the clock to it.

        The simulator's hot loop: events scheduled by `dispatch` itself are
        run too if they fall due in time.
        """
        heap, pop = self._heap, heapq.heappop
        while heap and heap[0][0] <= time:
            entry = pop(heap)
            self.now = entry[0]
            dispatch(entry)
        if time > self.now:
            self.now = time

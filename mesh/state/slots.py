"""The slots a service's tasks hold, and the lowest free one, in O(log n) per change.

A new task takes the lowest slot no live task of its service holds (as Swarm
numbers replicas); finding it by scanning the service's tasks made every
registration O(n) in the number of tasks (docs/performance.md, API at scale).

Kept here: how many live tasks hold each slot (two nodes may give one slot
at the same moment, and a task merged from a peer may hold any slot), `lowest`,
below which every slot is held or is in `holes`, a min-heap of slots freed
below `lowest`. Holes are checked when read (lazily): one taken again since it
was freed is dropped then. `lowest` only moves up, one held slot at a time, so
the scans that move it add up to the number of slots ever taken.
"""

from __future__ import annotations

import heapq


class SlotIndex:
    def __init__(self) -> None:
        self._held: dict[int, int] = {}  # slot -> live tasks holding it
        self._lowest = 1
        self._holes: list[int] = []

    def __len__(self) -> int:
        return len(self._held)

    def take(self, slot: int) -> None:
        self._held[slot] = self._held.get(slot, 0) + 1
        while self._lowest in self._held:
            self._lowest += 1

    def release(self, slot: int) -> None:
        left = self._held.get(slot, 0) - 1
        if left > 0:
            self._held[slot] = left
            return
        self._held.pop(slot, None)
        if 1 <= slot < self._lowest:
            heapq.heappush(self._holes, slot)

    def lowest_free(self) -> int:
        holes = self._holes
        while holes and holes[0] in self._held:
            heapq.heappop(holes)
        return holes[0] if holes else self._lowest

"""The probe rota: who probes whom in each protocol period, agreed without messages.

SWIM's round-robin over a shuffled list bounds how long one prober takes to
reach a given member (N - 1 periods), but across the cluster the probes of
one member still arrive at random: with N probers each probing one member
per period, the wait from a crash until anyone probes the crashed node is
close to exponential with a one-period mean, and its tail (3-4 periods in 30
crashes at 100 nodes) is most of the p99 of crash detection.

The rota removes that tail. Every node orders the members it considers
ALIVE or SUSPECT, itself included, by a hash of their names, so nodes whose
views agree hold the same order. In protocol period `r` of a clock the
nodes share (Unix time, cut into `probe_interval` slots), the node at
position `p` probes position `p + 1 + (r mod (M - 1))` (mod M). That map is a
rotation, so in each period every member is probed by exactly one node, and
each node still visits every other member once every M - 1 periods (SWIM's
round-robin bound). The wait to the first probe of a crashed node is then
under two periods, half a period at the median.

Nothing depends on the rota being exact. Nodes whose views or clocks differ
pick overlapping targets for a while: a member may be probed twice in a
period and another not at all, which is the shuffled ring's behaviour, never
worse. A target the caller will not probe (dead, or ourselves) is skipped
for the next offset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

__all__ = ["ProbeRota", "rota_key"]


def rota_key(name: str) -> bytes:
    """The sort key every node computes alike for `name` (spreads neighbours at random)."""
    return hashlib.blake2b(name.encode(), digest_size=8).digest() + name.encode()


class ProbeRota:
    """The members to probe in hash order, re-sorted only after the set changed."""

    __slots__ = ("_names", "_order", "_positions")

    def __init__(self) -> None:
        self._names: set[str] = set()
        self._order: list[str] | None = []
        self._positions: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def set(self, name: str, present: bool) -> None:
        """Put `name` on the rota or take it off (the order is rebuilt on next use)."""
        if present and name not in self._names:
            self._names.add(name)
            self._order = None
        elif not present and name in self._names:
            self._names.discard(name)
            self._order = None

    def order(self) -> list[str]:
        if self._order is None:
            self._order = sorted(self._names, key=rota_key)
            self._positions = {name: i for i, name in enumerate(self._order)}
        return self._order

    def target(self, me: str, period: int, accept: Callable[[str], bool]) -> str | None:
        """Whom `me` probes in protocol period `period`: the first member `accept` takes
        at offsets 1 + (period mod (M - 1)), then the offsets after it."""
        order = self.order()
        size = len(order)
        position = self._positions.get(me)
        if position is None or size < 2:
            return None
        first = period % (size - 1)
        for step in range(size - 1):
            name = order[(position + 1 + (first + step) % (size - 1)) % size]
            if accept(name):
                return name
        return None

"""The simulated network: who can reach whom, how late, and what gets lost.

`SimNetwork` only decides; it moves nothing. For every UDP packet the cluster
asks `packet_arrival(src, dst, now)` and gets the virtual time the packet
reaches `dst`, or None if it is lost. For a TCP stream (`stream_arrival`) it
gets a time, or None when the peer cannot be reached at all (partitioned or
crashed): streams are reliable otherwise, as TCP is.

Faults, all changeable while a run is in progress:

- loss: a probability per packet, for every link (`loss`) or one link
  (`set_link`); streams ignore it (TCP retransmits);
- delay: `base + uniform(-jitter, +jitter)` one way (netem's "2ms 1ms"),
  per link if set;
- partitions: groups of nodes that cannot reach one another (`partition`);
  nodes in no group form one more group; `heal` ends it;
- crashes: a crashed node sends nothing and every packet to it is lost;
- slow nodes (Lifeguard's and kinship's "starved" node): everything a slow
  node *receives* (packets, streams, stream replies) is delivered
  `uniform(slow_min, slow_max)` seconds late (default 0.5-2.5 s), while its
  timers fire on time and what it sends leaves on time.

Nodes are the cluster's indices (ints). Every random draw comes from the one
`random.Random` the network is given, in a fixed order, so runs replay.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NetProfile:
    """Default link behaviour; times in seconds, loss a probability in [0, 1]."""

    loss: float = 0.0
    delay: float = 0.002  # one-way base delay (kinship's netem: 2 ms)
    jitter: float = 0.001  # +- uniform jitter (netem: 1 ms)
    slow_min: float = 0.5  # a slow node's receive lag, lower bound (kinship Starve)
    slow_max: float = 2.5  # ... upper bound
    stream_timeout: float = 10.0  # a stream to an unreachable peer fails after this (TCPTimeout)

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be in [0, 1], got {self.loss}")
        if self.delay < 0 or self.jitter < 0 or self.jitter > self.delay:
            raise ValueError("need 0 <= jitter <= delay")
        if not 0 <= self.slow_min <= self.slow_max:
            raise ValueError("need 0 <= slow_min <= slow_max")

    @classmethod
    def lan(cls, loss: float = 0.0) -> NetProfile:
        """kinship's chaos bench: netem 2 ms +- 1 ms, LAN TCPTimeout 10 s."""
        return cls(loss=loss)


@dataclass(frozen=True, slots=True)
class Link:
    """One directed link's override of the profile."""

    loss: float
    delay: float
    jitter: float


class SimNetwork:
    """Loss, delay, partitions, crashes and slow receivers between node indices."""

    def __init__(self, profile: NetProfile, rng: random.Random) -> None:
        self.profile = profile
        self.loss = profile.loss
        self._rng = rng
        self._links: dict[tuple[int, int], Link] = {}
        self._group: dict[int, int] = {}  # node -> partition group; absent: group 0
        self.crashed: set[int] = set()
        self.slow: set[int] = set()

    def __repr__(self) -> str:
        groups = len(set(self._group.values())) + 1 if self._group else 1
        return (
            f"<SimNetwork loss={self.loss:g} groups={groups} crashed={len(self.crashed)} "
            f"slow={len(self.slow)} links={len(self._links)}>"
        )

    # -- faults ------------------------------------------------------------------

    def set_link(
        self,
        src: int,
        dst: int,
        *,
        loss: float | None = None,
        delay: float | None = None,
        jitter: float | None = None,
        both: bool = True,
    ) -> None:
        """Override one link (both directions unless `both=False`)."""
        link = Link(
            self.loss if loss is None else loss,
            self.profile.delay if delay is None else delay,
            self.profile.jitter if jitter is None else jitter,
        )
        self._links[(src, dst)] = link
        if both:
            self._links[(dst, src)] = link

    def clear_links(self) -> None:
        self._links.clear()

    def partition(self, *groups: Iterable[int]) -> None:
        """Split the network: nodes in different groups (the unlisted being one more) can't talk."""
        self._group = {node: number for number, group in enumerate(groups, 1) for node in group}

    def heal(self) -> None:
        self._group = {}

    def reachable(self, src: int, dst: int) -> bool:
        if src in self.crashed or dst in self.crashed:
            return False
        group = self._group
        return not group or group.get(src, 0) == group.get(dst, 0)

    # -- decisions ---------------------------------------------------------------

    def packet_arrival(self, src: int, dst: int, now: float) -> float | None:
        """When a UDP packet sent now reaches `dst`, or None if it is lost."""
        if not self.reachable(src, dst):
            return None
        rng = self._rng
        link = self._links.get((src, dst)) if self._links else None
        if link is None:
            loss, delay, jitter = self.loss, self.profile.delay, self.profile.jitter
        else:
            loss, delay, jitter = link.loss, link.delay, link.jitter
        if loss and rng.random() < loss:
            return None
        return now + self._transit(delay, jitter, dst)

    def stream_arrival(self, src: int, dst: int, now: float) -> float | None:
        """When a stream (or its reply) opened now reaches `dst`; None if it can't connect."""
        if not self.reachable(src, dst):
            return None
        link = self._links.get((src, dst)) if self._links else None
        if link is None:
            return now + self._transit(self.profile.delay, self.profile.jitter, dst)
        return now + self._transit(link.delay, link.jitter, dst)

    def _transit(self, delay: float, jitter: float, dst: int) -> float:
        rng = self._rng
        if jitter:
            delay += jitter * (2.0 * rng.random() - 1.0)
        if dst in self.slow:
            delay += rng.uniform(self.profile.slow_min, self.profile.slow_max)
        return delay

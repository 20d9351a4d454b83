"""Probe round-trip times as a histogram with fixed bounds, sans-IO.

The prober measures each answered probe on the core's injected clock (the
time from its Ping to the Ack that answered it) and adds it here: one bucket
increment and a sum, no list of samples, so the memory is fixed however long
the node runs. The bounds span a LAN's fraction of a millisecond to a probe
that waited out a stretched timeout (Lifeguard's LHA-Probe, several seconds).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

#: upper bounds of the buckets, in seconds (the last bucket, +Inf, is implied)
RTT_BOUNDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

#: how an answered probe's Ack came: from its target over UDP, through a relay
#: (an indirect probe), or over the TCP fallback ping
PATHS = ("direct", "indirect", "tcp")


@dataclass(slots=True)
class RttHistogram:
    """Counts per bucket (not cumulative; the last is +Inf) and the sum, per path."""

    buckets: dict[str, list[int]] = field(
        default_factory=lambda: {path: [0] * (len(RTT_BOUNDS) + 1) for path in PATHS}
    )
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PATHS, 0.0))

    def observe(self, path: str, seconds: float) -> None:
        seconds = max(0.0, seconds)  # a clock never runs back, but a caller's might
        self.buckets[path][bisect_left(RTT_BOUNDS, seconds)] += 1
        self.sums[path] += seconds

    def count(self, path: str) -> int:
        return sum(self.buckets[path])

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Per path: `buckets` (per bound, then +Inf; not cumulative) and `sum`."""
        return {
            path: {"buckets": list(self.buckets[path]), "sum": self.sums[path]} for path in PATHS
        }

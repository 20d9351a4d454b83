"""How many slots of a service's numgen map each real gets (sans-IO, pure arithmetic).

The nftables backend balances with `dnat to numgen inc mod N map @slots`: every
new connection takes the next of N slots, so over each cycle of N connections a
real gets exactly as many as it has slots. Its share is `slots / N`; weighted
round robin wants `weight / total`.

- `rr` (and any scheduler that ignores weights): one slot per real of weight > 0.
- `wrr`: the weights divided by their greatest common divisor. When that total
  fits `MAX_SLOTS` the shares are exact (1:3 is 1 slot and 3: N = 4). Otherwise
  the `MAX_SLOTS` slots are shared out by largest remainder (Hamilton's method):
  each real gets the floor of its quota `weight * MAX_SLOTS / total`, the slots
  left go to the largest fractional parts, so every real is within one slot of
  its quota: its share within 1/MAX_SLOTS (0.006 percentage points) of the
  weight's. A real of weight > 0 whose quota is under one slot still gets one
  (weight 1 among heavy ones must not silently starve); the map then grows by
  those slots, and each such real is over-served by less than one slot's share.

Weight 0 has no slot: no new connection reaches it (draining), while conntrack
keeps the flows it has.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeVar

#: The size a weighted map is capped at when the reduced weights do not fit (2**14):
#: small enough to program in one nft transaction, big enough for 0.006 % accuracy.
MAX_SLOTS = 16384

K = TypeVar("K")


def slot_counts(
    weights: Mapping[K, int], *, weighted: bool, max_slots: int = MAX_SLOTS
) -> dict[K, int]:
    """Slots per real (reals of weight 0 left out) for the numgen map of one service."""
    if max_slots < 1:
        raise ValueError(f"max_slots {max_slots} must be at least 1")
    ready = {real: weight for real, weight in weights.items() if weight > 0}
    if not weighted or not ready:
        return dict.fromkeys(ready, 1)
    divisor = math.gcd(*ready.values())
    reduced = {real: weight // divisor for real, weight in ready.items()}
    total = sum(reduced.values())
    if total <= max_slots:
        return reduced
    counts: dict[K, int] = {}
    remainders: list[tuple[int, K]] = []
    for real, weight in reduced.items():
        whole, rest = divmod(weight * max_slots, total)
        counts[real] = max(whole, 1)
        if whole:
            remainders.append((rest, real))
    left = max_slots - sum(counts.values())
    if left > 0:
        # Largest remainders first; ties broken by order of arrival (stable), so
        # the same weights always give the same map.
        order = sorted(range(len(remainders)), key=lambda i: -remainders[i][0])
        for i in order[:left]:
            counts[remainders[i][1]] += 1
    return counts


def interleave(counts: Mapping[K, int]) -> list[K]:
    """The ring of slots, each real's slots spread evenly over it (in `counts`' order on ties).

    numgen walks the ring in order: 1000:999 as 1,000 slots of one real then 999 of
    the other would be exact over the cycle but send runs of a thousand connections
    to one real. Slot k of a real with c slots sits at (k + 1/2) / c of the ring.
    """
    placed = sorted(
        ((2 * k + 1) / (2 * count), order, real)
        for order, (real, count) in enumerate(counts.items())
        for k in range(count)
    )
    return [real for _, _, real in placed]


def share_error(weights: Mapping[K, int], counts: Mapping[K, int]) -> float:
    """The largest |slots share - weight share| over the reals (for tests and reports)."""
    total_weight = sum(w for w in weights.values() if w > 0)
    total_slots = sum(counts.values())
    if not total_weight or not total_slots:
        return 0.0
    return max(
        abs(counts.get(real, 0) / total_slots - max(weight, 0) / total_weight)
        for real, weight in weights.items()
    )

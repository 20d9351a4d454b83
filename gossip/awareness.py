"""Lifeguard local health (LHA-Probe, the "local health multiplier").

A node that misses acks may be the slow one; rather than accuse others it
stretches its own probe period to `probe_interval * (score + 1)`. memberlist
awareness.go: the score lives in 0 .. max - 1; deltas (state.go probeNode,
refute): successful probe -1; failed probe +(expected nacks - nacks
received), or +1 when no relay could nack; asked to refute +1.
"""

from __future__ import annotations

__all__ = ["Awareness"]


class Awareness:
    """The local health score; 0 is healthy."""

    __slots__ = ("max_multiplier", "score")

    def __init__(self, max_multiplier: int) -> None:
        self.max_multiplier = max_multiplier
        self.score = 0

    def apply_delta(self, delta: int) -> int:
        """Add `delta`, clamped to 0 .. max_multiplier - 1; returns the new score."""
        self.score = min(max(self.score + delta, 0), self.max_multiplier - 1)
        return self.score

    def scale(self, timeout: float) -> float:
        """timeout * (score + 1) (memberlist awareness.go ScaleTimeout)."""
        return timeout * (self.score + 1)

    def __repr__(self) -> str:
        return f"<Awareness {self.score}/{self.max_multiplier - 1}>"

"""Lifeguard dynamic suspicion (LHA-Suspicion): one timer per suspected member.

A suspicion starts at the max timeout and shrinks toward the min as
independent confirmations arrive — Suspect messages about the same member
from distinct senders; the first accuser is not counted (memberlist
suspicion.go newSuspicion/Confirm). With k = 0 wanted confirmations (small
clusters, or Lifeguard switched off: plain SWIM) it is the min from the start.
The maths lives in `gossip.config.suspicion_timeout`; here is only the state.
"""

from __future__ import annotations

from gossip.config import (
    GossipConfig,
    suspicion_confirmations_wanted,
    suspicion_max_timeout,
    suspicion_min_timeout,
    suspicion_timeout,
)

__all__ = ["Suspicion"]


class Suspicion:
    """Confirmations and deadline of one suspicion; the clock is the caller's `now`."""

    __slots__ = (
        "_senders",
        "confirmations",
        "deadline",
        "k",
        "max_timeout",
        "min_timeout",
        "start",
    )

    def __init__(
        self, accuser: str, *, k: int, min_timeout: float, max_timeout: float, start: float
    ) -> None:
        self._senders = {accuser}  # membership tests only
        self.k = k
        self.min_timeout, self.max_timeout = min_timeout, max_timeout
        self.start = start
        self.confirmations = 0
        self.deadline = start + suspicion_timeout(0, k, min_timeout, max_timeout)

    @classmethod
    def begin(
        cls, accuser: str, config: GossipConfig, n: int, *, start: float, lifeguard: bool = True
    ) -> Suspicion:
        """A suspicion sized for a cluster of n (memberlist state.go suspectNode); without
        Lifeguard no confirmations are wanted, so it is plain SWIM's fixed min timeout."""
        k = suspicion_confirmations_wanted(config.suspicion_mult, n) if lifeguard else 0
        low = suspicion_min_timeout(config.suspicion_mult, n, config.probe_interval)
        high = suspicion_max_timeout(config.suspicion_max_timeout_mult, low)
        return cls(accuser, k=k, min_timeout=low, max_timeout=high, start=start)

    def confirm(self, sender: str) -> bool:
        """Count `sender` once; True if it was new (then re-gossip the Suspect, memberlist)."""
        if self.confirmations >= self.k or sender in self._senders:
            return False
        self._senders.add(sender)
        self.confirmations += 1
        self.deadline = self.start + suspicion_timeout(
            self.confirmations, self.k, self.min_timeout, self.max_timeout
        )
        return True

    def __repr__(self) -> str:
        return (
            f"<Suspicion {self.confirmations}/{self.k} confirmations, deadline {self.deadline:.3f}>"
        )

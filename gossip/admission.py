"""Who may hold an inbound gossip stream, and for how long before proving who it is (sans-IO).

A gossip TCP stream carries one framed message each way. Before its first
frame has been read and opened (decrypted and verified with the keyring, or
for a plaintext cluster decoded as a valid message) the peer is a stranger:
anyone who can reach the port. Strangers are held apart from members, so
that idle or slow strangers cannot take the slots members need to join and
push-pull:

- at most `per_source` streams from one source address at a time, whatever
  their state (one peer cannot fill the tables alone);
- at most `unauthenticated` strangers at a time; one more evicts the oldest
  (a stranger's first frame arrives within its deadline or never, and a
  member's join is the newest connection, so it is not the one cut);
- at most `unauthenticated_bytes` of first frames in flight, counted from
  their length prefixes before a byte of the frame is read; a frame that
  does not fit evicts older strangers' frames, and one larger than the whole
  budget is refused;
- only an authenticated stream takes one of the `authenticated` slots
  (memberlist's 128 push-pulls in flight).

The shell owns the sockets and the clocks: it asks here, cuts what it is
told to cut, and releases every ticket when its stream ends. Every refusal
and eviction is counted in `drops` by reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

#: Drop reasons counted here (the shell's counters, GET /v1/gossip `drops`).
TOO_MANY_FROM_SOURCE = "too_many_from_source"
UNAUTHENTICATED_EVICTED = "unauthenticated_evicted"
TOO_MANY_STREAMS = "too_many_streams"
OVERSIZED = "oversized"


class Stage(Enum):
    UNAUTHENTICATED = "unauthenticated"
    AUTHENTICATED = "authenticated"
    GONE = "gone"  # released or evicted: nothing held any more


@dataclass(eq=False)
class Ticket:
    """One inbound stream's hold on the tables; `cut` closes its connection."""

    source: str
    cut: Callable[[], None] = field(repr=False)
    stage: Stage = Stage.UNAUTHENTICATED
    reserved: int = 0  # bytes of its first frame counted against the stranger budget
    evicted: bool = False


class Admission:
    def __init__(
        self,
        drops: Counter[str],
        *,
        per_source: int = 8,
        unauthenticated: int = 256,
        unauthenticated_bytes: int = 64 << 20,
        authenticated: int = 128,
    ) -> None:
        self.drops = drops
        self.per_source = per_source
        self.unauthenticated_cap = unauthenticated
        self.unauthenticated_bytes_cap = unauthenticated_bytes
        self.authenticated_cap = authenticated
        self._by_source: Counter[str] = Counter()
        # Insertion order is age: the first is the oldest stranger, evicted first.
        self._strangers: dict[Ticket, None] = {}
        self._reserved = 0
        self._authenticated = 0

    def __repr__(self) -> str:
        return (
            f"<Admission strangers={len(self._strangers)} reserved={self._reserved} "
            f"authenticated={self._authenticated}>"
        )

    @property
    def unauthenticated(self) -> int:
        return len(self._strangers)

    @property
    def unauthenticated_reserved(self) -> int:
        return self._reserved

    @property
    def authenticated(self) -> int:
        return self._authenticated

    def admit(self, source: str, cut: Callable[[], None]) -> Ticket | None:
        """A ticket for a new connection from `source`, or None: refuse it (counted)."""
        if self._by_source[source] >= self.per_source:
            self.drops[TOO_MANY_FROM_SOURCE] += 1
            return None
        while len(self._strangers) >= self.unauthenticated_cap:
            self._evict(next(iter(self._strangers)))
        ticket = Ticket(source, cut)
        self._by_source[source] += 1
        self._strangers[ticket] = None
        return ticket

    def reserve(self, ticket: Ticket, size: int) -> bool:
        """Count a stranger's first frame of `size` bytes before reading it; False: refuse."""
        if ticket.stage is not Stage.UNAUTHENTICATED or ticket.reserved:
            return False
        if size > self.unauthenticated_bytes_cap:
            self.drops[OVERSIZED] += 1
            return False
        older = (t for t in list(self._strangers) if t is not ticket and t.reserved)
        while self._reserved + size > self.unauthenticated_bytes_cap:
            self._evict(next(older))  # the cap holds `size`, so the others free enough
        ticket.reserved = size
        self._reserved += size
        return True

    def authenticate(self, ticket: Ticket) -> bool:
        """The stream's first frame opened: move it to a member's slot; False: none free."""
        if ticket.stage is not Stage.UNAUTHENTICATED:
            return False
        self._forget_stranger(ticket)
        if self._authenticated >= self.authenticated_cap:
            self.drops[TOO_MANY_STREAMS] += 1
            self._leave_source(ticket)
            return False
        ticket.stage = Stage.AUTHENTICATED
        self._authenticated += 1
        return True

    def release(self, ticket: Ticket) -> None:
        """The stream ended: free whatever it holds (again is a no-op)."""
        if ticket.stage is Stage.UNAUTHENTICATED:
            self._forget_stranger(ticket)
        elif ticket.stage is Stage.AUTHENTICATED:
            self._authenticated -= 1
        else:
            return
        self._leave_source(ticket)

    def _evict(self, ticket: Ticket) -> None:
        self.drops[UNAUTHENTICATED_EVICTED] += 1
        ticket.evicted = True
        self.release(ticket)
        ticket.cut()

    def _forget_stranger(self, ticket: Ticket) -> None:
        del self._strangers[ticket]
        self._reserved -= ticket.reserved
        ticket.reserved = 0

    def _leave_source(self, ticket: Ticket) -> None:
        ticket.stage = Stage.GONE
        self._by_source[ticket.source] -= 1
        if self._by_source[ticket.source] <= 0:
            del self._by_source[ticket.source]

"""Choosing a real server for a new connection: round robin, weighted round robin,
least connections, Maglev (sans-IO; the proxies call `pick` once per connection or flow).

A `Pool` holds one virtual service's real servers and their weights. Weight 0
drains a real: it is never picked, but the connections it already has are
still counted (least-connections must see them until they end). `pick(skip)`
passes over reals the caller already failed to reach, which is how a
connection fails over to the next real.

Maglev hashes the client's address and port into `lb.maglev`'s lookup table
(rebuilt when the ready reals change, keeping its size while big enough), so a
real added or removed moves only about 1/N of the clients. Session affinity
(`affinity` seconds) keeps a client address on the real it was last given while
it comes back within that time: a table bounded to `AFFINITY_LIMIT` clients
(the least recently seen one is dropped first), whose entries expire by the
clock the caller passes, and are dropped when their real stops taking new
connections.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

from lb import maglev
from lb.table import Real, Scheduler

NOTHING: frozenset[Real] = frozenset()
#: Clients one pool remembers for session affinity; past it the least recent is forgotten.
AFFINITY_LIMIT = 65536


class Pool:
    def __init__(self, scheduler: Scheduler = Scheduler.ROUND_ROBIN, affinity: int = 0) -> None:
        self.scheduler = scheduler
        #: seconds a client address keeps its real (0: no affinity)
        self.affinity = affinity
        # client address -> (its real, when the entry expires); least recent first
        self._affinity: OrderedDict[str, tuple[Real, float]] = OrderedDict()
        #: affinity entries dropped because the table was full
        self.affinity_evicted = 0
        self._maglev: list[Real] = []
        self._maglev_size: int | None = None
        self.weights: dict[Real, int] = {}
        #: open connections (or UDP flows) per real, draining ones included
        self.active: dict[Real, int] = {}
        self._ready: list[Real] = []  # weight > 0, in a stable order
        # Set when the reals change; `_ready` is sorted again at the next pick, so a burst
        # of 10,000 registrations costs one sort, not one per registration.
        self._stale = False
        self._next = 0
        self._current: dict[Real, int] = {}  # smooth weighted round robin's running scores

    def __repr__(self) -> str:
        return f"<Pool {self.scheduler} ready={self.ready} of {len(self.weights)}>"

    def set(self, real: Real, weight: int) -> None:
        if self.weights.get(real) == weight:
            return
        self.weights[real] = weight
        self._mark_stale()

    def remove(self, real: Real) -> None:
        if self.weights.pop(real, None) is not None:
            self._mark_stale()

    def _mark_stale(self) -> None:
        self._stale = True

    def _refresh(self) -> None:
        self._stale = False
        self._ready = sorted(r for r, w in self.weights.items() if w > 0)
        # Smooth weighted round robin starts a new cycle from zero scores: every run of
        # sum(weights) picks from here gives each real exactly its weight. Made at its
        # first pick: a pool of another scheduler never needs them (a dict of every
        # ready real, ~0.3 MB a pool of 10,000).
        self._current = {}
        if self._next >= len(self._ready):
            self._next = 0
        self._maglev = []  # rebuilt at the next Maglev pick

    def configure(self, scheduler: Scheduler, affinity: int) -> None:
        """Change the scheduler and affinity (the service's options changed)."""
        self.scheduler = scheduler
        if affinity != self.affinity:
            self.affinity = affinity
            self._affinity.clear()

    @property
    def ready(self) -> int:
        """How many reals take new connections."""
        if self._stale:
            self._refresh()
        return len(self._ready)

    def pick(
        self,
        skip: Container[Real] = NOTHING,
        client: tuple[str, int] | None = None,
        now: float = 0.0,
    ) -> Real | None:
        """The real for a new connection, or None when every ready one is in `skip`.

        `client` (address, port) is what Maglev hashes and affinity remembers;
        `now` (monotonic seconds) is the affinity table's clock.
        """
        if self._stale:
            self._refresh()
        if not self._ready:
            return None
        if self.affinity and client is not None:
            return self._affine(skip, client, now)
        return self._schedule(skip, client)

    def _affine(self, skip: Container[Real], client: tuple[str, int], now: float) -> Real | None:
        address = client[0]
        table = self._affinity
        self.expire(now)  # entries share one timeout: the expired ones are at the front
        entry = table.pop(address, None)
        if entry is not None:
            kept, expires = entry
            if expires > now and self.weights.get(kept, 0) > 0 and kept not in skip:
                table[address] = (kept, now + self.affinity)
                return kept
        real = self._schedule(skip, client)
        if real is not None:
            table[address] = (real, now + self.affinity)
            while len(table) > AFFINITY_LIMIT:
                table.popitem(last=False)
                self.affinity_evicted += 1
        return real

    def expire(self, now: float) -> int:
        """Forget affinity entries expired by `now` (the least recent first); how many."""
        table = self._affinity
        gone = 0
        while table:
            address, (_, expires) = next(iter(table.items()))
            if expires > now:
                break
            del table[address]
            gone += 1
        return gone

    @property
    def affinity_clients(self) -> int:
        """Client addresses the affinity table holds."""
        return len(self._affinity)

    def _schedule(self, skip: Container[Real], client: tuple[str, int] | None) -> Real | None:
        if self.scheduler is Scheduler.MAGLEV and client is not None:
            return self._maglev_pick(skip, client)
        if self.scheduler is Scheduler.WEIGHTED_ROUND_ROBIN:
            return self._weighted(skip)
        if self.scheduler is Scheduler.LEAST_CONNECTIONS:
            return self._least(skip)
        ready = self._ready
        for _ in range(len(ready)):
            real = ready[self._next]
            self._next = (self._next + 1) % len(ready)
            if not skip or real not in skip:  # hashing a Real is a Python call: not for none
                return real
        return None

    def _maglev_pick(self, skip: Container[Real], client: tuple[str, int]) -> Real | None:
        if not self._maglev:
            self._maglev_size = maglev.table_size(len(self._ready), self._maglev_size)
            self._maglev = maglev.build(self._ready, self._maglev_size)
        table = self._maglev
        index = maglev.flow_hash(*client) % len(table)
        # A real already tried (it refused): the next entries of the table, as
        # the hash would land there had that real gone.
        for step in range(len(table)):
            real = table[(index + step) % len(table)]
            if real not in skip:
                return real
        return None

    def _weighted(self, skip: Container[Real]) -> Real | None:
        # Smooth weighted round robin (nginx's): every real gains its weight, the
        # highest score wins and pays the total back; weights 3:1 give a a b a ...
        # Exact: over each cycle of sum(weights) picks a real is picked weight times.
        if not self._current:
            self._current = dict.fromkeys(self._ready, 0)
        total = 0
        best: Real | None = None
        best_score = 0
        for real in self._ready:
            if real in skip:
                continue
            weight = self.weights[real]
            total += weight
            score = self._current[real] + weight
            self._current[real] = score
            if best is None or score > best_score:
                best, best_score = real, score
        if best is not None:
            self._current[best] -= total
        return best

    def _least(self, skip: Container[Real]) -> Real | None:
        # Fewest open connections per unit of weight; ties go round robin, so
        # that an idle pool still spreads new connections.
        ready = self._ready
        count = len(ready)
        best: Real | None = None
        best_load = 0.0
        for offset in range(count):
            real = ready[(self._next + offset) % count]
            if real in skip:
                continue
            load = self.active.get(real, 0) / self.weights[real]
            if best is None or load < best_load:
                best, best_load = real, load
        self._next = (self._next + 1) % count
        return best

    def opened(self, real: Real) -> None:
        self.active[real] = self.active.get(real, 0) + 1

    def closed(self, real: Real) -> None:
        left = self.active.get(real, 0) - 1
        if left > 0:
            self.active[real] = left
        else:
            self.active.pop(real, None)

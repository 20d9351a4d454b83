"""Choosing a real server for a new connection: round robin, weighted round robin,
least connections (sans-IO; the proxies call `pick` once per connection or flow).

A `Pool` holds one virtual service's real servers and their weights. Weight 0
drains a real: it is never picked, but the connections it already has are
still counted (least-connections must see them until they end). `pick(skip)`
passes over reals the caller already failed to reach, which is how a
connection fails over to the next real.
"""

from __future__ import annotations

from collections.abc import Container

from lb.table import Real, Scheduler

NOTHING: frozenset[Real] = frozenset()


class Pool:
    def __init__(self, scheduler: Scheduler = Scheduler.ROUND_ROBIN) -> None:
        self.scheduler = scheduler
        self.weights: dict[Real, int] = {}
        #: open connections (or UDP flows) per real, draining ones included
        self.active: dict[Real, int] = {}
        self._ready: list[Real] = []  # weight > 0, in a stable order
        self._next = 0
        self._current: dict[Real, int] = {}  # smooth weighted round robin's running scores

    def __repr__(self) -> str:
        return f"<Pool {self.scheduler} ready={len(self._ready)} of {len(self.weights)}>"

    def set(self, real: Real, weight: int) -> None:
        if self.weights.get(real) == weight:
            return
        self.weights[real] = weight
        self._rebuild()

    def remove(self, real: Real) -> None:
        if self.weights.pop(real, None) is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        self._ready = sorted(r for r, w in self.weights.items() if w > 0)
        # Smooth weighted round robin starts a new cycle from zero scores: every run of
        # sum(weights) picks from here gives each real exactly its weight.
        self._current = dict.fromkeys(self._ready, 0)
        if self._next >= len(self._ready):
            self._next = 0

    @property
    def ready(self) -> int:
        """How many reals take new connections."""
        return len(self._ready)

    def pick(self, skip: Container[Real] = NOTHING) -> Real | None:
        """The real for a new connection, or None when every ready one is in `skip`."""
        if not self._ready:
            return None
        if self.scheduler is Scheduler.WEIGHTED_ROUND_ROBIN:
            return self._weighted(skip)
        if self.scheduler is Scheduler.LEAST_CONNECTIONS:
            return self._least(skip)
        ready = self._ready
        for _ in range(len(ready)):
            real = ready[self._next]
            self._next = (self._next + 1) % len(ready)
            if real not in skip:
                return real
        return None

    def _weighted(self, skip: Container[Real]) -> Real | None:
        # Smooth weighted round robin (nginx's): every real gains its weight, the
        # highest score wins and pays the total back; weights 3:1 give a a b a ...
        # Exact: over each cycle of sum(weights) picks a real is picked weight times.
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

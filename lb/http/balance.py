"""Which task gets a request: round robin, sticky cookies and passive health (sans-IO).

Round robin is per route. A sticky route (HRM 2 `sticky_sessions=<cookie>`)
honours the cookie when it names a task that is still among the route's
healthy endpoints, and otherwise picks by round robin and asks the proxy to
set the cookie. Passive health: a task whose connect failed is ejected from
every route for `eject_seconds` (the clock is injected); when every endpoint
of a route is ejected the router tries them anyway, since a guess beats a
certain 503.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from lb.http.routes import Endpoint, Match, Route
from lb.http.stats import RouteStats

#: per-route entries kept at most; past it the oldest are forgotten (a route churn guard)
MAX_ROUTES = 10_000


class Balancer:
    def __init__(self, clock: Callable[[], float], eject_seconds: float = 10.0) -> None:
        self._clock = clock
        self.eject_seconds = eject_seconds
        self._ejected: dict[str, float] = {}  # task id -> ejected until
        self.routes: dict[Route, RouteStats] = {}
        self._by_id: dict[int, tuple[Route, RouteStats]] = {}
        self.ejections = 0

    def stats(self, route: Route) -> RouteStats:
        # Keyed by identity first: a Route's own hash covers every field, and the
        # table hands out the same Route object for as long as the route is unchanged.
        cached = self._by_id.get(id(route))
        if cached is not None and cached[0] is route:
            return cached[1]
        stats = self.routes.get(route)
        if stats is None:
            if len(self.routes) >= MAX_ROUTES:
                del self.routes[next(iter(self.routes))]
                self._by_id.clear()
            stats = self.routes[route] = RouteStats()
        if len(self._by_id) >= MAX_ROUTES:
            self._by_id.clear()
        self._by_id[id(route)] = (route, stats)
        return stats

    def pick(
        self,
        match: Match,
        sticky: str | None = None,
        exclude: Collection[str] = (),
        stats: RouteStats | None = None,
    ) -> Endpoint | None:
        """The endpoint for a request; None when every endpoint was already tried."""
        endpoints = match.endpoints
        if sticky is not None and not exclude:
            for endpoint in endpoints:
                if endpoint.task_id == sticky:
                    if not self.is_ejected(endpoint.task_id):
                        return endpoint
                    break
        if stats is None:
            stats = self.stats(match.route)
        count = len(endpoints)
        fallback: Endpoint | None = None
        for _ in range(count):
            stats.rr = (stats.rr + 1) % count
            endpoint = endpoints[stats.rr]
            if endpoint.task_id in exclude:
                continue
            if not self._ejected or not self.is_ejected(endpoint.task_id):
                return endpoint
            if fallback is None:
                fallback = endpoint
        return fallback

    def is_ejected(self, task_id: str) -> bool:
        until = self._ejected.get(task_id)
        if until is None:
            return False
        if until <= self._clock():
            del self._ejected[task_id]
            return False
        return True

    def connect_failed(self, task_id: str) -> None:
        """A connection to the task was refused or timed out: no new requests for a while."""
        if task_id not in self._ejected:
            self.ejections += 1
        self._ejected[task_id] = self._clock() + self.eject_seconds

    def ejected(self) -> list[str]:
        return [t for t in list(self._ejected) if self.is_ejected(t)]

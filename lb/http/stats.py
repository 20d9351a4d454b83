"""The router's counters: per route and for the whole process, as plain objects.

The metrics work exports these (`RouterStats.snapshot()` is a plain dict);
the router only ever adds to them, so reading them costs the hot path nothing.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

#: upper bounds (seconds) of the upstream-latency histogram's buckets (Prometheus's
#: defaults); `RouteStats.latency_buckets[i]` counts the requests with
#: `LATENCY_BOUNDS[i-1] < seconds <= LATENCY_BOUNDS[i]`, the last one those above all
LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


#: what became of an HTTPS connection once its ClientHello was read (or not), each
#: counted once: terminated here with the certificate its SNI names (`certificate`), with
#: the default certificate because none names its host (`default_certificate`) or because
#: it named none (`no_sni`); spliced to a task by an `sni://` route (`passthrough`); its
#: handshake here failed (`failed`: bad TLS, reset, timeout); or it was closed before a
#: handshake (`refused`: no ClientHello in time, not TLS, no certificate and no route)
TLS_OUTCOMES = (
    "certificate",
    "default_certificate",
    "no_sni",
    "passthrough",
    "failed",
    "refused",
)


def _no_tls_outcomes() -> dict[str, int]:
    return dict.fromkeys(TLS_OUTCOMES, 0)


def _no_latencies() -> list[int]:
    return [0] * (len(LATENCY_BOUNDS) + 1)


@dataclass(slots=True)
class RouteStats:
    """One route: requests by status class, latency sum, count and buckets, retries."""

    by_class: list[int] = field(default_factory=lambda: [0] * 6)  # index: status // 100
    latency_sum: float = 0.0
    latency_count: int = 0
    latency_buckets: list[int] = field(default_factory=_no_latencies)
    retries: int = 0
    rr: int = 0  # the round-robin position, kept here to need one lookup per request

    def record(self, status: int, seconds: float) -> None:
        self.by_class[min(status // 100, 5)] += 1
        self.latency_sum += seconds
        self.latency_count += 1
        self.latency_buckets[bisect_left(LATENCY_BOUNDS, seconds)] += 1

    @property
    def requests(self) -> dict[str, int]:
        return {f"{i}xx": n for i, n in enumerate(self.by_class) if i}


@dataclass(slots=True)
class RouterStats:
    """Process-wide counters; `rejected` is keyed by the status the router answered."""

    connections_open: int = 0
    connections_total: int = 0
    requests: int = 0
    rejected: dict[int, int] = field(default_factory=dict)  # 400, 408, 413, 431, ...
    no_route: int = 0  # 404
    no_endpoint: int = 0  # 503
    connect_failures: int = 0
    #: connects that failed for want of descriptors or socket memory on the router's
    #: side (EMFILE, ENFILE, ENOBUFS, ENOMEM): 503, and never the task's fault
    fd_shortage: int = 0
    #: clients refused (503 and close) because the descriptor budget was full
    over_budget: int = 0
    #: request bodies cut (408) for arriving too slowly (deadline or minimum rate)
    slow_bodies: int = 0
    upstream_timeouts: int = 0
    retries: int = 0
    upgrades: int = 0
    tls_handshakes: int = 0
    passthrough: int = 0
    #: HTTPS connections by outcome (`TLS_OUTCOMES`): one dict increment per connection
    tls_outcomes: dict[str, int] = field(default_factory=_no_tls_outcomes)

    def reject(self, status: int) -> None:
        self.rejected[status] = self.rejected.get(status, 0) + 1

    def snapshot(self, routes: dict[Any, RouteStats]) -> dict[str, Any]:
        """Everything as plain data: the process counters and one entry per route."""
        return {
            "connections_open": self.connections_open,
            "connections_total": self.connections_total,
            "requests": self.requests,
            "rejected": dict(self.rejected),
            "no_route": self.no_route,
            "no_endpoint": self.no_endpoint,
            "connect_failures": self.connect_failures,
            "fd_shortage": self.fd_shortage,
            "over_budget": self.over_budget,
            "slow_bodies": self.slow_bodies,
            "upstream_timeouts": self.upstream_timeouts,
            "retries": self.retries,
            "upgrades": self.upgrades,
            "tls_handshakes": self.tls_handshakes,
            "passthrough": self.passthrough,
            "tls_outcomes": dict(self.tls_outcomes),
            "routes": [
                {
                    "service": r.service,
                    "host": r.host,
                    "path_prefix": r.path_prefix,
                    "requests": s.requests,
                    "latency_sum": s.latency_sum,
                    "latency_count": s.latency_count,
                    "latency_buckets": list(s.latency_buckets),
                    "retries": s.retries,
                }
                for r, s in routes.items()
            ],
        }

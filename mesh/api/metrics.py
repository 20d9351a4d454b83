"""`GET /metrics`: the agent's counters in the Prometheus text format (OpenMetrics on `Accept`).

Nothing here runs per request or per packet: the hot paths keep their counters
as plain ints (gossip's `Counter`s, the DNS responder's dict, the HTTP router's
`RouterStats`) and `MeshCollector` reads them when Prometheus scrapes, turning
each into a family named `meshplane_...` (every family is in docs/metrics.md).
The HTTP routing mesh's counters are already the sum over its worker processes
(`HttpMesh.snapshot`: each worker's last report plus what the workers that are
gone counted), and the DNS workers' are added to the agent's own
(`WorkerTotals`), so a worker restart never takes a counter backwards.

Label values come from closed sets (a status, a drop reason, a counter's name)
or from the state (a service's name): no client address, no path. A series of a
service that no longer exists is left out, so it goes away with the service.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from itertools import accumulate
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from dns.querystats import LATENCY_BOUNDS as DNS_LATENCY_BOUNDS
from dns.querystats import latency_of, queries_of
from dns.service import forwards_of, is_level
from gossip.rtt import RTT_BOUNDS
from lb.http.labels import Problem
from lb.http.stats import LATENCY_BOUNDS, TLS_OUTCOMES
from mesh.api.app import DEPS, ApiDeps

#: every status a node can have as this node's gossip sees it (a zero series for each)
NODE_STATUSES = ("alive", "suspect", "dead", "left")


class MeshCollector(Collector):
    """Every meshplane family, read from the agent's parts at scrape time."""

    def __init__(self, deps: ApiDeps) -> None:
        self._deps = deps

    def collect(self) -> Iterator[Metric]:
        deps = self._deps
        services = {service.name for service in deps.control.store.services()}
        yield from _state(deps, services)
        if deps.node_statuses is not None:
            yield from _members(deps.node_statuses())
        if deps.gossip_stats is not None:
            yield from _gossip(deps.gossip_stats())
        if deps.dns_stats is not None:
            yield from _dns(_dns_total(deps))
        if deps.worker_processes is not None:
            yield from _workers(deps.worker_processes(), deps.control.feed.seq)
        if deps.lb_counters is not None:
            yield from _lb(deps.lb_counters(), services)
        if deps.http_stats is not None:
            yield from _http(deps.http_stats(), services)
        if deps.route_problems is not None:
            yield _route_problems(deps.route_problems(), services)


def _state(deps: ApiDeps, services: set[str]) -> Iterator[Metric]:
    store = deps.control.store
    yield GaugeMetricFamily("meshplane_services", "Services in the state", value=len(services))
    tasks = GaugeMetricFamily(
        "meshplane_tasks",
        "Tasks in the state by health and by the status of their node as this node sees it",
        labels=["health", "node_status"],
    )
    status_of = deps.node_status()
    counts = Counter((task.health.value, status_of(task.node)) for task in store.tasks())
    for (health, node_status), count in sorted(counts.items()):
        tasks.add_metric([health, node_status], count)
    yield tasks
    yield GaugeMetricFamily(
        "meshplane_state_changes",
        "The change feed's sequence number: changes applied on this node since it started",
        value=deps.control.feed.seq,
    )


def _members(statuses: Mapping[str, str]) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "meshplane_gossip_members",
        "Nodes by status, as this node's gossip sees them",
        labels=["status"],
    )
    counts = Counter(statuses.values())
    for status in sorted(set(NODE_STATUSES) | set(counts)):
        family.add_metric([status], counts.get(status, 0))
    yield family


def _gossip(stats: Mapping[str, Any]) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "meshplane_gossip_health_score",
        "Lifeguard's local health score (0: healthy; higher: this node is slow to answer)",
        value=stats.get("health_score", 0),
    )
    yield GaugeMetricFamily(
        "meshplane_gossip_incarnation",
        "This node's incarnation number (raised to refute a suspicion, and at each start)",
        value=stats.get("incarnation", 0),
    )
    yield _labelled_counter(
        "meshplane_gossip_dropped_packets",
        "Gossip packets dropped, by reason",
        "reason",
        stats.get("drops", {}),
    )
    messages = CounterMetricFamily(
        "meshplane_gossip_messages",
        "Gossip messages over UDP by direction and type (each part of a compound packet)",
        labels=["direction", "type"],
    )
    for direction, by_type in sorted(stats.get("messages", {}).items()):
        for kind, count in sorted(by_type.items()):
            messages.add_metric([direction, kind], count)
    yield messages
    yield _labelled_counter(
        "meshplane_gossip_bytes",
        "Gossip UDP bytes by direction, as the wire carries them (sealed)",
        "direction",
        stats.get("bytes", {}),
    )
    yield _labelled_counter(
        "meshplane_gossip_stream_bytes",
        "Gossip TCP stream bytes (push-pulls, fallback pings) by direction, as sent and read",
        "direction",
        stats.get("stream_bytes", {}),
    )
    counts: Mapping[str, int] = stats.get("counts", {})
    yield _labelled_counter(
        "meshplane_gossip_suspicions",
        "Suspicions of other members: raised here, refuted (the member alive again), "
        "confirmed (declared dead)",
        "outcome",
        {outcome: counts.get(stat, 0) for outcome, stat in _SUSPICION_OUTCOMES.items()},
    )
    yield CounterMetricFamily(
        "meshplane_gossip_self_refutations",
        "Suspicions or deaths of this node it refuted by raising its incarnation",
        value=counts.get("refutes", 0),
    )
    yield _labelled_counter(
        "meshplane_gossip_push_pulls",
        "Push-pull state syncs: initiated by this node, served to a peer, failed (initiated)",
        "outcome",
        {outcome: counts.get(stat, 0) for outcome, stat in _PUSH_PULL_OUTCOMES.items()},
    )
    if "probe_rtt" in stats:
        yield _probe_rtt(stats["probe_rtt"])
    yield _labelled_counter(
        "meshplane_gossip_events",
        "Gossip events by kind: packets, probes, acks, suspicions, refutes, push-pulls, ...",
        "event",
        stats.get("counts", {}),
    )


#: outcome label -> the core's stat (gossip.membership.STAT_NAMES)
_SUSPICION_OUTCOMES = {
    "raised": "suspicions",
    "refuted": "suspicions_refuted",
    "confirmed": "suspicions_confirmed",
}
_PUSH_PULL_OUTCOMES = {
    "initiated": "push_pulls_initiated",
    "served": "push_pulls_served",
    "failed": "push_pull_failures",
}


def _probe_rtt(by_path: Mapping[str, Mapping[str, Any]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        "meshplane_gossip_probe_rtt_seconds",
        "Time from a probe's ping to the ack that answered it, by the ack's path "
        "(direct, indirect through a relay, tcp fallback)",
        labels=["path"],
    )
    bounds = [*(_bound(b) for b in RTT_BOUNDS), "+Inf"]
    for path, histogram in sorted(by_path.items()):
        cumulative = list(accumulate(histogram["buckets"]))
        family.add_metric([path], list(zip(bounds, cumulative, strict=True)), histogram["sum"])
    return family


def _dns_total(deps: ApiDeps) -> dict[str, int | float]:
    """The agent's own DNS counters plus its DNS workers' (`--dns-workers`)."""
    assert deps.dns_stats is not None
    total: dict[str, int | float] = dict(deps.dns_stats())
    if deps.dns_counts is not None:
        total.update(deps.dns_counts())
    if deps.dns_worker_stats is not None:
        for name, value in deps.dns_worker_stats().items():
            total[name] = total.get(name, 0) + value
    return total


def _dns(stats: Mapping[str, int | float]) -> Iterator[Metric]:
    yield from _dns_labelled(stats)
    # the labelled counts' flat names have a "|": their families are above
    counters = {
        name: value for name, value in stats.items() if not is_level(name) and "|" not in name
    }
    yield _labelled_counter(
        "meshplane_dns_events",
        "DNS events by kind: answered, nxdomain, forwarded, servfail, malformed, ...",
        "event",
        counters,
    )
    levels = GaugeMetricFamily(
        "meshplane_dns_level",
        "DNS levels by kind: cache entries and bytes, sandboxes and TCP connections open",
        labels=["level"],
    )
    for name, value in sorted(stats.items()):
        if is_level(name):
            levels.add_metric([name], value)
    yield levels


def _dns_labelled(stats: Mapping[str, int | float]) -> Iterator[Metric]:
    """Queries by type, rcode and scope; upstream attempts; the caches; answer latency."""
    queries = CounterMetricFamily(
        "meshplane_dns_queries",
        "DNS queries answered, by query type, rcode and scope (node: the agent's listener; "
        "sandbox: a sandbox's 127.0.0.11)",
        labels=["type", "rcode", "scope"],
    )
    for labels, count in sorted(queries_of(stats)):
        queries.add_metric(list(labels), count)
    yield queries
    forwards = CounterMetricFamily(
        "meshplane_dns_forwards",
        "Queries sent to an upstream resolver (each attempt), by upstream and outcome",
        labels=["upstream", "outcome"],
    )
    for (upstream, outcome), count in sorted(forwards_of(stats)):
        forwards.add_metric([upstream, outcome], count)
    yield forwards
    for name, doc, of_reply, of_forward in _DNS_CACHE_FAMILIES:
        family = CounterMetricFamily(name, doc, labels=["cache"])
        family.add_metric(["reply"], stats.get(of_reply, 0))
        family.add_metric(["forward"], stats.get(of_forward, 0))
        yield family
    buckets, total = latency_of(stats)
    latency = HistogramMetricFamily(
        "meshplane_dns_answer_duration_seconds",
        "Time from taking a DNS query to sending its answer (UDP cache hits: first bucket)",
    )
    bounds = [*(_bound(b) for b in DNS_LATENCY_BOUNDS), "+Inf"]
    latency.add_metric([], list(zip(bounds, accumulate(buckets), strict=True)), total)
    yield latency


#: (family, help, the reply cache's stat, the forwarder's cache's stat)
_DNS_CACHE_FAMILIES = (
    (
        "meshplane_dns_cache_hits",
        "Queries answered from a DNS cache (reply: the mesh's names; forward: upstream answers)",
        "responder_cache_hits",
        "forwarder_answered_from_cache",
    ),
    (
        "meshplane_dns_cache_misses",
        "Queries a DNS cache did not have (reply: parsed and resolved; forward: asked upstream)",
        "responder_cache_misses",
        "forwarder_forwarded",
    ),
    (
        "meshplane_dns_cache_evictions",
        "Entries a DNS cache pushed out to stay within its bounds",
        "responder_cache_evicted",
        "forwarder_cache_evicted",
    ),
)


#: a worker's process figure (prometheus-client's sample name) -> family, help, counter?
_WORKER_FIGURES = {
    "process_resident_memory_bytes": (
        "meshplane_worker_resident_memory_bytes",
        "A worker process's resident memory",
        False,
    ),
    "process_virtual_memory_bytes": (
        "meshplane_worker_virtual_memory_bytes",
        "A worker process's virtual memory",
        False,
    ),
    "process_cpu_seconds_total": (
        "meshplane_worker_cpu_seconds",
        "CPU time a worker process used (user and system); restarts with the worker",
        True,
    ),
    "process_open_fds": ("meshplane_worker_open_fds", "A worker's open descriptors", False),
    "process_max_fds": ("meshplane_worker_max_fds", "A worker's descriptor limit", False),
    "process_start_time_seconds": (
        "meshplane_worker_start_time_seconds",
        "When a worker process started (Unix time)",
        False,
    ),
}


def _workers(processes: list[tuple[str, int, dict[str, float]]], seq: int) -> Iterator[Metric]:
    """The process collector's figures of each worker, labelled by pool and index (a
    restarted worker keeps its index, so the series stay few)."""
    # one per (pool, index): a replaced worker's last report may linger a moment
    latest = {(pool, index): figures for pool, index, figures in processes}
    for sample, (name, doc, counter) in _WORKER_FIGURES.items():
        family: CounterMetricFamily | GaugeMetricFamily = (
            CounterMetricFamily(name, doc, labels=["pool", "worker"])
            if counter
            else GaugeMetricFamily(name, doc, labels=["pool", "worker"])
        )
        for (pool, index), figures in sorted(latest.items()):
            if sample in figures:
                family.add_metric([pool, str(index)], figures[sample])
        yield family
    lag = GaugeMetricFamily(
        "meshplane_worker_feed_lag",
        "Changes of the feed a worker had not applied at its last report (once a second)",
        labels=["pool", "worker"],
    )
    for (pool, index), figures in sorted(latest.items()):
        if "feed_seq" in figures:
            lag.add_metric([pool, str(index)], max(0.0, seq - figures["feed_seq"]))
    yield lag


#: the L4 backend's stats that are levels (what it holds now), not counts
_LB_LEVELS = frozenset({"open", "unbound"})


#: the L4 counters per service: name in the backend's sample -> (family, help, label)
_LB_SERVICE_COUNTERS = {
    "connections": (
        "meshplane_lb_service_connections",
        "L4 connections (TCP) and flows (UDP) to a service's virtual services",
    ),
    "connect_errors": (
        "meshplane_lb_service_connect_errors",
        "Connects to a service's tasks that failed (the userspace proxy)",
    ),
    "failovers": (
        "meshplane_lb_service_failovers",
        "Connections that reached a task after another had failed (the userspace proxy)",
    ),
}


def _lb(counters: Mapping[str, Any], services: set[str]) -> Iterator[Metric]:
    backend = str(counters.get("backend", ""))
    errors = CounterMetricFamily(
        "meshplane_lb_backend_errors",
        "Operations the L4 backend refused (the node's table, and sandboxes' tables)",
        labels=["backend", "table"],
    )
    errors.add_metric([backend, "node"], counters.get("errors", 0))
    errors.add_metric([backend, "sandbox"], counters.get("sandbox_errors", 0))
    yield errors
    read_errors = CounterMetricFamily(
        "meshplane_lb_counter_read_errors",
        "Readings of the L4 backend's counters per service that failed (the last totals stand)",
        labels=["backend"],
    )
    read_errors.add_metric([backend], counters.get("sample_errors", 0))
    yield read_errors
    stats: Mapping[str, int] = counters.get("stats", {})
    events = CounterMetricFamily(
        "meshplane_lb_events",
        "The userspace L4 proxy's counters: tcp_accepted, tcp_connect_failed, tcp_failovers, "
        "refused_limit, idle_closed, udp_dropped, ...",
        labels=["backend", "event"],
    )
    levels = GaugeMetricFamily(
        "meshplane_lb_level",
        "The userspace L4 proxy's levels: connections and flows open, virtual services unbound",
        labels=["backend", "level"],
    )
    for name, value in sorted(stats.items()):
        (levels if name in _LB_LEVELS else events).add_metric([backend, name], value)
    yield events
    yield levels
    yield from _lb_services(backend, counters.get("services", {}), services)


def _lb_services(
    backend: str, by_service: Mapping[str, Mapping[str, int]], services: set[str]
) -> Iterator[Metric]:
    """The L4 counters per service; a name the backend cannot count has no series."""
    # A removed service's series go (its totals are forgotten at the next reading too).
    rows = sorted((name, values) for name, values in by_service.items() if name in services)
    for key, (name, doc) in _LB_SERVICE_COUNTERS.items():
        family = CounterMetricFamily(name, doc, labels=["service", "backend"])
        for service, values in rows:
            if key in values:
                family.add_metric([service, backend], values[key])
        yield family
    traffic = CounterMetricFamily(
        "meshplane_lb_service_bytes",
        "L4 bytes of a service's connections: in from clients, out to clients",
        labels=["service", "backend", "direction"],
    )
    active = GaugeMetricFamily(
        "meshplane_lb_service_active_connections",
        "L4 connections (and UDP flows) of a service open now",
        labels=["service", "backend"],
    )
    for service, values in rows:
        for direction in ("in", "out"):
            if f"bytes_{direction}" in values:
                traffic.add_metric([service, backend, direction], values[f"bytes_{direction}"])
        if "active" in values:
            active.add_metric([service, backend], values["active"])
    yield traffic
    yield active


#: the HTTP router's process-wide counters: snapshot key -> (family, help)
_HTTP_COUNTERS = {
    "connections_total": ("meshplane_http_connections", "Client connections accepted"),
    "requests": ("meshplane_http_requests_received", "Requests read from clients"),
    "no_route": ("meshplane_http_no_route", "Requests for a host no route claims (404)"),
    "no_endpoint": ("meshplane_http_no_endpoint", "Requests for a route without tasks (503)"),
    "connect_failures": ("meshplane_http_upstream_connect_failures", "Failed task connects"),
    "upstream_timeouts": ("meshplane_http_upstream_timeouts", "Tasks that answered too late"),
    "fd_shortage": ("meshplane_http_fd_shortage", "Connects failed for want of descriptors"),
    "over_budget": ("meshplane_http_over_budget", "Clients refused: descriptor budget full"),
    "slow_bodies": ("meshplane_http_slow_bodies", "Request bodies cut for arriving too slowly"),
    "retries": ("meshplane_http_retries", "Requests retried on another task"),
    "upgrades": ("meshplane_http_websocket_upgrades", "Connections upgraded (WebSocket)"),
    "passthrough": ("meshplane_http_tls_passthrough", "TLS connections passed through by SNI"),
    "ejections": ("meshplane_http_ejections", "Tasks ejected after failing"),
}

#: its gauges: snapshot key -> (family, help)
_HTTP_GAUGES = {
    "connections_open": ("meshplane_http_connections_open", "Client connections open"),
    "fds_held": ("meshplane_http_fds_held", "Descriptors held against the budget"),
    "fd_budget": ("meshplane_http_fd_budget", "Descriptors the router may hold"),
    "workers": ("meshplane_http_workers", "Worker processes reporting (0: the agent serves)"),
}


def _http(snapshot: Mapping[str, Any], services: set[str]) -> Iterator[Metric]:
    for key, (name, doc) in _HTTP_COUNTERS.items():
        yield CounterMetricFamily(name, doc, value=snapshot.get(key, 0))
    for key, (name, doc) in _HTTP_GAUGES.items():
        yield GaugeMetricFamily(name, doc, value=snapshot.get(key, 0))
    yield GaugeMetricFamily(
        "meshplane_http_ejected_tasks",
        "Tasks ejected now",
        value=len(snapshot.get("ejected", ())),
    )
    yield _labelled_counter(
        "meshplane_http_tls_handshakes",
        "HTTPS connections by outcome: terminated with the SNI's certificate, the default "
        "certificate (unknown name, no SNI), passed through, failed handshake, refused",
        "outcome",
        {outcome: snapshot.get("tls_outcomes", {}).get(outcome, 0) for outcome in TLS_OUTCOMES},
    )
    yield _labelled_counter(
        "meshplane_http_rejected",
        "Requests the router answered itself with an error, by status",
        "code",
        {str(code): count for code, count in snapshot.get("rejected", {}).items()},
    )
    # Routes of one service (several hosts or path prefixes) add up to its series.
    requests: Counter[tuple[str, str]] = Counter()
    latency_sum: Counter[str] = Counter()
    latency_buckets: dict[str, list[int]] = {}
    retries: Counter[str] = Counter()
    for route in snapshot.get("routes", ()):
        service = route["service"]
        if service not in services:
            continue  # removed: its series go with it
        for code, count in route["requests"].items():
            requests[(service, code)] += count
        latency_sum[service] += route["latency_sum"]
        buckets = latency_buckets.setdefault(service, [0] * (len(LATENCY_BOUNDS) + 1))
        for i, count in enumerate(route.get("latency_buckets", ())[: len(buckets)]):
            buckets[i] += count
        retries[service] += route["retries"]
    by_route = CounterMetricFamily(
        "meshplane_http_requests",
        "Requests routed to a service, by status class of the answer",
        labels=["service", "code"],
    )
    for (service, code), count in sorted(requests.items()):
        by_route.add_metric([service, code], count)
    yield by_route
    latency = HistogramMetricFamily(
        "meshplane_http_upstream_duration_seconds",
        "Time from a request's routing to its answer from the task, per service",
        labels=["service"],
    )
    bounds = [*(_bound(b) for b in LATENCY_BOUNDS), "+Inf"]
    for service in sorted(latency_buckets):
        cumulative = list(accumulate(latency_buckets[service]))
        latency.add_metric(
            [service], list(zip(bounds, cumulative, strict=True)), latency_sum[service]
        )
    yield latency
    route_retries = CounterMetricFamily(
        "meshplane_http_service_retries", "Requests retried, per service", labels=["service"]
    )
    for service in sorted(retries):
        route_retries.add_metric([service], retries[service])
    yield route_retries


def _route_problems(
    by_service: Mapping[str, Sequence[Problem]], services: set[str]
) -> GaugeMetricFamily:
    """Route problems per service and kind: a series only while a service has one, so it
    goes away when the label is fixed or the service removed (an alert fires on > 0)."""
    family = GaugeMetricFamily(
        "meshplane_http_route_problems",
        "HRM route problems of a service by kind (label, conflict, target_port, certificate)",
        labels=["service", "kind"],
    )
    counts = Counter(
        (service, problem.kind)
        for service, problems in by_service.items()
        if service in services
        for problem in problems
    )
    for (service, kind), count in sorted(counts.items()):
        family.add_metric([service, kind], count)
    return family


def _bound(seconds: float) -> str:
    """A bucket's `le` as Prometheus spells it (0.005, 1.0, 10.0)."""
    return repr(float(seconds))


def _labelled_counter(
    name: str, doc: str, label: str, values: Mapping[str, int | float]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([str(key)], value)
    return family


def registry_for(deps: ApiDeps) -> CollectorRegistry:
    """The agent's registry: its own families and the process collector (RSS, CPU, fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MeshCollector(deps))
    ProcessCollector(registry=registry)
    return registry


REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


def setup(app: web.Application) -> None:
    app[REGISTRY] = registry_for(app[DEPS])


async def metrics(request: web.Request) -> web.Response:
    """Every family, as the `Accept` header asks: OpenMetrics, or Prometheus text 0.0.4."""
    lb_sample = request.app[DEPS].lb_sample
    if lb_sample is not None:
        await lb_sample()  # the kernel's L4 counters, read at most once a second
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encode(request.app[REGISTRY])
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response

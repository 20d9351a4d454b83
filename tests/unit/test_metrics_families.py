"""`GET /metrics`: the collector turns the parts' counters into `meshplane_` families.

No agent: the dependencies are stubs holding known counters, and what the
handler answers is read back with prometheus_client's own parsers.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from gossip.rtt import RttHistogram
from lb.http.labels import Problem
from mesh.api import app as api
from mesh.api import metrics
from mesh.control import Control
from mesh.core.model import Health


def _store(services: list[str], tasks: list[tuple[str, Health]]) -> Any:
    return SimpleNamespace(
        services=lambda: [SimpleNamespace(name=name) for name in services],
        tasks=lambda: [SimpleNamespace(node=node, health=health) for node, health in tasks],
    )


def _http_snapshot() -> dict[str, Any]:
    # three requests each: two of at most 5 ms, one of more than 10 s
    buckets = [2] + [0] * 10 + [1]
    route = {"path_prefix": "/", "latency_sum": 1.5, "latency_count": 3, "retries": 1}
    route["latency_buckets"] = buckets
    return {
        "workers": 2,
        "connections_open": 4,
        "connections_total": 40,
        "requests": 110,
        "rejected": {"400": 2, 408: 1},
        "upgrades": 5,
        "tls_outcomes": {"certificate": 7, "no_sni": 2, "passthrough": 1},
        "ejected": ["t9"],
        "routes": [
            {**route, "service": "web", "host": "a.test", "requests": {"2xx": 90, "5xx": 3}},
            {**route, "service": "web", "host": "b.test", "requests": {"2xx": 10}},
            {**route, "service": "gone", "host": "c.test", "requests": {"2xx": 7}},
        ],
    }


def _probe_rtt() -> dict[str, Any]:
    histogram = RttHistogram()
    for seconds in (0.0004, 0.003, 0.003):
        histogram.observe("direct", seconds)
    histogram.observe("indirect", 0.7)
    return histogram.snapshot()


def _deps() -> api.ApiDeps:
    control = SimpleNamespace(
        store=_store(
            ["web", "db"],
            [("node-1", Health.HEALTHY), ("node-2", Health.UNHEALTHY), ("node-2", Health.HEALTHY)],
        ),
        feed=SimpleNamespace(seq=42),
    )
    return api.ApiDeps(
        control=cast(Control, control),
        node="node-1",
        members=list,
        heartbeat=lambda *_: None,
        drain_grace=1.0,
        node_statuses=lambda: {"node-1": "alive", "node-2": "suspect", "node-3": "dead"},
        gossip_stats=lambda: {
            "health_score": 1,
            "incarnation": 3,
            "drops": {"bad_label": 6, "decrypt_failed": 2},
            "counts": {
                "packets_in": 100,
                "suspicions": 2,
                "suspicions_refuted": 1,
                "refutes": 4,
                "push_pulls": 9,
                "push_pulls_initiated": 10,
                "push_pulls_served": 7,
                "push_pull_failures": 1,
            },
            "messages": {"in": {"ping": 40, "alive": 3}, "out": {"ack": 39}},
            "bytes": {"in": 5000, "out": 4000},
            "stream_bytes": {"in": 700, "out": 600},
            "probe_rtt": _probe_rtt(),
        },
        dns_stats=lambda: {
            "responder_answered": 50,
            "responder_nxdomain": 4,
            "responder_cache_entries": 12,
            "forwarder_cache_bytes": 2048,
            "sandboxes_open": 1,
        },
        http_stats=_http_snapshot,
        worker_processes=lambda: [
            ("http", 0, {"process_resident_memory_bytes": 1e6, "process_cpu_seconds_total": 2}),
            ("http", 1, {"process_resident_memory_bytes": 2e6, "process_cpu_seconds_total": 3}),
            ("http", 2, {"feed_seq": 40}),
            ("dns", 0, {"process_resident_memory_bytes": 3e6}),
        ],
        route_problems=lambda: {
            "web": [
                Problem("web", "mesh.http.hosts", "bad port", "label"),
                Problem("web", "mesh.http.hosts.api", "bad host", "label"),
                Problem("web", "mesh.http.hosts", "no certificate", "certificate"),
            ],
            "gone": [Problem("gone", "mesh.http.hosts", "bad port", "label")],
        },
        lb_counters=lambda: {
            "backend": "userspace",
            "errors": 2,
            "sandbox_errors": 0,
            "sample_errors": 4,
            "stats": {"tcp_accepted": 30, "tcp_connect_failed": 1, "open": 3, "unbound": 0},
            "services": {
                "web": {
                    "connections": 25,
                    "bytes_in": 1000,
                    "bytes_out": 9000,
                    "connect_errors": 1,
                    "failovers": 1,
                    "active": 3,
                },
                "db": {"connections": 5},  # a backend that counts connections only
                "gone": {"connections": 7, "active": 0},  # removed from the state
            },
        },
    )


def _scrape(accept: str = "") -> tuple[str, str]:
    app = web.Application()
    app[api.DEPS] = _deps()
    metrics.setup(app)
    request = make_mocked_request("GET", "/metrics", headers={"Accept": accept}, app=app)
    response = asyncio.run(metrics.metrics(request))
    assert response.body is not None
    return bytes(cast(bytes, response.body)).decode(), response.headers["Content-Type"]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_family_reads_the_counters_at_scrape_time() -> None:
    text, content_type = _scrape()
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = _samples(text)
    assert samples[("meshplane_services", ())] == 2
    assert samples[("meshplane_state_changes", ())] == 42
    assert samples[("meshplane_tasks", (("health", "healthy"), ("node_status", "alive")))] == 1
    assert samples[("meshplane_tasks", (("health", "unhealthy"), ("node_status", "suspect")))] == 1
    assert samples[("meshplane_gossip_members", (("status", "suspect"),))] == 1
    assert samples[("meshplane_gossip_members", (("status", "left"),))] == 0
    assert samples[("meshplane_gossip_dropped_packets_total", (("reason", "bad_label"),))] == 6
    assert samples[("meshplane_gossip_events_total", (("event", "push_pulls"),))] == 9
    assert samples[("meshplane_gossip_health_score", ())] == 1
    pings_in = (("direction", "in"), ("type", "ping"))
    assert samples[("meshplane_gossip_messages_total", pings_in)] == 40
    assert samples[("meshplane_gossip_bytes_total", (("direction", "out"),))] == 4000
    dns_answered = ("meshplane_dns_events_total", (("event", "responder_answered"),))
    assert samples[dns_answered] == 50
    assert samples[("meshplane_dns_level", (("level", "forwarder_cache_bytes"),))] == 2048
    assert ("meshplane_dns_events_total", (("event", "sandboxes_open"),)) not in samples
    # Routes of one service add up; status classes stay apart.
    web_2xx = ("meshplane_http_requests_total", (("code", "2xx"), ("service", "web")))
    assert samples[web_2xx] == 100
    web_5xx = ("meshplane_http_requests_total", (("code", "5xx"), ("service", "web")))
    assert samples[web_5xx] == 3
    latency = (("service", "web"),)
    assert samples[("meshplane_http_upstream_duration_seconds_count", latency)] == 6
    le = "meshplane_http_upstream_duration_seconds_bucket"
    assert samples[(le, (("le", "0.005"), ("service", "web")))] == 4
    assert samples[(le, (("le", "10.0"), ("service", "web")))] == 4
    assert samples[(le, (("le", "+Inf"), ("service", "web")))] == 6
    assert samples[("meshplane_http_upstream_duration_seconds_sum", latency)] == 3.0
    assert samples[("meshplane_http_rejected_total", (("code", "408"),))] == 1
    assert samples[("meshplane_http_connections_total", ())] == 40
    assert samples[("meshplane_http_connections_open", ())] == 4
    assert samples[("meshplane_http_websocket_upgrades_total", ())] == 5
    assert samples[("meshplane_http_ejected_tasks", ())] == 1
    assert samples[("meshplane_http_workers", ())] == 2
    userspace = ("backend", "userspace")
    assert samples[("meshplane_lb_events_total", (userspace, ("event", "tcp_accepted")))] == 30
    assert samples[("meshplane_lb_level", (userspace, ("level", "open")))] == 3
    assert ("meshplane_lb_events_total", (userspace, ("event", "open"))) not in samples
    lb_errors = ("meshplane_lb_backend_errors_total", (userspace, ("table", "node")))
    assert samples[lb_errors] == 2
    assert samples[("meshplane_lb_counter_read_errors_total", (userspace,))] == 4
    web = (userspace, ("service", "web"))
    assert samples[("meshplane_lb_service_connections_total", web)] == 25
    assert samples[("meshplane_lb_service_connect_errors_total", web)] == 1
    assert samples[("meshplane_lb_service_failovers_total", web)] == 1
    assert samples[("meshplane_lb_service_active_connections", web)] == 3
    web_in = (userspace, ("direction", "in"), ("service", "web"))
    assert samples[("meshplane_lb_service_bytes_total", web_in)] == 1000
    web_out = (userspace, ("direction", "out"), ("service", "web"))
    assert samples[("meshplane_lb_service_bytes_total", web_out)] == 9000
    db = (userspace, ("service", "db"))
    assert samples[("meshplane_lb_service_connections_total", db)] == 5
    # what the backend cannot count has no series (not a made-up 0)
    assert ("meshplane_lb_service_active_connections", db) not in samples
    assert ("meshplane_lb_service_connect_errors_total", db) not in samples
    assert samples[("process_resident_memory_bytes", ())] > 0
    http_1 = (("pool", "http"), ("worker", "1"))
    assert samples[("meshplane_worker_resident_memory_bytes", http_1)] == 2e6
    assert samples[("meshplane_worker_cpu_seconds_total", http_1)] == 3
    dns_0 = (("pool", "dns"), ("worker", "0"))
    assert samples[("meshplane_worker_resident_memory_bytes", dns_0)] == 3e6
    assert ("meshplane_worker_cpu_seconds_total", dns_0) not in samples
    http_2 = (("pool", "http"), ("worker", "2"))
    assert samples[("meshplane_worker_feed_lag", http_2)] == 2  # the feed is at 42


def test_a_removed_service_has_no_series() -> None:
    text, _ = _scrape()
    assert 'service="gone"' not in text  # its route's counts are still in the snapshot


def test_no_label_holds_a_client_address_or_a_path() -> None:
    text, _ = _scrape()
    labels = {
        name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for name in sample.labels
    }
    closed_sets = {"health", "node_status", "status", "reason", "event", "level", "code", "le"} | {
        "direction",
        "type",
        "outcome",
        "path",
        "kind",
    }
    closed_sets |= {"rcode", "scope", "outcome", "cache"}
    # a DNS upstream is one of the configured ones (--dns-upstream or resolv.conf)
    assert labels <= closed_sets | {"service", "backend", "table", "pool", "worker", "upstream"}


def test_openmetrics_when_accept_asks_for_it() -> None:
    text, content_type = _scrape("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    families = {family.name: family for family in openmetrics_families(text)}
    assert families["meshplane_http_requests"].type == "counter"
    assert families["meshplane_gossip_members"].type == "gauge"


def test_gossip_probe_rtt_suspicions_push_pulls_and_stream_bytes() -> None:
    samples = _samples(_scrape()[0])
    rtt = "meshplane_gossip_probe_rtt_seconds"
    direct, indirect, tcp = ((("path", p),) for p in ("direct", "indirect", "tcp"))
    assert samples[(f"{rtt}_count", direct)] == 3
    assert samples[(f"{rtt}_sum", direct)] == pytest.approx(0.0064)
    assert samples[(f"{rtt}_bucket", (("le", "0.0005"), ("path", "direct")))] == 1
    assert samples[(f"{rtt}_bucket", (("le", "0.005"), ("path", "direct")))] == 3
    assert samples[(f"{rtt}_bucket", (("le", "0.5"), ("path", "indirect")))] == 0
    assert samples[(f"{rtt}_bucket", (("le", "1.0"), ("path", "indirect")))] == 1
    assert samples[(f"{rtt}_bucket", (("le", "+Inf"), ("path", "indirect")))] == 1
    assert samples[(f"{rtt}_count", tcp)] == 0  # every path has its series, 0 until used
    assert samples[(f"{rtt}_count", indirect)] == 1
    suspicions = "meshplane_gossip_suspicions_total"
    assert samples[(suspicions, (("outcome", "raised"),))] == 2
    assert samples[(suspicions, (("outcome", "refuted"),))] == 1
    assert samples[(suspicions, (("outcome", "confirmed"),))] == 0
    assert samples[("meshplane_gossip_self_refutations_total", ())] == 4
    push_pulls = "meshplane_gossip_push_pulls_total"
    assert samples[(push_pulls, (("outcome", "initiated"),))] == 10
    assert samples[(push_pulls, (("outcome", "served"),))] == 7
    assert samples[(push_pulls, (("outcome", "failed"),))] == 1
    assert samples[("meshplane_gossip_stream_bytes_total", (("direction", "in"),))] == 700
    assert samples[("meshplane_gossip_stream_bytes_total", (("direction", "out"),))] == 600


def test_route_problems_per_service_and_kind() -> None:
    samples = _samples(_scrape()[0])
    family = "meshplane_http_route_problems"
    assert samples[(family, (("kind", "label"), ("service", "web")))] == 2
    assert samples[(family, (("kind", "certificate"), ("service", "web")))] == 1
    # no zero series for a kind a service has not, none for a removed service or one
    # without problems (db): a series goes away with the problem
    assert {labels for name, labels in samples if name == family} == {
        (("kind", "label"), ("service", "web")),
        (("kind", "certificate"), ("service", "web")),
    }


def test_tls_handshakes_by_outcome_every_outcome_a_series() -> None:
    samples = _samples(_scrape()[0])
    family = "meshplane_http_tls_handshakes_total"
    by_outcome = {
        dict(labels)["outcome"]: v for (name, labels), v in samples.items() if name == family
    }
    assert by_outcome == {
        "certificate": 7,
        "default_certificate": 0,
        "no_sni": 2,
        "passthrough": 1,
        "failed": 0,
        "refused": 0,
    }

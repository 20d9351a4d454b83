"""DNS answers counted by type, rcode and scope; upstream attempts; latency; summed over workers.

The listeners are real `UdpServer`s fed datagrams by hand (a transport that
records what is sent), so the fast path's counting and the slow path's are
the ones the server runs; the forwarder talks to a real fake upstream.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, cast

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord, EDNSOption
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dns.forward import Forwarder
from dns.querystats import (
    LATENCY_BOUNDS,
    NODE,
    SANDBOX,
    QueryStats,
    latency_of,
    queries_of,
    query_type,
    slot_of,
)
from dns.server import FixedViewUdpServer, UdpServer
from dns.service import forwards_of, is_level
from dns.upstreams import Upstream
from mesh.api import metrics
from mesh.core.workertotals import WorkerTotals
from tests.helpers.dns_upstream import FakeUpstream
from tests.unit.test_dns_responder import World
from tests.unit.test_metrics_families import _deps


class SentTransport:
    """Stands for the UDP transport: keeps what the server sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append(data)

    def is_closing(self) -> bool:
        return False


def _world() -> World:
    world = World(domain="mesh")
    world.service("web", networks=("front",))
    world.task("web", "10.1.0.10", {80: 31001})
    return world


def _query(name: str, qtype: str = "A") -> bytes:
    return bytes(DNSRecord.question(name, qtype).pack())


def _udp(world: World, cls: type[UdpServer] = UdpServer, **kw: Any) -> UdpServer:
    server = cls(world.responder, _no_forward, **kw)
    server.transport = cast(Any, SentTransport())
    return server


async def _no_forward(query: bytes, tcp: bool) -> bytes:
    raise AssertionError("nothing is forwarded here")


def _counts(stats: QueryStats) -> dict[tuple[str, str, str], int]:
    return dict(queries_of(stats.flat()))


def test_query_type_reads_the_question() -> None:
    assert query_type(_query("a.mesh", "A")) == QTYPE.A
    assert query_type(_query("a.mesh", "SRV")) == QTYPE.SRV
    assert query_type(_query("x.y.z", "AAAA")) == QTYPE.AAAA
    assert query_type(b"\x00" * 5) is None


def test_slots_are_bounded_whatever_the_type_or_rcode() -> None:
    slots = {slot_of(qtype, rcode) for qtype in range(-1, 70000, 7) for rcode in range(64)}
    assert max(slots) < len(QueryStats().answers[0])


def test_fast_and_slow_path_answers_counted_by_type_rcode_and_scope() -> None:
    world = _world()
    node = _udp(world)
    for _ in range(3):  # the first one is parsed; the next two are cache hits on the fast path
        node.datagram_received(_query("web.mesh", "A"), ("127.0.0.1", 5000))
    node.datagram_received(_query("web.mesh", "AAAA"), ("127.0.0.1", 5000))  # NODATA
    node.datagram_received(_query("nope.mesh", "A"), ("127.0.0.1", 5000))  # NXDOMAIN
    node.datagram_received(_query("nope.mesh", "A"), ("127.0.0.1", 5000))  # ... cached
    node.datagram_received(b"\x12\x34\x00\x00\x00\x02" + b"\x00" * 6, ("127.0.0.1", 5000))
    sandbox = _udp(world, FixedViewUdpServer, view=world.responder.view_of("10.1.0.2"))
    for _ in range(4):
        sandbox.datagram_received(_query("web", "SRV"), ("127.0.0.1", 5001))
    stats = world.responder.queries
    assert _counts(stats) == {
        ("A", "NOERROR", "node"): 3,
        ("AAAA", "NOERROR", "node"): 1,
        ("A", "NXDOMAIN", "node"): 2,
        ("other", "FORMERR", "node"): 1,  # two questions: FORMERR, its type unread
        ("SRV", "NOERROR", "sandbox"): 4,
    }
    assert stats.fast_hits() == 2 + 1 + 3
    assert sum(stats.hits[NODE]) == 3 and sum(stats.hits[SANDBOX]) == 3
    assert node.hits == 3 and sandbox.hits == 3
    assert world.responder.stats["cache_misses"] == 4 + 1
    # every answer is in the histogram: the fast path's hits in the first bucket, untimed
    buckets, total = latency_of(stats.flat())
    assert sum(buckets) == 3 + 1 + 2 + 1 + 4
    assert buckets[0] >= 6 and total == pytest.approx(stats.latency_sum)
    assert len(buckets) == len(LATENCY_BOUNDS) + 1


def test_latency_falls_in_its_bucket() -> None:
    stats = QueryStats()
    reply = b"\x00\x00\x81\x83"  # NXDOMAIN
    stats.answered(NODE, _query("a", "PTR"), reply, 0.0003)
    stats.answered(NODE, _query("a", "PTR"), reply, 0.001)  # on a bound: that bucket
    stats.answered(NODE, _query("a", "PTR"), reply, 9.0)
    buckets, total = latency_of(stats.flat())
    assert buckets[LATENCY_BOUNDS.index(0.0005)] == 1
    assert buckets[LATENCY_BOUNDS.index(0.001)] == 1
    assert buckets[-1] == 1
    assert total == pytest.approx(9.0013)
    assert _counts(stats) == {("PTR", "NXDOMAIN", "node"): 3}


def test_forwarder_counts_each_attempt_by_upstream_and_outcome() -> None:
    async def run() -> dict[tuple[str, str], int]:
        with FakeUpstream({"ext.example": ["192.0.2.1"]}) as good, FakeUpstream() as bad:
            bad.rcode = RCODE.SERVFAIL
            forwarder = Forwarder(
                [Upstream(*bad.address), Upstream(*good.address)], timeout=1.0, backoff_base=0.0
            )
            try:
                for name in ("ext.example", "other.example", "ext.example"):
                    await forwarder.forward(_query(name))
            finally:
                await forwarder.close()
            bad_name, good_name = f"127.0.0.1:{bad.port}", f"127.0.0.1:{good.port}"
            flat = {f"forward|{u}|{o}": n for (u, o), n in forwarder.attempts.items()}
            assert forwarder.stats["answered_from_cache"] == 1  # the third: from the cache
            return {
                (u.replace(bad_name, "bad").replace(good_name, "good"), o): n
                for (u, o), n in forwards_of(flat)
            }

    assert asyncio.run(run()) == {("bad", "servfail"): 2, ("good", "answered"): 2}


def test_worker_totals_sum_the_labelled_counts_and_keep_a_restarted_workers() -> None:
    one, two = QueryStats(), QueryStats()
    reply = b"\x00\x00\x81\x80"
    for _ in range(5):
        one.answered(NODE, _query("a", "A"), reply, 0.01)
    for _ in range(7):
        two.answered(NODE, _query("a", "A"), reply, 0.01)
    totals = WorkerTotals(is_level)
    totals.report(1, one.flat())
    totals.report(2, two.flat())
    totals.gone(2)  # worker 2 died; its successor starts from zero
    totals.report(3, QueryStats().flat())
    total = totals.total()
    assert dict(queries_of(total)) == {("A", "NOERROR", "node"): 12}
    buckets, latency_sum = latency_of(total)
    assert sum(buckets) == 12 and latency_sum == pytest.approx(0.12)


def test_metrics_families_from_the_agent_and_its_workers() -> None:
    own = QueryStats()
    own.answered(NODE, _query("a", "SRV"), b"\x00\x00\x81\x80", 0.002)
    worker = {
        "query|A|NXDOMAIN|sandbox": 4,
        "forward|127.0.0.1:53|timeout": 2,
        "latency|0": 4,
        "latency|sum": 0.0,
        "responder_cache_hits": 3,
        "responder_cache_misses": 1,
        "forwarder_cache_evicted": 6,
    }
    deps = dataclasses.replace(
        _deps(),
        dns_counts=lambda: {**own.flat(), "forward|127.0.0.1:53|timeout": 1},
        dns_worker_stats=lambda: dict(worker),
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(_exposed(deps))
        for s in family.samples
    }
    assert (
        samples[
            (
                "meshplane_dns_queries_total",
                (("rcode", "NOERROR"), ("scope", "node"), ("type", "SRV")),
            )
        ]
        == 1
    )
    assert (
        samples[
            (
                "meshplane_dns_queries_total",
                (("rcode", "NXDOMAIN"), ("scope", "sandbox"), ("type", "A")),
            )
        ]
        == 4
    )
    assert (
        samples[
            ("meshplane_dns_forwards_total", (("outcome", "timeout"), ("upstream", "127.0.0.1:53")))
        ]
        == 3
    )
    assert samples[("meshplane_dns_cache_hits_total", (("cache", "reply"),))] == 3
    assert samples[("meshplane_dns_cache_misses_total", (("cache", "reply"),))] == 1
    assert samples[("meshplane_dns_cache_evictions_total", (("cache", "forward"),))] == 6
    assert samples[("meshplane_dns_answer_duration_seconds_count", ())] == 5
    assert samples[("meshplane_dns_answer_duration_seconds_bucket", (("le", "0.0001"),))] == 4
    assert samples[("meshplane_dns_answer_duration_seconds_bucket", (("le", "0.0025"),))] == 5
    events = {labels for name, labels in samples if name == "meshplane_dns_events_total"}
    assert not any("|" in value or "latency" in value for labels in events for _, value in labels)


def _exposed(deps: Any) -> str:
    return generate_latest(metrics.registry_for(deps)).decode()


def test_a_query_found_only_in_canonical_form_is_counted_once_untimed() -> None:
    world = _world()
    node = _udp(world)
    query = DNSRecord.question("web.mesh", "A")
    query.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(10, b"12345678")]))  # a cookie
    for _ in range(3):  # not canonical: the responder parses once, then finds it by its form
        node.datagram_received(bytes(query.pack()), ("127.0.0.1", 5000))
    stats = world.responder.queries
    assert _counts(stats) == {("A", "NOERROR", "node"): 3}
    assert stats.fast_hits() == 0 and world.responder.stats["cache_hits"] == 2
    assert sum(stats.cached[NODE]) == 2
    buckets, _ = latency_of(stats.flat())
    assert sum(buckets) == 3 and buckets[0] >= 2


def test_a_miss_is_timed_from_the_responders_clock() -> None:
    world = _world()
    ticks = iter([10.0])
    world.responder._clock = lambda: next(ticks)  # the parse began at 10.0 ...
    node = _udp(world)
    node.datagram_received(_query("web.mesh"), ("127.0.0.1", 5000))
    assert world.responder.miss_started == 10.0
    assert world.responder.queries.latency[-1] == 1  # ... ages ago, for perf_counter

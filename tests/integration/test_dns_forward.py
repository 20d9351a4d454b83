"""The forwarder against real DNS servers on loopback (UDP and TCP, ephemeral ports).

Timings use a short upstream timeout (0.3 s) and generous bounds: they show
which path was taken (waited for a timeout or not), not how fast a machine is.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import uvloop
from dnslib import EDNS0, QTYPE, DNSRecord

from dns.forward import Forwarder
from dns.upstreams import Upstream
from dns.wire import NXDOMAIN, REFUSED, SERVFAIL
from tests.helpers.dns_upstream import FORGED, FakeUpstream

TIMEOUT = 0.3
SLACK = 1.5  # noisy machines: far more than any non-timeout path needs
FIRST = {
    "web.test": ["10.0.0.1"],
    "big.test": [f"10.1.{i // 200}.{i % 200 + 1}" for i in range(60)],
}
SECOND = {"web.test": ["10.0.0.2"], "big.test": FIRST["big.test"]}

StartUpstream = Callable[..., FakeUpstream]
MakeForwarder = Callable[..., Forwarder]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def query(name: str = "web.test", *, qid: int = 0x4242, edns: bool = False) -> bytes:
    record = DNSRecord.question(name)
    record.header.id = qid
    if edns:
        record.add_ar(EDNS0(udp_len=1232))
    return bytes(record.pack())


def addresses(reply: Any) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


def upstream_of(server: FakeUpstream) -> Upstream:
    return Upstream(*server.address)


def closed_udp_port() -> int:
    """A loopback port with nothing behind it (ICMP port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def start_upstream() -> Iterator[StartUpstream]:
    started: list[FakeUpstream] = []

    def start(records: dict[str, list[str]] = FIRST, **knobs: Any) -> FakeUpstream:
        server = FakeUpstream(records).start()
        started.append(server)
        for knob, value in knobs.items():
            assert hasattr(server, knob), knob
            setattr(server, knob, value)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
async def make_forwarder() -> AsyncIterator[MakeForwarder]:
    made: list[Forwarder] = []

    def make(*servers: FakeUpstream | Upstream, **options: Any) -> Forwarder:
        options.setdefault("timeout", TIMEOUT)
        forwarder = Forwarder(
            [s if isinstance(s, Upstream) else upstream_of(s) for s in servers], **options
        )
        made.append(forwarder)
        return forwarder

    yield make
    for forwarder in made:
        await forwarder.close()


async def ask(
    forwarder: Forwarder,
    name: str = "web.test",
    *,
    tcp: bool = False,
    qid: int = 0x4242,
    edns: bool = False,
) -> tuple[Any, float]:
    """The parsed reply and how long it took."""
    started = time.monotonic()
    wire = await forwarder.forward(query(name, qid=qid, edns=edns), tcp=tcp)
    return DNSRecord.parse(wire), time.monotonic() - started


async def test_answered_by_the_first_upstream(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    first, second = start_upstream(FIRST), start_upstream(SECOND)
    forwarder = make_forwarder(first, second)
    reply, _ = await ask(forwarder, "Web.TEST", qid=7)
    assert reply.header.id == 7
    assert str(reply.q.qname) == "Web.TEST."
    assert addresses(reply) == ["10.0.0.1"]
    assert (first.count(), second.count()) == (1, 0)
    assert first.queries[0].id != 7  # relayed under a fresh ID
    assert forwarder.stats["answered_upstream"] == 1
    assert forwarder.stats["in_flight"] == 0


async def test_dead_first_upstream_fails_over_after_the_timeout(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    first, second = start_upstream(FIRST, dead=True), start_upstream(SECOND)
    forwarder = make_forwarder(first, second)
    reply, elapsed = await ask(forwarder)
    assert addresses(reply) == ["10.0.0.2"]
    assert TIMEOUT * 0.8 <= elapsed < TIMEOUT + SLACK
    assert (first.count(), second.count()) == (1, 1)
    assert forwarder.stats["upstream_timeouts"] == 1


async def test_stopped_first_upstream_fails_over_at_once(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    # A connected UDP socket hears the ICMP port-unreachable: no timeout to wait for.
    second = start_upstream(SECOND)
    forwarder = make_forwarder(Upstream("127.0.0.1", closed_udp_port()), second, timeout=5.0)
    reply, elapsed = await ask(forwarder)
    assert addresses(reply) == ["10.0.0.2"]
    assert elapsed < 2.0
    assert forwarder.stats["upstream_errors"] == 1
    assert forwarder.stats["upstream_timeouts"] == 0


@pytest.mark.parametrize(
    ("rcode", "counter"), [(SERVFAIL, "upstream_servfail"), (REFUSED, "upstream_refused")]
)
async def test_servfail_or_refused_tries_the_next(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder, rcode: int, counter: str
) -> None:
    first, second = start_upstream(FIRST, rcode=rcode), start_upstream(SECOND)
    forwarder = make_forwarder(first, second)
    reply, elapsed = await ask(forwarder)
    assert addresses(reply) == ["10.0.0.2"]
    assert elapsed < TIMEOUT + SLACK
    assert forwarder.stats[counter] == 1


async def test_nxdomain_is_the_answer(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    first, second = start_upstream(FIRST), start_upstream(SECOND)
    forwarder = make_forwarder(first, second)
    reply, _ = await ask(forwarder, "missing.test", qid=99)
    assert (reply.header.id, reply.header.rcode) == (99, NXDOMAIN)
    assert second.count() == 0
    again, _ = await ask(forwarder, "MISSING.test")  # negatively cached
    assert again.header.rcode == NXDOMAIN
    assert first.count() == 1


async def test_malformed_reply_tries_the_next(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    first, second = start_upstream(FIRST, malformed=True), start_upstream(SECOND)
    forwarder = make_forwarder(first, second)
    reply, elapsed = await ask(forwarder)
    assert addresses(reply) == ["10.0.0.2"]
    assert elapsed < TIMEOUT + SLACK
    assert forwarder.stats["malformed_replies"] == 1


async def test_truncated_udp_reply_is_retried_over_tcp(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    # 60 addresses do not fit in 512 bytes: the server sets TC over UDP.
    server = start_upstream(FIRST)
    forwarder = make_forwarder(server)
    reply, _ = await ask(forwarder, "big.test")
    assert not reply.header.tc
    assert sorted(addresses(reply)) == sorted(FIRST["big.test"])
    assert (server.count("udp"), server.count("tcp")) == (1, 1)
    assert forwarder.stats["truncated_retried_tcp"] == 1


async def test_forced_truncation_is_retried_over_tcp(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    server = start_upstream(FIRST, truncate_udp=True)
    forwarder = make_forwarder(server)
    reply, _ = await ask(forwarder, edns=True)
    assert (reply.header.tc, addresses(reply)) == (0, ["10.0.0.1"])
    assert (server.count("udp"), server.count("tcp")) == (1, 1)


async def test_truncated_reply_is_the_fallback_when_tcp_fails(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    server = start_upstream(FIRST, truncate_udp=True, tcp_dead=True)
    forwarder = make_forwarder(server)
    reply, elapsed = await ask(forwarder, qid=3)
    assert (reply.header.id, reply.header.tc, reply.header.rcode) == (3, 1, 0)
    assert elapsed < 2 * TIMEOUT + SLACK
    assert forwarder.stats["answered_truncated"] == 1
    assert forwarder.stats["cache_entries"] == 0  # nothing truncated is cached


async def test_tcp_client_is_forwarded_over_tcp(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    server = start_upstream(FIRST)
    forwarder = make_forwarder(server)
    reply, _ = await ask(forwarder, "big.test", tcp=True)
    assert len(addresses(reply)) == 60
    assert (server.count("udp"), server.count("tcp")) == (0, 1)


async def test_all_upstreams_dead_is_servfail(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    first, second = start_upstream(FIRST, dead=True), start_upstream(SECOND, dead=True)
    forwarder = make_forwarder(first, second)
    reply, elapsed = await ask(forwarder, qid=11)
    assert (reply.header.id, reply.header.rcode) == (11, SERVFAIL)
    assert str(reply.q.qname) == "web.test."
    assert 2 * TIMEOUT * 0.8 <= elapsed < 2 * TIMEOUT + SLACK
    assert forwarder.stats["servfail"] == 1
    assert forwarder.stats["upstream_timeouts"] == 2


async def test_over_the_in_flight_cap_is_refused(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    server = start_upstream(FIRST, dead=True)
    # The refusal must not wait for the upstream timeout: the timeout is long, and the
    # bound is half of it (a tight bound fails on a loaded machine, not on the code).
    forwarder = make_forwarder(server, max_in_flight=2, timeout=2.0)
    waiting = [asyncio.create_task(forwarder.forward(query(f"n{i}.test"))) for i in range(2)]
    await asyncio.sleep(0)
    assert forwarder.in_flight == 2
    reply, elapsed = await ask(forwarder, "n3.test", qid=5)
    assert (reply.header.id, reply.header.rcode) == (5, REFUSED)
    assert elapsed < 1.0
    assert forwarder.stats["refused_over_cap"] == 1
    for wire in await asyncio.gather(*waiting):
        assert DNSRecord.parse(wire).header.rcode == SERVFAIL
    assert forwarder.in_flight == 0
    reply, _ = await ask(forwarder, "n4.test")  # slots are given back
    assert reply.header.rcode == SERVFAIL


async def test_cache_hit_does_not_reach_the_upstream_and_ttl_decreases(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    clock = Clock()
    server = start_upstream(FIRST)
    forwarder = make_forwarder(server, clock=clock)
    first, _ = await ask(forwarder, qid=1)
    assert [rr.ttl for rr in first.rr] == [60]
    clock.now += 25
    second, _ = await ask(forwarder, "WEB.test", qid=2)
    assert (second.header.id, str(second.q.qname)) == (2, "WEB.test.")
    assert [rr.ttl for rr in second.rr] == [35]
    assert server.count() == 1
    assert forwarder.stats["answered_from_cache"] == 1
    clock.now += 35  # expired: asked again
    third, _ = await ask(forwarder)
    assert [rr.ttl for rr in third.rr] == [60]
    assert server.count() == 2


@pytest.mark.parametrize("forge", ["id", "question"])
async def test_forged_replies_are_ignored(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder, forge: str
) -> None:
    server = start_upstream(FIRST, forge=forge, delay=0.05)
    forwarder = make_forwarder(server)
    reply, _ = await ask(forwarder)
    assert addresses(reply) == ["10.0.0.1"]
    assert FORGED not in addresses(reply)
    assert forwarder.stats["ignored_replies"] == 1


async def test_dead_upstream_does_not_delay_a_cache_hit(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    server = start_upstream(FIRST)
    forwarder = make_forwarder(server, timeout=5.0)
    await ask(forwarder)  # now cached
    server.dead = True
    stuck = asyncio.create_task(forwarder.forward(query("other.test")))
    await asyncio.sleep(0.05)
    reply, elapsed = await ask(forwarder)
    assert addresses(reply) == ["10.0.0.1"]
    assert elapsed < 2.5  # half the upstream timeout: the hit did not wait for it
    assert not stuck.done()
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    assert forwarder.in_flight == 0


async def test_slow_upstream_answers_concurrent_queries_concurrently(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    server = start_upstream({f"n{i}.test": ["10.0.0.9"] for i in range(20)}, delay=0.25)
    forwarder = make_forwarder(server, timeout=2.0)
    started = time.monotonic()
    replies = await asyncio.gather(*(ask(forwarder, f"n{i}.test", qid=i) for i in range(20)))
    assert time.monotonic() - started < 0.25 * 20 / 2  # far from one after the other
    assert [reply.header.id for reply, _ in replies] == list(range(20))
    assert all(addresses(reply) == ["10.0.0.9"] for reply, _ in replies)


async def test_close_answers_waiting_queries_with_servfail(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    server = start_upstream(FIRST, dead=True)
    forwarder = make_forwarder(server, timeout=10.0)
    waiting = asyncio.create_task(forwarder.forward(query()))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await forwarder.close()
    reply = DNSRecord.parse(await waiting)
    assert reply.header.rcode == SERVFAIL
    assert time.monotonic() - started < 3.0  # not the 10 s timeout
    after, _ = await ask(forwarder, "other.test")
    assert after.header.rcode == SERVFAIL


@pytest.fixture
def ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")


@pytest.mark.usefixtures("ipv6_loopback")
async def test_ipv6_upstream(make_forwarder: MakeForwarder) -> None:
    async with FakeUpstream(FIRST, host="::1") as server:
        forwarder = make_forwarder(server)
        reply, _ = await ask(forwarder)
        big, _ = await ask(forwarder, "big.test")
        await forwarder.close()
    assert addresses(reply) == ["10.0.0.1"]
    assert len(addresses(big)) == 60


def test_under_uvloop(start_upstream: StartUpstream) -> None:
    """The agent runs uvloop: the same paths (failover, ICMP, TC, forgery) there."""
    dead = start_upstream(FIRST, dead=True)
    forging = start_upstream(SECOND, forge="id")

    async def scenario() -> None:
        forwarder = Forwarder(
            [Upstream("127.0.0.1", closed_udp_port()), upstream_of(dead), upstream_of(forging)],
            timeout=TIMEOUT,
        )
        try:
            reply, elapsed = await ask(forwarder)
            assert addresses(reply) == ["10.0.0.2"]
            assert TIMEOUT * 0.8 <= elapsed < TIMEOUT + SLACK
            big, _ = await ask(forwarder, "big.test")
            assert len(addresses(big)) == 60
            stats = forwarder.stats
            # The second query skips the two upstreams that failed the first (back-off).
            assert (stats["upstream_errors"], stats["upstream_timeouts"]) == (1, 1)
            assert (stats["upstream_skipped"], stats["ignored_replies"]) == (2, 2)
            assert stats["truncated_retried_tcp"] == 1
        finally:
            await forwarder.close()

    uvloop.run(scenario())


# --------------------------------------------------------------------------- dead upstreams


async def test_dead_upstream_costs_the_timeout_once_not_on_every_query(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    """Issue 14, item 5: a dead upstream is skipped for its back-off after it failed once."""
    first, second = start_upstream(FIRST, dead=True), start_upstream(SECOND)
    forwarder = make_forwarder(first, second)
    elapsed = []
    for i in range(10):  # distinct names: none is a cache hit
        reply, took = await ask(forwarder, f"n{i}.test")
        assert reply.header.rcode == NXDOMAIN
        elapsed.append(took)
    print(
        f"first query {elapsed[0] * 1000:.0f} ms (timeout {TIMEOUT * 1000:.0f} ms), "
        f"the next nine at most {max(elapsed[1:]) * 1000:.1f} ms"
    )
    assert TIMEOUT * 0.8 <= elapsed[0] < TIMEOUT + SLACK
    assert max(elapsed[1:]) < TIMEOUT * 0.8  # none of them waited on the dead upstream
    assert (first.count(), second.count()) == (1, 10)
    stats = forwarder.stats
    assert (stats["upstream_timeouts"], stats["upstream_backoffs"]) == (1, 1)
    assert (stats["upstream_skipped"], stats["upstreams_down"]) == (9, 1)


async def test_dead_upstream_is_tried_again_when_its_backoff_ends(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    clock = Clock()
    first, second = start_upstream(FIRST, dead=True), start_upstream(SECOND)
    forwarder = make_forwarder(first, second, clock=clock, backoff_base=5.0, backoff_max=60.0)
    await ask(forwarder, "a.test")
    assert forwarder.pool.backoff_left(forwarder.upstreams[0]) == 5.0
    clock.now += 5.0
    await ask(forwarder, "b.test")  # tried again, still dead: the back-off doubles
    assert first.count() == 2
    assert forwarder.pool.backoff_left(forwarder.upstreams[0]) == 10.0
    first.dead = False
    clock.now += 10.0
    reply, _ = await ask(forwarder)  # back: it answers, and its record is cleared
    assert addresses(reply) == ["10.0.0.1"]
    assert forwarder.stats["upstreams_down"] == 0
    assert forwarder.pool.backoff_left(forwarder.upstreams[0]) == 0.0


async def test_stopped_upstream_is_held_down_too(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    """ICMP port unreachable (nothing listens) is a failure like a timeout."""
    second = start_upstream(SECOND)
    forwarder = make_forwarder(Upstream("127.0.0.1", closed_udp_port()), second)
    for name in ("a.test", "b.test", "c.test"):
        await ask(forwarder, name)
    stats = forwarder.stats
    assert (stats["upstream_errors"], stats["upstream_skipped"]) == (1, 2)


async def test_refused_marks_an_upstream_down_but_servfail_does_not(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    refusing, failing = start_upstream(FIRST, rcode=REFUSED), start_upstream(FIRST, rcode=SERVFAIL)
    good = start_upstream(SECOND)
    forwarder = make_forwarder(refusing, failing, good)
    for name in ("a.test", "b.test"):
        await ask(forwarder, name)
    assert (refusing.count(), failing.count(), good.count()) == (1, 2, 2)


async def test_all_upstreams_down_still_tries_the_one_whose_backoff_ends_first(
    start_upstream: StartUpstream, make_forwarder: MakeForwarder
) -> None:
    first, second = start_upstream(FIRST, dead=True), start_upstream(SECOND, dead=True)
    forwarder = make_forwarder(first, second)
    _, both = await ask(forwarder, "a.test")
    assert (first.count(), second.count()) == (1, 1)
    second.dead = False
    reply, one = await ask(forwarder, "b.test")  # the first's back-off ends first: only it
    print(
        f"all down: {both * 1000:.0f} ms, then {one * 1000:.0f} ms (timeout "
        f"{TIMEOUT * 1000:.0f} ms)"
    )
    assert reply.header.rcode == SERVFAIL
    assert (first.count(), second.count()) == (2, 1)
    assert TIMEOUT * 0.8 <= one < TIMEOUT + SLACK
    assert forwarder.stats["servfail"] == 2

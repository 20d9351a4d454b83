"""The membership core's figures for /metrics, on a virtual clock: probe round trips by
the path of their Ack, suspicions by outcome, push-pulls initiated (no sockets, no sleeps)."""

from __future__ import annotations

import pytest

from gossip.messages import Ack, Alive, Dead, PushPull, Suspect
from gossip.rtt import RTT_BOUNDS, RttHistogram
from tests.unit.test_gossip_membership import Peers, addr, first_probe


def bucket_of(seconds: float) -> int:
    return next((i for i, bound in enumerate(RTT_BOUNDS) if seconds <= bound), len(RTT_BOUNDS))


def test_histogram_buckets_are_upper_bounds_and_fixed() -> None:
    h = RttHistogram()
    for seconds in (0.0005, 0.0006, 0.3, 99.0, -1.0):
        h.observe("direct", seconds)
    snap = h.snapshot()["direct"]
    buckets = snap["buckets"]
    assert isinstance(buckets, list) and len(buckets) == len(RTT_BOUNDS) + 1
    assert buckets[0] == 2  # 0.0005 is "le 0.0005"; a negative time counts as 0
    assert buckets[1] == 1 and buckets[RTT_BOUNDS.index(0.5)] == 1 and buckets[-1] == 1
    assert snap["sum"] == pytest.approx(0.0005 + 0.0006 + 0.3 + 99.0)
    assert h.count("indirect") == h.count("tcp") == 0


def test_a_direct_ack_is_timed_on_the_injected_clock() -> None:
    world = Peers("bcd", up="")  # nobody answers by itself: the test acks when it wants
    t0, target, ping = first_probe(world)
    world.now = t0 + 0.012
    world.feed([Ack(seq=ping.seq)], target)
    rtt = world.core.probe_rtt()
    assert rtt.count("direct") == 1 and rtt.count("indirect") == rtt.count("tcp") == 0
    assert rtt.buckets["direct"][bucket_of(0.012)] == 1
    assert rtt.sums["direct"] == pytest.approx(0.012)
    world.now = t0 + 0.02
    world.feed([Ack(seq=ping.seq)], target)  # a duplicate is no second round trip
    assert rtt.count("direct") == 1


def test_an_ack_through_a_relay_is_indirect_and_measured_from_the_ping() -> None:
    world = Peers("bcd", up="")
    t0, target, ping = first_probe(world)
    world.run(t0 + 0.5)  # the probe timeout: relays are asked (and stay silent)
    relay = next(c for c in "bcd" if c != target)
    world.now = t0 + 0.6
    world.feed([Ack(seq=ping.seq)], relay)
    rtt = world.core.probe_rtt()
    assert rtt.count("indirect") == 1 and rtt.count("direct") == 0
    assert rtt.buckets["indirect"][bucket_of(0.6)] == 1
    assert rtt.sums["indirect"] == pytest.approx(0.6)


def test_the_targets_own_late_ack_is_direct_and_a_tcp_ack_is_tcp() -> None:
    world = Peers("bcd", up="")
    t0, target, ping = first_probe(world)
    world.run(t0 + 0.5)
    world.now = t0 + 0.7
    world.feed([Ack(seq=ping.seq)], target)  # after the relays were asked, from the target
    rtt = world.core.probe_rtt()
    assert rtt.count("direct") == 1 and rtt.count("indirect") == 0
    # the next probe is answered by the TCP fallback ping only
    world.run(world.now + 1.0)
    t1, target1, ping1 = world.sent(type(ping))[-1]
    world.run(t1 + 0.5)
    (stream,) = [s for s in world.core.streams_to_open() if s.to == addr(target1)]
    world.core.handle_stream_reply(Ack(seq=ping1.seq), stream.to, t1 + 0.8)
    assert rtt.count("tcp") == 1 and rtt.sums["tcp"] == pytest.approx(0.8)


def test_suspicions_raised_refuted_confirmed() -> None:
    world = Peers("bcdefg")
    stats = world.core.stats
    world.feed([Suspect(incarnation=0, node="g", sender="b")], "b")
    assert stats["suspicions"] == 1
    world.feed([Alive(incarnation=1, node="g", addr=addr("g"))], "g")  # g refutes
    assert (stats["suspicions_refuted"], stats["suspicions_confirmed"]) == (1, 0)
    world.feed([Suspect(incarnation=1, node="f", sender="b")], "b")
    world.feed([Dead(incarnation=1, node="f", sender="b")], "b")  # confirmed
    world.feed([Dead(incarnation=0, node="e", sender="b")], "b")  # dead unsuspected here
    world.feed([Suspect(incarnation=0, node="d", sender="b")], "b")
    world.feed([Dead(incarnation=0, node="d", sender="d")], "b")  # left: no verdict
    assert stats["suspicions"] == 3
    assert (stats["suspicions_refuted"], stats["suspicions_confirmed"]) == (1, 1)
    assert stats["failures"] == 2 and stats["refutes"] == 0  # refutes: of ourselves only


def test_a_suspicion_that_times_out_is_confirmed() -> None:
    world = Peers("bcd", up="bc")
    world.feed([Suspect(incarnation=0, node="d", sender="b")], "b")
    world.run(30.0)
    assert world.core.stats["suspicions_confirmed"] == 1


def test_push_pulls_initiated_on_join_and_periodically() -> None:
    world = Peers("")
    world.core.join([addr("b"), addr("c"), addr("a")], 0.0)  # ourselves is no push-pull
    assert world.core.stats["push_pulls_initiated"] == 2
    for stream in world.core.streams_to_open():
        world.core.handle_stream_reply(None, stream.to, 0.1)
    assert world.core.stats["push_pull_failures"] == 2
    world.core.handle_stream(PushPull(nodes=()), addr("b"), 0.2)
    assert world.core.stats["push_pulls_served"] == 1
    periodic = Peers("bc")
    periodic.run(31.0)
    assert periodic.core.stats["push_pulls_initiated"] == len(periodic.core.streams_to_open()) == 1

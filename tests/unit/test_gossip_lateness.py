"""Lateness (gossip/lateness.py): measured from our own probes, announced in our Alive,
honoured by probers and relays. The pieces alone, then one core against scripted
peers that answer late, then the simulated cluster with slow nodes.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections.abc import Callable
from functools import partial

import pytest

from gossip.config import GossipConfig
from gossip.lateness import (
    MARGIN,
    QUANTILE,
    LatenessAnnouncer,
    LatenessMeter,
    StallMeter,
    _time_quantile,
    patience,
)
from gossip.members import MemberSuspected
from gossip.membership import Membership
from gossip.messages import Ack, Addr, Alive, IndirectPing, Message, Nack, Ping
from gossip.sim.scenarios import false_positives

LAN = GossipConfig.lan()


# -- the pieces ---------------------------------------------------------------------------


def test_meter_takes_the_upper_quantile_of_recent_round_trips() -> None:
    meter = LatenessMeter(window=30.0)
    for i in range(3):
        meter.add(2.0, float(i))
    assert meter.current(3.0) == 0.0  # three round trips say nothing yet
    for i in range(3, 20):
        meter.add(0.004, float(i))  # one slow target among healthy ones does not count
    assert meter.current(20.0) == pytest.approx(0.004)
    for i in range(20, 40):
        meter.add(1.0 + (i % 4) * 0.25, float(i))  # now we are the slow one
    assert meter.current(40.0) == pytest.approx(1.5)
    assert meter.current(100.0) > 1.0  # the last four are kept a while...
    assert meter.current(200.0) == 0.0  # ... but not forever


def test_announcer_speaks_when_late_again_when_stale_and_when_recovered() -> None:
    announcer = LatenessAnnouncer(threshold=0.5, ttl=60.0)
    assert not announcer.due(0.0, 0.0)
    assert announcer.due(0.8, 1.0)
    announcer.sent(0.8, 1.0)
    assert not announcer.due(1.0, 10.0)
    assert announcer.due(1.3, 10.0)  # grew by more than half
    assert announcer.due(0.8, 31.0)  # half a ttl old
    announcer.sent(0.8, 31.0)
    assert not announcer.due(0.3, 32.0)
    assert announcer.due(0.0, 33.0)  # back under half the threshold: say so
    announcer.sent(0.0, 33.0)
    assert not announcer.due(0.0, 100.0)


def test_patience_lasts_the_ttl() -> None:
    assert patience(2.0, 10.0, 69.9, ttl=60.0) == 2.0
    assert patience(2.0, 10.0, 70.0, ttl=60.0) == 0.0


# -- one core, peers that answer late -------------------------------------------------------


def addr(name: str) -> Addr:
    return (f"10.1.0.{ord(name) - 96}", 7946)


NAMES = {addr(c): c for c in "abcdefgh"}


class LateWorld:
    """Core "a" among scripted peers; `delay[name]` is how late that peer reads packets,
    `our_delay` how late "a" reads them (its slow receive path)."""

    def __init__(
        self, peers: str = "bcdefg", *, config: GossipConfig = LAN, lifeguard: bool = True
    ) -> None:
        self.core = Membership(
            config, "a", addr("a"), rng=random.Random(3), now=0.0, lifeguard=lifeguard
        )
        self.now = 0.0
        self.delay = dict.fromkeys(peers, 0.002)
        self.our_delay = 0.002
        self.tcp_answers = False  # a TCP ping is answered after tcp_delay (the path is fine)
        self.tcp_delay = 0.01
        self.pending: list[tuple[float, int, Callable[[], None]]] = []
        self.sent: list[tuple[float, str, Message]] = []
        self._n = 0
        self.deliver([Alive(incarnation=0, node=p, addr=addr(p)) for p in peers], addr("b"))

    def deliver(self, messages: list[Message], source: Addr) -> None:
        self.core.handle_packet(messages, source, self.now)
        self._drain()

    def _later(self, at: float, action: Callable[[], None]) -> None:
        self._n += 1
        heapq.heappush(self.pending, (at, self._n, action))

    def _drain(self) -> None:
        for packet in self.core.packets_to_send():
            to = NAMES[packet.to]
            for message in packet.messages:
                self.sent.append((self.now, to, message))
                reply = self._reply(to, message)
                if reply is not None:
                    # the peer reads late, answers at once; we read its answer late too
                    self._later(
                        self.now + self.delay[to] + self.our_delay,
                        partial(self.deliver, [reply], packet.to),
                    )
        for stream in self.core.streams_to_open():  # TCP pings
            if self.tcp_answers and isinstance(stream.message, Ping):
                self._later(
                    self.now + self.tcp_delay,
                    partial(self._stream_answer, Ack(seq=stream.message.seq), stream.to),
                )
            else:
                self.core.handle_stream_reply(None, stream.to, self.now)

    def _stream_answer(self, ack: Ack, to: Addr) -> None:
        self.core.handle_stream_reply(ack, to, self.now)
        self._drain()

    def _reply(self, to: str, message: Message) -> Message | None:
        if isinstance(message, Ping):
            return Ack(seq=message.seq)
        if isinstance(message, IndirectPing):  # relays are healthy: they nack on time
            return Nack(seq=message.seq)
        return None

    def run(self, until: float) -> None:
        while True:
            due = self.core.next_timer()
            nxt = min(
                due if due is not None else math.inf,
                self.pending[0][0] if self.pending else math.inf,
            )
            if nxt > until:
                break
            self.now = nxt
            if self.pending and self.pending[0][0] == nxt:
                heapq.heappop(self.pending)[2]()
            else:
                self.core.handle_timer(nxt)
                self._drain()
        self.now = until

    def suspected(self) -> set[str]:
        events = []
        while (event := self.core.next_event()) is not None:
            events.append(event)
        return {e.member.name for e in events if isinstance(e, MemberSuspected)}


def test_a_target_that_announced_its_lateness_gets_that_much_longer() -> None:
    world = LateWorld()
    world.delay["c"] = 1.6  # reads our pings 1.6 s late
    world.run(30.0)
    assert "c" in world.suspected()  # answered after the 1 s deadline: suspected
    world.deliver([Alive(incarnation=5, node="c", addr=addr("c"), lateness_ms=1600)], addr("c"))
    world.suspected()
    world.run(world.now + 60.0 - 1.0)  # the announcement holds for lateness_ttl
    assert "c" not in world.suspected()
    world.run(world.now + 40.0)  # stale now, and not renewed
    assert "c" in world.suspected()


def test_a_relay_passes_on_a_late_target_s_ack_for_as_long_as_it_announced() -> None:
    world = LateWorld()
    world.delay["c"] = 2.0
    world.deliver([Alive(incarnation=5, node="c", addr=addr("c"), lateness_ms=2000)], addr("c"))
    start = world.now
    world.deliver([IndirectPing(seq=77, target="c", target_addr=addr("c"), source="b")], addr("b"))
    world.run(start + 0.5 + MARGIN * 2.0)
    to_b = [
        (round(t - start, 3), m)
        for t, to, m in world.sent
        if to == "b" and isinstance(m, Nack | Ack)
    ]
    # The nack on the usual schedule (the prober counts it), then c's ack, 2 s late,
    # still passed on: without c's announcement the relay forgets it at 0.5 s.
    assert to_b == [(0.4, Nack(seq=77)), (2.002, Ack(seq=77))]


def test_a_slow_node_stops_accusing_and_tells_the_cluster() -> None:
    world = LateWorld()
    world.our_delay = 1.4  # our receive path is slow: every ack reaches us 1.4 s late
    world.run(40.0)
    assert world.suspected()  # before it has measured itself, it accuses healthy peers
    alive = [m for _, _, m in world.sent if isinstance(m, Alive) and m.node == "a"]
    assert alive and alive[-1].lateness_ms >= 1400
    assert world.core.stats["lateness_announcements"] >= 1
    world.run(100.0)
    assert world.suspected() == set()  # measured: it waits long enough for its own acks
    assert world.core.health_score() == 0  # ... and they come, so Lifeguard relaxes
    world.our_delay = 0.002  # recovered
    world.run(200.0)
    alive = [m for _, _, m in world.sent if isinstance(m, Alive) and m.node == "a"]
    assert alive[-1].lateness_ms == 0  # and says so


def test_stall_meter_weighs_stalls_by_time_not_by_timer() -> None:
    meter = StallMeter(window=30.0)
    now = 0.0
    while now < 30.0:  # a loop stopped 0.3 s of every 0.5 s; four timers on time between
        now += 0.3
        meter.add(0.3, now)
        for _ in range(4):
            now += 0.05
            meter.add(0.0, now)
    # a packet lands in a stall 60% of the time and waits U(0, 0.3) there:
    # P(wait > x) = 0.6 (1 - x / 0.3) = 25% at x = 0.175 s
    assert meter.current(now) == pytest.approx(0.175, abs=0.005)
    assert meter.current(now + 31.0) == 0.0


def test_a_stalled_loop_measures_its_timers_running_late() -> None:
    # A stalled loop (GC pause, starved CPU) probes only when it runs, so its round trips
    # look fine; its timers are what run late, by as much as a ping waits to be read.
    world = LateWorld()
    world.run(5.0)
    assert world.core.lateness(world.now) == 0.0
    for _ in range(60):
        due = world.core.next_timer()
        assert due is not None
        world.now = due + 1.0
        world.core.handle_timer(world.now)
        world._drain()
    late = world.core.lateness(world.now)
    assert 0.5 <= late <= 1.0
    alive = [m for _, _, m in world.sent if isinstance(m, Alive) and m.node == "a"]
    assert alive[-1].lateness_ms >= 500


def test_a_direct_ack_that_lost_to_the_tcp_ping_is_measured_all_the_same() -> None:
    # Our receive path is slow, the TCP ping (sent at probe_timeout) answers first: the
    # probe succeeds, and the late direct ack that follows still counts as a round trip.
    world = LateWorld()
    world.tcp_answers = True
    world.our_delay = 1.6
    world.tcp_delay = 0.05
    world.run(40.0)
    assert world.core.stats["tcp_acks"] > 10 and world.core.stats["late_acks"] > 10
    assert world.core.lateness(world.now) >= 1.6


def test_without_lifeguard_or_with_lateness_off_nothing_changes() -> None:
    for world in (
        LateWorld(lifeguard=False),
        LateWorld(config=dataclasses.replace(LAN, lateness=False)),
    ):
        world.our_delay = 1.4
        world.run(100.0)
        assert world.suspected()
        assert world.core.stats["lateness_announcements"] == 0
        assert all(m.lateness_ms == 0 for _, _, m in world.sent if isinstance(m, Alive))


# -- the simulated cluster ---------------------------------------------------------------------


def test_in_the_simulator_slow_nodes_are_suspected_far_less() -> None:
    on = false_positives(30, seconds=120.0, slow_fraction=0.1, seed=2)
    memberlist = false_positives(
        30,
        seconds=120.0,
        slow_fraction=0.1,
        seed=2,
        config=dataclasses.replace(LAN, lateness=False),
    )
    assert on.false_deaths == memberlist.false_deaths == 0
    assert on.of_slow * 3 < memberlist.of_slow, (on, memberlist)
    assert on.core_stats["lateness_announcements"] >= len(on.slow)


def test_the_stall_meter_answers_as_the_quantile_of_its_window() -> None:
    """The meter keeps a running sum to skip the sort when the stalls cannot reach the
    budget; whatever it skips, it answers what the quantile of its window's stalls is."""
    rng = random.Random(7)
    for _ in range(200):
        meter, window = StallMeter(2.0), 2.0
        kept: list[tuple[float, float]] = []
        now = 0.0
        for _ in range(rng.randrange(1, 60)):
            now += rng.choice([0.001, 0.05, 0.3, 1.5])
            lag = rng.choice([0.0, 0.0005, 0.002, 0.1, 0.4, 0.9])
            meter.add(lag, now)
            if lag > 0:
                kept.append((now, lag))
            kept = [(at, lag) for at, lag in kept if now - at <= window]
            expected = _time_quantile([lag for _, lag in kept], (1 - QUANTILE) * window)
            assert meter.current(now) == pytest.approx(expected, abs=1e-12)

"""The membership core alone, against scripted peers, on a virtual clock (no sockets, no sleeps).

`Peers` plays the rest of the cluster: the members in `up` answer pings and
relay indirect probes (acking when the target is up, nacking when it is not);
the others are silent. Time jumps from one `next_timer()` to the next.
"""

from __future__ import annotations

import dataclasses
import random
from typing import TypeVar

import pytest

from gossip.config import GossipConfig, retransmit_limit
from gossip.dissemination import USER_MIN_TRANSMITS
from gossip.errors import ConfigError, EncodeError
from gossip.members import (
    Event,
    MemberAlive,
    MemberFailed,
    MemberInfo,
    MemberJoined,
    MemberLeft,
    MemberSuspected,
    MemberUpdated,
)
from gossip.membership import Membership
from gossip.messages import (
    Ack,
    Addr,
    Alive,
    Dead,
    IndirectPing,
    MemberState,
    Message,
    Nack,
    NodeState,
    Packet,
    Ping,
    PushPull,
    Suspect,
    User,
)

LAN = GossipConfig.lan()
M = TypeVar("M", bound=Message)
E = TypeVar("E", bound=Event)


def addr(name: str) -> Addr:
    return (f"10.0.0.{ord(name) - 96}", 7946)


NAMES = {addr(c): c for c in "abcdefgh"}


class Recorder:
    """A StateDelegate that records what the core hands up."""

    def __init__(self) -> None:
        self.user: list[tuple[bytes, str]] = []
        self.merged: list[tuple[bytes, bool]] = []

    def local_state(self, join: bool) -> bytes:
        return b"join-state" if join else b"state"

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        self.merged.append((data, join))

    def notify_user(self, payload: bytes, source: str) -> None:
        self.user.append((payload, source))


class Peers:
    """Scripted peers around the core under test."""

    def __init__(
        self,
        peers: str = "bcd",
        *,
        up: str | None = None,
        nack: bool = True,
        lifeguard: bool = True,
        config: GossipConfig = LAN,
        seed: int = 0,
    ) -> None:
        self.delegate = Recorder()
        self.core = Membership(
            config,
            "a",
            addr("a"),
            rng=random.Random(seed),
            now=0.0,
            state=self.delegate,
            lifeguard=lifeguard,
        )
        self.up = set(peers if up is None else up)
        self.nack = nack
        self.now = 0.0
        self.log: list[tuple[float, Packet]] = []
        self.events: list[tuple[float, Event]] = []
        self.feed([Alive(incarnation=0, node=p, addr=addr(p)) for p in peers], "b")

    def feed(self, messages: list[Message], sender: str) -> None:
        self.core.handle_packet(messages, addr(sender), self.now)
        self._answer()

    def run(self, until: float) -> None:
        while (due := self.core.next_timer()) is not None and due <= until:
            self.now = due
            self.core.handle_timer(due)
            self._answer()
        self.now = until

    def _answer(self) -> None:
        while packets := self.core.packets_to_send():
            for packet in packets:
                self.log.append((self.now, packet))
                if NAMES[packet.to] in self.up:
                    for message in packet.messages:
                        self._reply(message, packet.to)
        while (event := self.core.next_event()) is not None:
            self.events.append((self.now, event))

    def _reply(self, message: Message, to: Addr) -> None:
        if isinstance(message, Ping):
            self.core.handle_packet([Ack(seq=message.seq)], to, self.now)
        elif isinstance(message, IndirectPing):
            if message.target in self.up:
                self.core.handle_packet([Ack(seq=message.seq)], to, self.now)
            elif message.nack and self.nack:
                self.core.handle_packet([Nack(seq=message.seq)], to, self.now)

    def sent(self, kind: type[M], since: float = 0.0) -> list[tuple[float, str, M]]:
        return [
            (t, NAMES[p.to], m)
            for t, p in self.log
            if t >= since
            for m in p.messages
            if isinstance(m, kind)
        ]

    def of(self, kind: type[E]) -> list[tuple[float, E]]:
        return [(t, e) for t, e in self.events if isinstance(e, kind)]

    def member(self, name: str) -> MemberInfo:
        (info,) = [m for m in self.core.members() if m.name == name]
        return info


def first_probe(world: Peers, limit: float = 5.0) -> tuple[float, str, Ping]:
    while not world.sent(Ping):
        world.run(world.now + 0.01)
        assert world.now < limit
    t, to, ping = world.sent(Ping)[0]
    assert isinstance(ping, Ping)
    return t, to, ping


def test_start_announces_ourselves() -> None:
    world = Peers("")
    assert world.of(MemberJoined)[0][1].member.name == "a"
    assert world.core.members()[0].state is MemberState.ALIVE
    assert world.core.next_timer() is not None
    assert "Membership a inc=0" in repr(world.core)


def _timers(world: Peers, until: float) -> int:
    fired = 0
    while (due := world.core.next_timer()) is not None and due <= until:
        world.now = due
        world.core.handle_timer(due)
        world._answer()
        fired += 1
    world.now = until
    return fired


def test_an_idle_node_wakes_for_its_probes_not_for_an_empty_gossip_tick() -> None:
    """Nothing to disseminate: the 200 ms gossip tick slows down (it only senses loop
    stalls then) and rides the probe timer, one wake-up a probe period; a broadcast queued
    later is gossiped within one tick."""
    world = Peers("bcd")
    world.run(30.0)  # the joins' news has had its transmissions: the queue is empty
    assert len(world.core._outbox) == 0
    fired = _timers(world, 40.0)
    print(f"timer wake-ups of an idle node in 10 s: {fired} (gossip tick 0.2 s, probe 1 s)")
    # 50 gossip ticks and the probes at first, then 20 (a tick every half probe period)
    assert fired <= 10 + 1, fired
    world.core.broadcast(b"news", key="k")
    due = world.core.next_timer()
    assert due is not None and due <= world.now + LAN.gossip_interval  # within one tick
    before = len(world.sent(User))
    _timers(world, world.now + LAN.gossip_interval)
    assert len(world.sent(User)) > before


def test_constructor_validates() -> None:
    with pytest.raises(ConfigError):
        Membership(LAN, "", addr("a"), rng=random.Random(), now=0.0)
    with pytest.raises(ConfigError):
        Membership(LAN, "a", addr("a"), rng=random.Random(), now=0.0, meta=b"x" * 513)


def test_probe_happy_path_round_robin() -> None:
    world = Peers("bcd")
    t0, target, ping = first_probe(world)
    assert (ping.target, ping.source) == (target, "a")
    world.run(t0 + 3.0 - 1e-9)
    probes = world.sent(Ping)
    assert [t for t, _, _ in probes] == pytest.approx([t0, t0 + 1.0, t0 + 2.0])
    assert sorted(to for _, to, _ in probes) == ["b", "c", "d"]  # one pass visits everyone
    assert world.sent(IndirectPing) == []
    assert world.core.stats["acks"] == 3 and world.core.health_score() == 0
    assert all(m.state is MemberState.ALIVE for m in world.core.members())


def test_ping_timeout_indirect_then_suspect_then_dead() -> None:
    world = Peers("bcd", up="")
    t0, target, ping = first_probe(world)
    world.up = set("bcd") - {target}
    world.run(t0 + 0.5)
    indirect = world.sent(IndirectPing)
    assert [t for t, _, _ in indirect] == pytest.approx([t0 + 0.5] * 2)
    assert sorted(to for _, to, _ in indirect) == sorted(world.up)
    assert all(m.target == target and m.nack and m.seq == ping.seq for _, _, m in indirect)
    world.run(t0 + 1.0)
    ((t_s, suspected),) = world.of(MemberSuspected)
    assert isinstance(suspected, MemberSuspected)
    assert t_s == pytest.approx(t0 + 1.0)
    assert (suspected.member.name, suspected.by) == (target, "a")
    assert world.core.health_score() == 0  # both relays nacked: the fault is not ours
    # n = 4 -> k = 2 wanted confirmations; none come, so the max: 6 x 4 x 1 s = 24 s.
    world.run(t0 + 1.0 + 24.0 - 0.01)
    assert world.of(MemberFailed) == []
    world.run(t0 + 1.0 + 24.0)
    ((t_f, failed),) = world.of(MemberFailed)
    assert t_f == pytest.approx(t0 + 25.0)
    assert failed.member.state is MemberState.DEAD
    assert world.sent(Dead)[0][2] == Dead(incarnation=0, node=target, sender="a")


def test_confirmations_shorten_the_suspicion() -> None:
    world = Peers("bcdefg")
    world.feed([Suspect(incarnation=0, node="g", sender="b")], "b")
    ((t0, _),) = world.of(MemberSuspected)
    # n = 7: k = 2, min = 4 x log10(7)->1 x 1 s = 4 s, max = 24 s.
    for sender in ("b", "a", "c", "c"):  # the accuser, ourselves once, then c (dup ignored)
        world.feed([Suspect(incarnation=0, node="g", sender=sender)], sender)
    assert world.core.stats["confirmations"] == 2  # a and c: only b, the accuser, is excluded
    world.up.discard("g")
    world.run(t0 + 3.99)
    assert world.of(MemberFailed) == []
    world.run(t0 + 4.0)
    assert world.of(MemberFailed)[0][0] == pytest.approx(t0 + 4.0)


def test_one_confirmation_gives_the_lifeguard_fraction() -> None:
    world = Peers("bcdefg")  # g answers our pings (which do not refute for it)
    world.feed([Suspect(incarnation=0, node="g", sender="b")], "b")
    world.feed([Suspect(incarnation=0, node="g", sender="c")], "c")
    world.run(20.0)
    ((t_f, _),) = world.of(MemberFailed)
    assert t_f == pytest.approx(24.0 - 20.0 * 0.63093, abs=0.002)  # max - (max-min)ln2/ln3


def test_refutation_outbids_the_accuser() -> None:
    world = Peers("bc")
    world.feed([Suspect(incarnation=0, node="a", sender="b")], "b")
    assert world.core.incarnation == 1 and world.core.health_score() == 1
    world.feed([Dead(incarnation=5, node="a", sender="c")], "c")
    assert world.core.incarnation == 6 and world.core.health_score() == 2
    world.feed([Suspect(incarnation=3, node="a", sender="b")], "b")  # stale: ignored
    assert world.core.stats["refutes"] == 2
    world.run(1.0)
    alive = [m for _, _, m in world.sent(Alive) if isinstance(m, Alive) and m.node == "a"]
    assert alive[-1] == Alive(incarnation=6, node="a", addr=addr("a"))
    assert world.member("a").state is MemberState.ALIVE


def test_restarted_node_bumps_above_its_previous_life() -> None:
    world = Peers("b")
    remote = PushPull(
        nodes=(NodeState(name="a", addr=addr("a"), incarnation=7, state=MemberState.ALIVE),)
    )
    world.core.handle_stream_reply(remote, addr("b"), 0.0)
    assert world.core.incarnation == 8
    world.feed([Dead(incarnation=9, node="a", sender="a")], "b")  # an old graceful leave
    assert world.core.incarnation == 10
    world.feed([Alive(incarnation=10, node="a", addr=addr("a"))], "b")  # our own echo
    assert world.core.incarnation == 10


def test_buddy_system_pings_a_suspect_with_its_suspicion() -> None:
    world = Peers("b")
    world.feed([Suspect(incarnation=0, node="b", sender="c")], "b")
    world.up.clear()
    _, _, ping = first_probe(world)
    (packet,) = [p for _, p in world.log if ping in p.messages]
    assert Suspect(incarnation=0, node="b", sender="a") in packet.messages


def test_buddy_target_refutes_in_its_ack() -> None:
    b = Membership(LAN, "b", addr("b"), rng=random.Random(1), now=0.0)
    b.packets_to_send()
    b.handle_packet(
        [Ping(seq=9, target="b", source="a"), Suspect(incarnation=0, node="b", sender="a")],
        addr("a"),
        1.0,
    )
    (ack,) = b.packets_to_send()
    assert ack.to == addr("a") and ack.messages[0] == Ack(seq=9)
    assert Alive(incarnation=1, node="b", addr=addr("b")) in ack.messages


def test_without_lifeguard_plain_swim() -> None:
    world = Peers("bcdefg", up="", lifeguard=False)
    world.feed([Suspect(incarnation=0, node="g", sender="b")], "b")
    _, _, ping = first_probe(world)
    (packet,) = [p for _, p in world.log if ping in p.messages]
    assert not any(isinstance(m, Suspect) and m.sender == "a" for m in packet.messages)
    world.run(2.0)
    assert all(not m.nack for _, _, m in world.sent(IndirectPing))
    assert world.core.health_score() == 0  # awareness is fixed at 0
    world.feed([Suspect(incarnation=0, node="g", sender="c")], "c")
    assert world.core.stats["confirmations"] == 0
    world.run(5.0)
    (t_g,) = [t for t, e in world.of(MemberFailed) if e.member.name == "g"]
    assert t_g == pytest.approx(4.0)  # the min from the start: 4 x 1 x 1 s


def test_awareness_rises_on_silent_relays_and_heals_on_acks() -> None:
    world = Peers("bcd", up="", nack=False)
    t0, _, _ = first_probe(world)
    world.run(t0 + 1.0)
    assert world.core.health_score() == 2  # two relays asked, neither nacked
    world.run(t0 + 20.0)
    times = [t - t0 for t, _, _ in world.sent(Ping)]
    # Each period is probe_interval x (score + 1), the score taken when the probe starts:
    # +2 (two silent relays), then +1 (one relay left alive: the first target is suspect).
    assert times[:4] == pytest.approx([0.0, 1.0, 4.0, 8.0])
    assert world.core.health_score() == 6  # 2, 3, 4, 5, 6 after the failures at 1, 4, 8, 13, 19
    world.up = set("bcd")
    world.feed([Alive(incarnation=1, node=n, addr=addr(n)) for n in "bcd"], "b")
    acks = world.core.stats["acks"]
    world.run(world.now + 40.0)
    assert world.core.health_score() == 0  # -1 per acked probe
    assert world.core.stats["acks"] - acks >= 6


def test_an_answered_probe_still_waits_its_scaled_period() -> None:
    # Lifeguard's LHA-Probe stretches the probe period itself. memberlist stretches only
    # how long one probe waits (its ticker stays at 1 s, and an answered probe returns at
    # once), so there a degraded node whose probes are answered probes every second; we
    # keep the paper's rate (docs/gossip.md, "Where we differ from memberlist").
    world = Peers("bcd", up="", nack=False)
    t0, _, _ = first_probe(world)
    world.run(t0 + 1.0)  # the first probe failed, two relays silent: +2
    assert world.core.health_score() == 2
    world.up = set("bcd")  # the second probe (sent at t0 + 1) is answered via the relays
    world.run(t0 + 8.0 - 1e-9)
    times = [t - t0 for t, _, _ in world.sent(Ping)]
    assert times[:5] == pytest.approx([0.0, 1.0, 4.0, 6.0, 7.0])  # periods 1, 3, 2, 1 s
    assert world.core.health_score() == 0


def test_nacks_keep_awareness_down() -> None:
    world = Peers("bcd", up="bc")
    world.run(10.0)
    assert world.core.stats["nacks"] > 0
    assert world.core.health_score() == 0


def test_relaying_an_indirect_probe() -> None:
    world = Peers("bcd", up="")
    world.feed([IndirectPing(seq=42, target="d", target_addr=addr("d"), source="c")], "c")
    ((_, to, ping),) = world.sent(Ping)
    assert isinstance(ping, Ping)
    assert (to, ping.target, ping.source, ping.source_addr) == ("d", "d", "a", addr("a"))
    world.feed([Ack(seq=ping.seq)], "d")
    assert [(to, m) for _, to, m in world.sent(Ack)] == [("c", Ack(seq=42))]


def test_relay_nacks_when_the_target_is_silent() -> None:
    world = Peers("bcd", up="")
    world.feed([IndirectPing(seq=42, target="d", target_addr=addr("d"), source="c")], "c")
    world.feed(
        [IndirectPing(seq=43, target="d", target_addr=addr("d"), source="b", nack=False)], "b"
    )
    # 80% of the 0.5 s a prober has left after asking: the nack beats its deadline.
    world.run(0.4 - 1e-9)
    assert world.sent(Nack) == []
    world.run(0.4)
    assert [(t, to, m) for t, to, m in world.sent(Nack)] == [(0.4, "c", Nack(seq=42))]
    world.run(0.45)  # the target answers late: the relay still passes its ack on
    ping = world.sent(Ping)[0][2]
    world.feed([Ack(seq=ping.seq)], "d")
    assert [(to, m) for _, to, m in world.sent(Ack)] == [("c", Ack(seq=42))]


def test_ping_for_another_node_is_ignored() -> None:
    world = Peers("b")
    world.feed([Ping(seq=1, target="z", source="b")], "b")
    world.feed([Ping(seq=2, target="a", source="b", source_addr=addr("c"))], "b")
    assert [(to, m) for _, to, m in world.sent(Ack)] == [("c", Ack(seq=2))]
    assert world.core.stats["misdirected_pings"] == 1


def test_alive_updates_conflicts_and_reclaim() -> None:
    world = Peers("bc")
    world.feed([Alive(incarnation=1, node="b", addr=addr("b"), meta=b"v2")], "b")
    assert isinstance(world.events[-1][1], MemberUpdated)
    world.feed([Alive(incarnation=5, node="b", addr=addr("h"))], "h")
    assert world.member("b").addr == addr("b") and world.core.stats["conflicts"] == 1
    world.feed([Dead(incarnation=1, node="b", sender="b")], "b")
    assert isinstance(world.events[-1][1], MemberLeft)
    world.feed([Alive(incarnation=0, node="b", addr=addr("h"))], "h")  # a LEFT name is free
    assert isinstance(world.events[-1][1], MemberAlive)
    assert world.member("b").addr == addr("h")


def test_dead_name_reclaim_after_dead_node_reclaim_time() -> None:
    world = Peers("bc", config=dataclasses.replace(LAN, dead_node_reclaim_time=5.0))
    world.feed([Dead(incarnation=0, node="b", sender="c")], "c")
    world.feed([Alive(incarnation=1, node="b", addr=addr("h"))], "h")
    assert world.member("b").state is MemberState.DEAD
    world.now = 6.0
    world.feed([Alive(incarnation=0, node="b", addr=addr("h"))], "h")
    assert world.member("b").state is MemberState.ALIVE


def test_user_messages_are_delivered_once_and_regossiped() -> None:
    world = Peers("bcd")
    world.feed([User(payload=b"delta-1")], "b")
    world.feed([User(payload=b"delta-1")], "c")
    assert world.delegate.user == [(b"delta-1", "b")]
    assert world.core.stats["user_duplicates"] == 1
    world.run(1.0)
    carriers = {to for _, to, m in world.sent(User) if m == User(payload=b"delta-1")}
    assert carriers  # passed on, epidemic style
    assert world.core.stats["user_delivered"] == 1


def test_own_broadcasts_are_keyed_and_never_delivered_to_ourselves() -> None:
    world = Peers("bcd")
    world.core.broadcast(b"v1", key="svc/web")
    world.core.broadcast(b"v2", key="svc/web")
    world.core.broadcast(b"other")
    world.run(2.0)
    sent = {m.payload for _, _, m in world.sent(User) if isinstance(m, User)}
    assert sent == {b"v2", b"other"}
    world.feed([User(payload=b"v2")], "b")
    assert world.delegate.user == []
    with pytest.raises(EncodeError, match="oversized"):
        world.core.broadcast(b"x" * 1400)


def test_every_packet_fits_the_budget_and_carries_broadcasts() -> None:
    cfg = dataclasses.replace(LAN, packet_overhead=100)
    world = Peers("bcdefgh", config=cfg)
    for i in range(60):
        world.core.broadcast(bytes([i]) * 100)
    world.run(3.0)
    from gossip import codec

    for _, packet in world.log:
        assert codec.packet_size(packet.messages) <= 1300
    first_ping = next(p for _, p in world.log if isinstance(p.messages[0], Ping))
    assert any(isinstance(m, User) for m in first_ping.messages)


def test_retransmit_limit_bounds_each_broadcast() -> None:
    # n = 4 -> 4 x ceil(log10 5) = 4 transmits; a User payload has a floor of 8
    world = Peers("bcd")
    assert retransmit_limit(LAN.retransmit_mult, 4) == 4
    world.core.broadcast(b"once-only")
    world.run(5.0)
    copies = [m for _, _, m in world.sent(User) if m == User(payload=b"once-only")]
    assert len(copies) == USER_MIN_TRANSMITS == 8


def test_push_pull_join_and_serve() -> None:
    world = Peers("")
    world.core.join([addr("b"), addr("a"), addr("b")], 0.0)
    (request,) = world.core.streams_to_open()
    assert request.to == addr("b") and request.message.join
    assert request.message.user_state == b"join-state"
    assert [n.name for n in request.message.nodes] == ["a"]
    reply = PushPull(
        nodes=(
            NodeState(name="b", addr=addr("b"), incarnation=3, state=MemberState.ALIVE),
            NodeState(name="c", addr=addr("c"), incarnation=1, state=MemberState.DEAD),
        ),
        join=True,
        user_state=b"theirs",
    )
    world.core.handle_stream_reply(reply, addr("b"), 0.0)
    assert world.member("b").incarnation == 3
    assert "c" not in {m.name for m in world.core.members()}  # unknown + dead: ignored
    assert world.delegate.merged == [(b"theirs", True)]
    served = world.core.handle_stream(PushPull(nodes=(), user_state=b"x"), addr("b"), 1.0)
    assert {n.name for n in served.nodes} == {"a", "b"} and served.user_state == b"state"
    world.core.handle_stream_reply(None, addr("b"), 1.0)
    assert world.core.stats["push_pull_failures"] == 1


def test_periodic_push_pull_with_a_random_live_peer() -> None:
    world = Peers("bc")
    world.run(31.0)
    streams = world.core.streams_to_open()
    assert len(streams) == 1 and NAMES[streams[0].to] in "bc"
    assert not streams[0].message.join


def test_remote_dead_becomes_our_suspicion() -> None:
    world = Peers("bc")
    remote = PushPull(
        nodes=(NodeState(name="c", addr=addr("c"), incarnation=0, state=MemberState.DEAD),)
    )
    world.core.handle_stream(remote, addr("b"), 0.0)
    world._answer()
    ((_, event),) = world.of(MemberSuspected)
    assert isinstance(event, MemberSuspected) and event.by == "a"


def test_leave_is_gossiped_as_dead_from_ourselves() -> None:
    world = Peers("bc")
    world.core.leave(0.0)
    world.core.leave(0.0)
    world._answer()
    assert world.member("a").state is MemberState.LEFT and world.core.left
    world.run(2.0)
    assert Dead(incarnation=0, node="a", sender="a") in [m for _, _, m in world.sent(Dead)]
    assert world.sent(Ping) == []  # no more probing
    world.feed([Suspect(incarnation=0, node="a", sender="b")], "b")
    assert world.core.incarnation == 0  # no refuting after leaving


def test_dead_members_leave_the_probe_list_then_the_table() -> None:
    cfg = dataclasses.replace(LAN, gossip_to_the_dead_time=10.0, tombstone_timeout=40.0)
    world = Peers("bcd", config=cfg)
    world.feed([Dead(incarnation=0, node="d", sender="b")], "b")
    world.run(15.0)
    state = world.core.handle_stream(PushPull(nodes=()), addr("b"), world.now)
    assert "d" not in {n.name for n in state.nodes}
    assert world.member("d").state is MemberState.DEAD
    probes_before = len(world.sent(Ping))
    world.run(45.0)
    assert "d" not in {m.name for m in world.core.members()}
    assert all(to != "d" for _, to, _ in world.sent(Ping))
    assert len(world.sent(Ping)) > probes_before


def test_same_seed_same_run() -> None:
    def trace(seed: int) -> list[tuple[float, Packet]]:
        world = Peers("bcdefg", up="bcd", seed=seed)
        world.core.broadcast(b"x")
        world.run(30.0)
        return world.log

    assert trace(3) == trace(3)
    assert trace(3) != trace(4)


def test_tcp_fallback_ping_saves_a_node_whose_udp_is_lost() -> None:
    world = Peers("bcd", up="")
    t0, target, _ = first_probe(world)
    world.up = set("bcd") - {target}  # the relays answer; the target's UDP is lost
    world.run(t0 + 0.5)
    (tcp,) = [s for s in world.core.streams_to_open() if isinstance(s.message, Ping)]
    assert tcp.to == addr(target)
    assert isinstance(tcp.message, Ping) and tcp.message.target == target
    world.core.handle_stream_reply(Ack(seq=tcp.message.seq), tcp.to, world.now + 0.01)
    world.run(t0 + 1.5)
    assert world.of(MemberSuspected) == []
    assert world.core.stats["tcp_acks"] == 1


def test_tcp_fallback_failure_still_suspects() -> None:
    world = Peers("bcd", up="")
    t0, target, _ = first_probe(world)
    world.run(t0 + 0.5)
    (tcp,) = [s for s in world.core.streams_to_open() if isinstance(s.message, Ping)]
    world.core.handle_stream_reply(None, tcp.to, world.now)
    world.run(t0 + 1.0)
    assert [e.member.name for _, e in world.of(MemberSuspected)] == [target]
    assert world.core.stats["tcp_ping_failures"] == 1
    assert world.core.stats["push_pull_failures"] == 0


def test_tcp_ping_is_answered_only_by_its_target() -> None:
    world = Peers("b")
    assert world.core.handle_stream(Ping(seq=7, target="a", source="b"), addr("b"), 0.0) == Ack(
        seq=7
    )
    assert world.core.handle_stream(Ping(seq=8, target="z", source="b"), addr("b"), 0.0) is None

"""A few cores wired together in memory: join by push-pull, gossip, leave, crash.

`Cluster` is the tiny harness: a dict of Membership cores by address that
delivers each other's packets and streams instantly, through the real codec,
on one virtual clock that jumps to the earliest `next_timer()`.
"""

from __future__ import annotations

import random

from gossip import codec
from gossip.config import GossipConfig
from gossip.members import Event, MemberFailed, MemberJoined, MemberLeft
from gossip.membership import Membership
from gossip.messages import Addr, MemberState


class Delegate:
    def __init__(self, name: str) -> None:
        self.name = name
        self.state = {name}
        self.user: list[tuple[bytes, str]] = []

    def local_state(self, join: bool) -> bytes:
        return ",".join(sorted(self.state)).encode()

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        self.state |= set(data.decode().split(","))

    def notify_user(self, payload: bytes, source: str) -> None:
        self.user.append((payload, source))


class Cluster:
    def __init__(self, size: int, *, seed: int = 1, config: GossipConfig | None = None) -> None:
        self.config = config or GossipConfig.local()
        self.now = 0.0
        self.cores: dict[Addr, Membership] = {}
        self.delegates: dict[str, Delegate] = {}
        self.down: set[Addr] = set()
        self.events: list[tuple[float, str, Event]] = []
        for i in range(size):
            self.start(f"n{i}", seed * 100 + i)

    def start(self, name: str, seed: int, incarnation: int = 0) -> Membership:
        address = (f"10.0.0.{int(name[1:]) + 1}", 7946)
        self.delegates[name] = Delegate(name)
        core = Membership(
            self.config,
            name,
            address,
            rng=random.Random(seed),
            now=self.now,
            state=self.delegates[name],
            incarnation=incarnation,
        )
        self.cores[address] = core
        self.down.discard(address)
        return core

    def core(self, name: str) -> Membership:
        return next(c for c in self.cores.values() if c.name == name)

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for address, core in list(self.cores.items()):
                if address in self.down:
                    continue
                for packet in core.packets_to_send():
                    moved = True
                    data = codec.encode_packet(packet.messages, self.config.packet_budget)
                    if packet.to in self.cores and packet.to not in self.down:
                        self.cores[packet.to].handle_packet(
                            codec.decode_packet(data), address, self.now
                        )
                for request in core.streams_to_open():
                    moved = True
                    peer = self.cores.get(request.to)
                    if peer is None or request.to in self.down:
                        core.handle_stream_reply(None, request.to, self.now)
                        continue
                    sent = codec.decode_stream(codec.encode_stream(request.message))
                    assert not isinstance(sent, list)
                    reply = peer.handle_stream(sent, address, self.now)  # type: ignore[arg-type]
                    core.handle_stream_reply(reply, request.to, self.now)
                while (event := core.next_event()) is not None:
                    self.events.append((self.now, core.name, event))

    def run(self, until: float) -> None:
        self.pump()
        while True:
            live = [c for a, c in self.cores.items() if a not in self.down]
            due = min(t for c in live if (t := c.next_timer()) is not None)
            if due > until:
                break
            self.now = due
            for core in live:
                timer = core.next_timer()
                if timer is not None and timer <= due:
                    core.handle_timer(due)
            self.pump()
        self.now = until

    def view(self, name: str) -> dict[str, MemberState]:
        return {m.name: m.state for m in self.core(name).members()}

    def live_names(self) -> list[str]:
        return [c.name for a, c in self.cores.items() if a not in self.down]


def joined(size: int) -> Cluster:
    cluster = Cluster(size)
    seed = next(iter(cluster.cores))
    for core in list(cluster.cores.values())[1:]:
        core.join([seed], cluster.now)
    cluster.run(1.0)
    return cluster


def test_three_nodes_join_through_one_seed() -> None:
    cluster = joined(3)
    for name in ("n0", "n1", "n2"):
        assert cluster.view(name) == dict.fromkeys(["n0", "n1", "n2"], MemberState.ALIVE)
    joins = {(who, e.member.name) for _, who, e in cluster.events if isinstance(e, MemberJoined)}
    assert {(w, m) for w in ("n0", "n1", "n2") for m in ("n0", "n1", "n2")} <= joins
    assert cluster.delegates["n1"].state >= {"n0", "n1"}  # user state merged on join


def test_user_state_converges_by_periodic_push_pull() -> None:
    cluster = joined(3)
    cluster.run(10.0)
    for delegate in cluster.delegates.values():
        assert delegate.state == {"n0", "n1", "n2"}


def test_user_message_reaches_everyone_once() -> None:
    cluster = joined(4)
    cluster.core("n2").broadcast(b"service web on n2", key="web")
    cluster.run(3.0)
    for name, delegate in cluster.delegates.items():
        expected = [] if name == "n2" else [b"service web on n2"]
        assert [p for p, _ in delegate.user] == expected
        assert all(source.startswith("n") for _, source in delegate.user)


def test_graceful_leave_marks_left_on_the_others() -> None:
    cluster = joined(3)
    cluster.core("n1").leave(cluster.now)
    cluster.run(cluster.now + 1.0)
    assert cluster.view("n0")["n1"] is MemberState.LEFT
    assert cluster.view("n2")["n1"] is MemberState.LEFT
    lefts = {
        who for _, who, e in cluster.events if isinstance(e, MemberLeft) and e.member.name == "n1"
    }
    assert lefts == {"n0", "n1", "n2"}
    assert not any(isinstance(e, MemberFailed) for _, _, e in cluster.events)


def test_crash_is_detected_by_everyone() -> None:
    cluster = joined(4)
    crashed = next(a for a, c in cluster.cores.items() if c.name == "n3")
    cluster.down.add(crashed)
    t0 = cluster.now
    cluster.run(t0 + 5.0)
    failed = {
        who: t
        for t, who, e in cluster.events
        if isinstance(e, MemberFailed) and e.member.name == "n3"
    }
    assert set(failed) == {"n0", "n1", "n2"}
    assert max(failed.values()) - t0 < 3.0
    assert not any(
        isinstance(e, MemberFailed) and e.member.name != "n3" for _, _, e in cluster.events
    )


def test_restarted_node_rejoins_above_its_old_incarnation() -> None:
    cluster = joined(3)
    old = next(a for a, c in cluster.cores.items() if c.name == "n2")
    cluster.core("n2").leave(cluster.now)
    cluster.run(cluster.now + 1.0)
    reborn = cluster.start("n2", seed=99)  # same name and address, incarnation 0 again
    assert cluster.cores[old] is reborn
    reborn.join([next(iter(cluster.cores))], cluster.now)
    cluster.run(cluster.now + 2.0)
    assert reborn.incarnation >= 1
    for name in ("n0", "n1", "n2"):
        assert cluster.view(name)["n2"] is MemberState.ALIVE


def test_no_false_suspicions_on_a_healthy_cluster() -> None:
    cluster = joined(5)
    cluster.run(30.0)
    for core in cluster.cores.values():
        assert core.stats["suspicions"] == 0
        assert core.health_score() == 0
        assert all(m.state is MemberState.ALIVE for m in core.members())

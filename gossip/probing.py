"""Failure detection of the membership core: probes, relays and TCP fallback pings, sans-IO.

SWIM §4.1/4.3 with Lifeguard (memberlist state.go probe/probeNode), as the
`gossip.membership` docstring tells it. `Prober` is the part of `Membership`
that probes: it owns the probes in flight, the relays it runs for others, the
TCP fallback pings and the probe schedule (the rota's slots, or memberlist's
ring), and is given at construction what it works with: the member table,
the clocks of lateness and local health it shares with the core, and the
core's outputs (`send`, `open_stream`) and its verdict (`suspect`) for a
probe that failed. It draws on the core's `rng` in the order the core did
before it was split out, so one seed gives one run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from gossip.awareness import Awareness
from gossip.config import GossipConfig
from gossip.lateness import MARGIN, Lateness
from gossip.members import MemberInfo, MemberStates
from gossip.messages import (
    Ack,
    Addr,
    IndirectPing,
    MemberState,
    Message,
    Nack,
    Ping,
    StreamRequest,
    Suspect,
)
from gossip.rtt import RttHistogram

ALIVE, SUSPECT = MemberState.ALIVE, MemberState.SUSPECT

NACK_FRACTION = 0.8
"""A relay's nack delay, as a fraction of the time the prober has left after asking."""

Send = Callable[[Addr, list[Message]], None]
RandomMembers = Callable[[int, Callable[[MemberInfo], bool]], list[MemberInfo]]


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    incarnation: int  # the target's, when the probe began (a refutation may overtake us)
    sent_at: float
    indirect_at: float
    deadline: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    reply_to: Addr
    seq: int  # the requester's sequence number
    deadline: float  # forget it: an Ack later than this is no use to the requester
    nack_at: float | None  # when to Nack if no Ack came; None: not asked, or sent


class Prober:
    def __init__(
        self,
        config: GossipConfig,
        name: str,
        addr: Addr,
        *,
        lifeguard: bool,
        rng: random.Random,
        now: float,
        wall_offset: float,
        members: MemberStates,
        late: Lateness,
        awareness: Awareness,
        stats: dict[str, int],
        send: Send,
        open_stream: Callable[[StreamRequest], None],
        random_members: RandomMembers,
        suspect: Callable[[Suspect, float], None],
        left: Callable[[], bool],
    ) -> None:
        self.config, self.name, self.addr, self.lifeguard = config, name, addr, lifeguard
        self._rng = rng
        self._members, self._late, self._awareness, self.stats = members, late, awareness, stats
        self._send, self._open_stream = send, open_stream
        self._random_members, self._suspect, self._left = random_members, suspect, left
        self._seq = 0
        self._probes: dict[int, _Probe] = {}  # by seq: a patient probe may outlast a period
        self._relays: dict[int, _Relay] = {}
        self.tcp_pings: set[Addr] = set()  # fallback probes in flight, by address
        #: round trips of the probes answered, by the path their Ack took
        self.rtt = RttHistogram()
        # The rota's periods are slots of a clock the cluster shares (`now +
        # wall_offset`: Unix time in the agent); each node probes at its own phase in
        # the slot, so the probes of one period are spread over it.
        self._wall_offset = wall_offset
        # A relay nacks early enough for the nack to reach a healthy prober before its
        # period ends: 80% of the time left to it after it asked (the Lifeguard paper's
        # footnote; apple/swift-cluster-membership). memberlist nacks at probe_timeout,
        # a few ms after that deadline, so every failed probe at health 0 counted each
        # relay as silent and raised the prober's health by 3 (docs/gossip.md).
        self._nack_delay = NACK_FRACTION * min(
            config.probe_timeout, config.probe_interval - config.probe_timeout
        )
        self._probe_phase = rng.random() * config.probe_interval
        self.next_probe = (
            self._slot_time(self.slot(now) + 1) if config.probe_rota else now + self._probe_phase
        )

    def next_deadline(self) -> float:
        """When the prober next has something to do (for the core's `next_timer`)."""
        if not self._probes and not self._relays:
            return self.next_probe
        times = [self.next_probe]
        for probe in self._probes.values():
            times.append(probe.deadline)
            if not probe.indirect_sent:
                times.append(probe.indirect_at)
        for relay in self._relays.values():
            times.append(relay.deadline)
            if relay.nack_at is not None:
                times.append(relay.nack_at)
        return min(times)

    def forget_probes(self) -> None:
        """We left: our probes no longer matter."""
        self._probes.clear()

    def handle_timer(self, now: float) -> None:
        """Relays and probes due by `now` (the core runs `start_probe` when due)."""
        self._expire_relays(now)
        self._check_probes(now)

    # -- probing (SWIM §4.1/4.3, memberlist state.go probe/probeNode) ----------

    def start_probe(self, now: float) -> None:
        # LHA-Probe as the Lifeguard paper has it: the period itself stretches with our
        # health score, answered or not. memberlist keeps a 1 s ticker and stretches only
        # the probe's wait; measured, that let slow nodes accuse ~40x more (docs/gossip.md).
        period = self._awareness.scale(self.config.probe_interval)
        self._members.tick(now)  # the ring may wrap and reap
        if self.config.probe_rota:
            slot = self.slot(now)
            self.next_probe = max(
                self._slot_time(slot + self._awareness.score + 1),
                self._slot_time(math.floor(self._slot_float(now)) + 1),
            )
            name = (
                None
                if self._left()
                else self._members.rota.target(self.name, slot, self._probeable)
            )
            self._members.ring.step(self._rng)
        else:
            self.next_probe = now + period
            name = None if self._left() else self._members.ring.next(self._probeable, self._rng)
        if name is None:
            return
        target = self._members.table[name]
        seq = self._next_seq()
        messages: list[Message] = [Ping(seq=seq, target=name, source=self.name)]
        if target.state is not ALIVE and self.lifeguard:  # buddy system: let it refute now
            messages.append(Suspect(incarnation=target.incarnation, node=name, sender=self.name))
        self._send(target.addr, messages)
        late = max(self._late.own(now), self._late.given(target.lateness, target.lateness_at, now))
        self._late.pinged(seq, target.addr, now)
        self._probes[seq] = _Probe(
            seq,
            name,
            target.incarnation,
            now,
            now + self.config.probe_timeout,
            now + max(period, self.config.probe_interval + MARGIN * late),
        )
        self.stats["probes"] += 1

    def _slot_float(self, now: float) -> float:
        return (now + self._wall_offset - self._probe_phase) / self.config.probe_interval

    def slot(self, now: float) -> int:
        """The rota period our probe at `now` belongs to (rounded: a timer a little
        early or late still lands in its own slot)."""
        return round(self._slot_float(now))

    def _slot_time(self, slot: int) -> float:
        """Our `now` at which our probe of rota period `slot` is due."""
        return slot * self.config.probe_interval + self._probe_phase - self._wall_offset

    def _probeable(self, name: str) -> bool:
        member = self._members.table.get(name)
        return member is not None and name != self.name and member.state in (ALIVE, SUSPECT)

    def _check_probes(self, now: float) -> None:
        for probe in list(self._probes.values()):
            if not probe.indirect_sent and now >= probe.indirect_at:
                self._send_indirect(probe)
            if now >= probe.deadline:
                del self._probes[probe.seq]
                self._probe_failed(probe, now)
        self._late.forget_old(now)

    def _send_indirect(self, probe: _Probe) -> None:
        probe.indirect_sent = True
        target = self._members.table.get(probe.target)
        if target is None:
            return
        peers = self._random_members(
            self.config.indirect_checks,
            lambda m: m.state is ALIVE and m.name != self.name and m.name != probe.target,
        )
        for peer in peers:
            self._send(
                peer.addr,
                [
                    IndirectPing(
                        seq=probe.seq,
                        target=target.name,
                        target_addr=target.addr,
                        source=self.name,
                        nack=self.lifeguard,
                    )
                ],
            )
        probe.expected_nacks = len(peers) if self.lifeguard else 0
        self.stats["indirect_probes"] += len(peers)
        if self.config.tcp_fallback and target.addr not in self.tcp_pings:
            # memberlist state.go: a TCP ping alongside the indirect ones; its Ack
            # counts as the probe's (UDP may be what is broken, not the node).
            self.tcp_pings.add(target.addr)
            self._open_stream(
                StreamRequest(
                    target.addr, Ping(seq=probe.seq, target=target.name, source=self.name)
                )
            )
            self.stats["tcp_pings"] += 1

    def _probe_failed(self, probe: _Probe, now: float) -> None:
        if self.lifeguard:  # relays that did not even nack point at us (awareness.go)
            missed = probe.expected_nacks - probe.nacks if probe.expected_nacks else 1
            self._awareness.apply_delta(max(0, missed))
        self.stats["probe_failures"] += 1
        self._suspect(
            Suspect(incarnation=probe.incarnation, node=probe.target, sender=self.name), now
        )

    def _expire_relays(self, now: float) -> None:
        for seq, relay in list(self._relays.items()):
            if relay.nack_at is not None and now >= relay.nack_at:
                relay.nack_at = None
                self._send(relay.reply_to, [Nack(seq=relay.seq)])
            if now >= relay.deadline:
                del self._relays[seq]

    # -- probe messages ---------------------------------------------------------

    def on_ping(self, ping: Ping, source: Addr) -> None:
        if ping.target and ping.target != self.name:  # a stale address reached another node
            self.stats["misdirected_pings"] += 1
            return
        self._send(ping.source_addr or source, [Ack(seq=ping.seq)])

    def on_indirect_ping(self, req: IndirectPing, source: Addr, now: float) -> None:
        seq = self._next_seq()
        target = self._members.table.get(req.target)
        late = (
            0.0
            if target is None
            else self._late.given(  # as the prober gives it
                target.lateness, target.lateness_at, now
            )
        )
        self._relays[seq] = _Relay(
            source,
            req.seq,
            now + self.config.probe_timeout + MARGIN * late,
            now + self._nack_delay if req.nack else None,
        )
        self._send(
            req.target_addr,
            [Ping(seq=seq, target=req.target, source=self.name, source_addr=self.addr)],
        )
        self.stats["relayed_pings"] += 1

    def on_ack(self, ack: Ack, now: float, source: Addr | None) -> None:
        """An Ack: for our probe (from its target, a relay, or over TCP: `source` None),
        for one already over (measured all the same), or for a relay of ours to pass on."""
        ours = self._late.acked(ack.seq, source, now)
        probe = self._probes.pop(ack.seq, None)
        if probe is None and ours:
            self.stats["late_acks"] += 1  # the probe was answered another way, or gave up
            return
        if probe is not None:
            self.stats["acks"] += 1
            self.rtt.observe(self._path(probe, source), now - probe.sent_at)
            if self.lifeguard:
                self._awareness.apply_delta(-1)
            return
        relay = self._relays.pop(ack.seq, None)
        if relay is not None:
            self._send(relay.reply_to, [Ack(seq=relay.seq)])

    def _path(self, probe: _Probe, source: Addr | None) -> str:
        """How the Ack answering `probe` came: over TCP (no source), from the target's
        own address (direct, even after the relays were asked), or else from a relay."""
        if source is None:
            return "tcp"
        target = self._members.table.get(probe.target)
        if not probe.indirect_sent or (target is not None and source == target.addr):
            return "direct"
        return "indirect"

    def on_nack(self, nack: Nack) -> None:
        probe = self._probes.get(nack.seq)
        if probe is not None:
            probe.nacks += 1
            self.stats["nacks"] += 1

    def on_tcp_ack(self, ack: Ack, to: Addr, now: float) -> None:
        """The Ack of a TCP fallback ping: it answers the probe if that still runs."""
        self.stats["tcp_acks"] += 1
        self.tcp_pings.discard(to)
        self.on_ack(ack, now, None)

    def tcp_ping_failed(self, to: Addr) -> bool:
        """A stream to `to` failed: True if it was our TCP ping (counted here)."""
        if to not in self.tcp_pings:
            return False
        self.tcp_pings.discard(to)
        self.stats["tcp_ping_failures"] += 1
        return True

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

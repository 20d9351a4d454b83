"""SWIM + Lifeguard membership and dissemination, sans-IO (docs/gossip.md, "Core").

Theory of operation
-------------------
`Membership` is a plain object driven by three kinds of input, each given the
caller's clock `now` (aioquic's shape): API calls (`join`, `leave`,
`broadcast`), what peers sent (`handle_packet`, `handle_stream`,
`handle_stream_reply`) and `handle_timer(now)`, due at `next_timer()`. It
answers through queues the shell drains after every input: `packets_to_send`,
`streams_to_open`, `next_event`. All randomness comes from the `rng` given;
iteration is over insertion-ordered dicts and lists only, so one seed and one
input sequence give one run.

Failure detection (SWIM §4, memberlist state.go probe/probeNode). Each
protocol period — `probe_interval * (health + 1)`, Lifeguard's LHA-Probe —
the member the rota gives for that period (`rota.py`: every member probed by
exactly one node per period; or, with `probe_rota=False`, the next member of
memberlist's shuffled round-robin ring, `members.ProbeRing`) gets a Ping; a
SUSPECT target also gets the Suspect in the same packet so it can refute at
once (Lifeguard buddy system). No Ack within `probe_timeout`: ask
`indirect_checks` random alive peers with IndirectPing(nack=True); they ping
the target and relay its Ack, or answer Nack at 80% of the time the prober
has left. No Ack by the end of the period: apply the awareness delta
(missing nacks point at us, not the target) and suspect the target. The
deadline stretches by our own measured lateness and by the target's
announced one (`lateness.py`), so a probe may outlast the prober's period:
several can be in flight.

Suspicion (SWIM §4.2, Lifeguard LHA-Suspicion, `suspicion.py`): a SUSPECT
member is declared DEAD when its timer runs out; Suspects from distinct
senders shorten it from max toward min. A member told it is suspect or dead
at an incarnation >= its own refutes: incarnation = accused + 1, Alive queued.

Dissemination (SWIM §4.1, memberlist queue.go): state changes go into a
transmit-limited queue (`broadcasts.py`) and ride on every outgoing packet up
to the datagram budget; every `gossip_interval` they also go to
`gossip_nodes` random peers (dead ones too, for `gossip_to_the_dead_time`).
User payloads of the layer above travel the same way and are re-queued by
every receiver (epidemic), delivered once per payload digest.

Anti-entropy (memberlist pushPullNode/mergeState): on `join` and every
`push_pull_scale(push_pull_interval, n)` a full-state PushPull goes over TCP
to one peer; both sides merge nodes by precedence and the user state via the
`StateDelegate`. A remote DEAD is merged as a suspicion of our own (state.go).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from gossip.awareness import Awareness
from gossip.broadcasts import BroadcastQueue, RecentDigests
from gossip.codec import (
    COMPOUND_OVERHEAD,
    MAX_LATENESS_MS,
    MAX_META,
    MAX_NAME,
    MAX_PARTS,
    part_size,
)
from gossip.config import GossipConfig, push_pull_scale, retransmit_limit
from gossip.errors import ConfigError, EncodeError
from gossip.lateness import MARGIN, Lateness
from gossip.members import (
    Change,
    Event,
    MemberAlive,
    MemberFailed,
    MemberInfo,
    MemberJoined,
    MemberLeft,
    MemberStates,
    MemberSuspected,
    MemberUpdated,
    k_random_members,
)
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
    StreamRequest,
    Suspect,
    User,
)

__all__ = [  # the events are re-exported: drivers import them from here or from `gossip`
    "STAT_NAMES",
    "Event",
    "MemberAlive",
    "MemberFailed",
    "MemberInfo",
    "MemberJoined",
    "MemberLeft",
    "MemberSuspected",
    "MemberUpdated",
    "Membership",
    "StateDelegate",
]

ALIVE, SUSPECT, DEAD, LEFT = (MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD,
                              MemberState.LEFT)

STAT_NAMES = (
    "probes", "acks", "nacks", "indirect_probes", "probe_failures", "relayed_pings",
    "misdirected_pings", "suspicions", "confirmations", "refutes", "failures", "leaves",
    "joins", "rejoins", "conflicts", "user_delivered", "user_duplicates", "push_pulls",
    "push_pulls_served", "push_pull_failures", "packets", "unexpected",
    "tcp_pings", "tcp_acks", "tcp_ping_failures", "tcp_pings_served", "late_acks",
    "lateness_announcements",
)
"""Keys of `Membership.stats`, all present from the start."""


NACK_FRACTION = 0.8
"""A relay's nack delay, as a fraction of the time the prober has left after asking."""


class StateDelegate(Protocol):
    """The layer above: the agent's replicated tables (memberlist delegate.go)."""

    def local_state(self, join: bool) -> bytes:
        """Our full state for a push-pull (join: the exchange is a join)."""

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        """A peer's full state from a push-pull."""

    def notify_user(self, payload: bytes, source: str) -> None:
        """A User message arrived (once per payload); `source` = the peer that relayed it."""


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


class Membership:
    """One member's view of the cluster and its part in SWIM; see the module docstring."""

    def __init__(self, config: GossipConfig, name: str, addr: Addr, *,
                 rng: random.Random, now: float, meta: bytes = b"",
                 state: StateDelegate | None = None, lifeguard: bool = True,
                 incarnation: int = 0, wall_offset: float = 0.0) -> None:
        if not 1 <= len(name) <= MAX_NAME:
            raise ConfigError(f"name must be 1..{MAX_NAME} chars")
        if len(meta) > MAX_META or incarnation < 0:
            raise ConfigError(f"meta must be <= {MAX_META} B and incarnation >= 0")
        self.config, self.name, self.addr, self.lifeguard = config, name, addr, lifeguard
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self._rng, self._delegate, self._meta = rng, state, meta
        self._incarnation, self._left, self._seq = incarnation, False, 0
        self._members = MemberStates(config, rng, lifeguard=lifeguard)
        self._queue = BroadcastQueue(config.broadcast_queue_depth)
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._probes: dict[int, _Probe] = {}  # by seq: a patient probe may outlast a period
        self._due: float | None = None  # the last next_timer() answer (shells arm it)
        self._late = Lateness(enabled=lifeguard and config.lateness,
                              threshold=config.probe_timeout, window=config.lateness_window,
                              ttl=config.lateness_ttl)
        self._relays: dict[int, _Relay] = {}
        self._outbox: list[tuple[Addr, list[Message], bool]] = []  # (to, messages, piggyback)
        self._streams: list[StreamRequest] = []
        self._tcp_pings: set[Addr] = set()  # fallback probes in flight, by address
        self._events: deque[Event] = deque()
        self._recent_user = RecentDigests(config.recent_user_messages)
        # Stagger the periodic work inside its first interval (memberlist triggerFunc).
        # The rota's periods are slots of a clock the cluster shares (`now +
        # wall_offset`: Unix time in the agent); each node probes at its own phase in
        # the slot, so the probes of one period are spread over it.
        self._wall_offset = wall_offset
        # A relay nacks early enough for the nack to reach a healthy prober before its
        # period ends: 80% of the time left to it after it asked (the Lifeguard paper's
        # footnote; apple/swift-cluster-membership). memberlist nacks at probe_timeout,
        # a few ms after that deadline, so every failed probe at health 0 counted each
        # relay as silent and raised the prober's health by 3 (docs/gossip.md).
        self._nack_delay = NACK_FRACTION * min(config.probe_timeout,
                                               config.probe_interval - config.probe_timeout)
        self._probe_phase = rng.random() * config.probe_interval
        self._next_probe = (self._slot_time(self._slot(now) + 1) if config.probe_rota
                            else now + self._probe_phase)
        self._next_gossip = now + rng.random() * config.gossip_interval
        self._next_push_pull = (now + rng.random() * config.push_pull_interval
                                if config.push_pull_interval > 0 else math.inf)
        me = MemberInfo(name=name, addr=addr, state=ALIVE, incarnation=incarnation, meta=meta,
                        state_since=now)
        self._members.add_self(me)
        self._queue_update(name, self._alive_message(now))
        self._events.append(MemberJoined(me))

    # -- inputs ---------------------------------------------------------------

    def join(self, seeds: Sequence[Addr], now: float) -> None:
        """Push-pull (join=True) with every seed but ourselves; replies via handle_stream_reply."""
        for seed in dict.fromkeys(seeds):
            if seed != self.addr:
                self._streams.append(StreamRequest(seed, self._push_pull_state(join=True)))

    def leave(self, now: float) -> None:
        """Graceful leave: gossip Dead(node=self, sender=self); peers mark us LEFT."""
        if self._left:
            return
        self._left = True
        self._probes.clear()
        me = replace(self._members.table[self.name], state=LEFT, state_since=now)
        self._members.table.set(me)
        self._queue_update(self.name, Dead(incarnation=self._incarnation, node=self.name,
                                           sender=self.name))
        self._events.append(MemberLeft(me))
        self.stats["leaves"] += 1

    def handle_packet(self, messages: Sequence[Message], source: Addr, now: float) -> None:
        """The messages of one datagram from `source`."""
        for message in messages:
            self._dispatch(message, source, now)
        self._expire_suspicions(now)  # a confirmation may have moved a deadline into the past

    def handle_stream(self, message: PushPull | Ping, source: Addr,
                      now: float) -> PushPull | Ack | None:
        """An incoming push-pull: answer with our state as it was, then merge theirs.

        A TCP ping (memberlist's fallback probe) gets an Ack if it meant us.
        """
        if isinstance(message, Ping):
            self.stats["tcp_pings_served"] += 1
            return Ack(seq=message.seq) if message.target == self.name else None
        reply = self._push_pull_state(message.join)
        self._merge(message, now)
        self.stats["push_pulls_served"] += 1
        return reply

    def handle_stream_reply(self, message: PushPull | Ack | None, to: Addr,
                            now: float) -> None:
        """The answer to one of our StreamRequests, or None if the stream failed."""
        if isinstance(message, Ack):
            self.stats["tcp_acks"] += 1
            self._tcp_pings.discard(to)
            self._on_ack(message, now, None)  # answers the probe if it is still running
            return
        if message is None:
            if to in self._tcp_pings:
                self._tcp_pings.discard(to)
                self.stats["tcp_ping_failures"] += 1
                return
            self.stats["push_pull_failures"] += 1
            return
        self.stats["push_pulls"] += 1
        self._merge(message, now)

    def handle_timer(self, now: float) -> None:
        """Run everything due at or before `now`."""
        if self._due is not None:  # what the shell was told: how late it runs us
            self._late.timer_fired(self._due, now)
        self._expire_relays(now)
        self._check_probes(now)
        self._announce_lateness(now)
        if now >= self._next_probe:
            self._start_probe(now)
        self._expire_suspicions(now)
        if now >= self._next_gossip:
            self._next_gossip = _advance(self._next_gossip, self.config.gossip_interval, now)
            self._gossip(now)
        if now >= self._next_push_pull:
            self._push_pull(now)

    def broadcast(self, payload: bytes, key: str | None = None) -> None:
        """Disseminate a User payload; a newer one with the same key replaces the queued older."""
        message = User(payload=payload)
        size = part_size(message)
        if size + COMPOUND_OVERHEAD > self.config.packet_budget:
            raise EncodeError("oversized", f"User of {len(payload)} B does not fit a datagram")
        digest = RecentDigests.digest(payload)
        self._recent_user.add(digest)
        self._queue.push(("user", key) if key is not None else ("msg", digest), message, size)

    # -- outputs --------------------------------------------------------------

    def packets_to_send(self) -> list[Packet]:
        """Datagrams to send now; queued broadcasts are piggybacked as they are drained."""
        packets = [self._fill(to, messages, piggyback) for to, messages, piggyback in self._outbox]
        self._outbox.clear()
        self.stats["packets"] += len(packets)
        return packets

    def streams_to_open(self) -> list[StreamRequest]:
        streams, self._streams = self._streams, []
        return streams

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def next_timer(self) -> float | None:
        """Absolute time at which handle_timer is next due."""
        times = [self._next_gossip, self._next_probe, self._next_push_pull]
        for probe in self._probes.values():
            times.append(probe.deadline)
            if not probe.indirect_sent:
                times.append(probe.indirect_at)
        times.extend(r.deadline for r in self._relays.values())
        times.extend(r.nack_at for r in self._relays.values() if r.nack_at is not None)
        times.extend(s.deadline for s in self._members.suspicions.values())
        self._due = min(times)
        return self._due

    # -- views ----------------------------------------------------------------

    def members(self) -> list[MemberInfo]:
        """Every member known, ourselves included; DEAD/LEFT ones for tombstone_timeout."""
        return list(self._members.table)

    def push_pull_state(self) -> PushPull:
        """What this node would push now (the shell sizes strangers' streams by it)."""
        return self._push_pull_state(False)

    def suspicions(self, now: float) -> dict[str, tuple[float, int]]:
        """Suspected member -> (seconds left before it is declared dead, confirmations)."""
        return {name: (max(0.0, s.deadline - now), s.confirmations)
                for name, s in self._members.suspicions.items()}

    def lateness(self, now: float) -> float:
        """Seconds we answer late, as measured and announced (0: not late; lateness.py)."""
        return self._late.own(now)

    def late_members(self, now: float) -> dict[str, float]:
        """Members whose fresh announcement says they answer late: name -> seconds."""
        return {m.name: late for m in self._members.table
                if m.name != self.name
                and (late := self._late.given(m.lateness, m.lateness_at, now)) > 0}

    def health_score(self) -> int:
        """Lifeguard local health multiplier (0 = healthy)."""
        return self._awareness.score

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def left(self) -> bool:
        return self._left

    def __repr__(self) -> str:
        table = self._members.table
        alive = sum(1 for m in table if m.state is ALIVE)
        return (f"<Membership {self.name} inc={self._incarnation} alive={alive}/{len(table)} "
                f"health={self._awareness.score} queued={len(self._queue)}>")

    # -- probing (SWIM §4.1/4.3, memberlist state.go probe/probeNode) ----------

    def _start_probe(self, now: float) -> None:
        # LHA-Probe as the Lifeguard paper has it: the period itself stretches with our
        # health score, answered or not. memberlist keeps a 1 s ticker and stretches only
        # the probe's wait; measured, that let slow nodes accuse ~40x more (docs/gossip.md).
        period = self._awareness.scale(self.config.probe_interval)
        self._members.tick(now)  # the ring may wrap and reap
        if self.config.probe_rota:
            slot = self._slot(now)
            self._next_probe = max(self._slot_time(slot + self._awareness.score + 1),
                                   self._slot_time(math.floor(self._slot_float(now)) + 1))
            name = None if self._left else self._members.rota.target(
                self.name, slot, self._probeable)
            self._members.ring.step(self._rng)
        else:
            self._next_probe = now + period
            name = None if self._left else self._members.ring.next(self._probeable, self._rng)
        if name is None:
            return
        target = self._members.table[name]
        seq = self._next_seq()
        messages: list[Message] = [Ping(seq=seq, target=name, source=self.name)]
        if target.state is not ALIVE and self.lifeguard:  # buddy system: let it refute now
            messages.append(Suspect(incarnation=target.incarnation, node=name, sender=self.name))
        self._send(target.addr, messages)
        late = max(self._late.own(now),
                   self._late.given(target.lateness, target.lateness_at, now))
        self._late.pinged(seq, target.addr, now)
        self._probes[seq] = _Probe(seq, name, target.incarnation, now,
                                   now + self.config.probe_timeout,
                                   now + max(period, self.config.probe_interval + MARGIN * late))
        self.stats["probes"] += 1

    def _slot_float(self, now: float) -> float:
        return (now + self._wall_offset - self._probe_phase) / self.config.probe_interval

    def _slot(self, now: float) -> int:
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
        peers = self._random_members(self.config.indirect_checks, lambda m: (
            m.state is ALIVE and m.name != self.name and m.name != probe.target))
        for peer in peers:
            self._send(peer.addr, [IndirectPing(seq=probe.seq, target=target.name,
                                                target_addr=target.addr, source=self.name,
                                                nack=self.lifeguard)])
        probe.expected_nacks = len(peers) if self.lifeguard else 0
        self.stats["indirect_probes"] += len(peers)
        if self.config.tcp_fallback and target.addr not in self._tcp_pings:
            # memberlist state.go: a TCP ping alongside the indirect ones; its Ack
            # counts as the probe's (UDP may be what is broken, not the node).
            self._tcp_pings.add(target.addr)
            self._streams.append(StreamRequest(target.addr, Ping(
                seq=probe.seq, target=target.name, source=self.name)))
            self.stats["tcp_pings"] += 1

    def _probe_failed(self, probe: _Probe, now: float) -> None:
        if self.lifeguard:  # relays that did not even nack point at us (awareness.go)
            missed = probe.expected_nacks - probe.nacks if probe.expected_nacks else 1
            self._awareness.apply_delta(max(0, missed))
        self.stats["probe_failures"] += 1
        self._on_suspect(Suspect(incarnation=probe.incarnation, node=probe.target,
                                 sender=self.name), now)

    def _expire_relays(self, now: float) -> None:
        for seq, relay in list(self._relays.items()):
            if relay.nack_at is not None and now >= relay.nack_at:
                relay.nack_at = None
                self._send(relay.reply_to, [Nack(seq=relay.seq)])
            if now >= relay.deadline:
                del self._relays[seq]

    # -- incoming messages ----------------------------------------------------

    def _dispatch(self, message: Message, source: Addr, now: float) -> None:
        match message:
            case Ping():
                self._on_ping(message, source)
            case IndirectPing():
                self._on_indirect_ping(message, source, now)
            case Ack():
                self._on_ack(message, now, source)
            case Nack():
                self._on_nack(message)
            case Alive():
                self._on_alive(message, now)
            case Suspect():
                self._on_suspect(message, now)
            case Dead():
                self._on_dead(message, now)
            case User():
                self._on_user(message, source)
            case PushPull():
                self.stats["unexpected"] += 1  # push-pull travels on streams only

    def _on_ping(self, ping: Ping, source: Addr) -> None:
        if ping.target and ping.target != self.name:  # a stale address reached another node
            self.stats["misdirected_pings"] += 1
            return
        self._send(ping.source_addr or source, [Ack(seq=ping.seq)])

    def _on_indirect_ping(self, req: IndirectPing, source: Addr, now: float) -> None:
        seq = self._next_seq()
        target = self._members.table.get(req.target)
        late = 0.0 if target is None else self._late.given(  # as the prober gives it
            target.lateness, target.lateness_at, now)
        self._relays[seq] = _Relay(source, req.seq,
                                   now + self.config.probe_timeout + MARGIN * late,
                                   now + self._nack_delay if req.nack else None)
        self._send(req.target_addr, [Ping(seq=seq, target=req.target, source=self.name,
                                          source_addr=self.addr)])
        self.stats["relayed_pings"] += 1

    def _on_ack(self, ack: Ack, now: float, source: Addr | None) -> None:
        """An Ack: for our probe (from its target, a relay, or over TCP: `source` None),
        for one already over (measured all the same), or for a relay of ours to pass on."""
        ours = self._late.acked(ack.seq, source, now)
        probe = self._probes.pop(ack.seq, None)
        if probe is None and ours:
            self.stats["late_acks"] += 1  # the probe was answered another way, or gave up
            return
        if probe is not None:
            self.stats["acks"] += 1
            if self.lifeguard:
                self._awareness.apply_delta(-1)
            return
        relay = self._relays.pop(ack.seq, None)
        if relay is not None:
            self._send(relay.reply_to, [Ack(seq=relay.seq)])

    def _on_nack(self, nack: Nack) -> None:
        probe = self._probes.get(nack.seq)
        if probe is not None:
            probe.nacks += 1
            self.stats["nacks"] += 1

    def _on_user(self, user: User, source: Addr) -> None:
        digest = RecentDigests.digest(user.payload)
        if not self._recent_user.add(digest):
            self.stats["user_duplicates"] += 1
            return
        self.stats["user_delivered"] += 1
        if self._delegate is not None:
            name = self._members.table.name_at(source) or f"{source[0]}:{source[1]}"
            self._delegate.notify_user(user.payload, name)
        self._queue.push(("msg", digest), user, part_size(user))  # epidemic: pass it on

    # -- state changes (SWIM §4.2; the rules are members.MemberStates) --------

    def _on_alive(self, alive: Alive, now: float) -> None:
        if alive.node != self.name:
            self._accept(alive, self._members.apply_alive(alive, now))
        elif not self._left and (alive.incarnation > self._incarnation or (
                alive.incarnation == self._incarnation
                and (alive.meta, alive.addr) != (self._meta, self.addr))):
            self._refute(alive.incarnation, now)  # e.g. news of our previous life, before a restart

    def _on_suspect(self, suspect: Suspect, now: float) -> None:
        if suspect.node != self.name:
            self._accept(suspect, self._members.apply_suspect(suspect, now))
        elif not self._left and suspect.incarnation >= self._incarnation:
            self._refute(suspect.incarnation, now)

    def _on_dead(self, dead: Dead, now: float) -> None:
        if dead.node != self.name:
            self._accept(dead, self._members.apply_dead(dead, now))
        elif not self._left and dead.incarnation >= self._incarnation:
            self._refute(dead.incarnation, now)

    def _accept(self, news: Alive | Suspect | Dead, change: Change | None) -> None:
        """Re-gossip the news that changed something, and report the change."""
        if change is None:
            return
        if change.regossip:
            self._queue_update(change.member.name, news)
        if change.event is not None:
            self._events.append(change.event)
        if change.stat is not None:
            self.stats[change.stat] += 1

    def _expire_suspicions(self, now: float) -> None:
        for verdict in self._members.expired(now, self.name):
            self._on_dead(verdict, now)

    def _refute(self, accused: int, now: float) -> None:
        """Outbid the accusation (SWIM §4.2; memberlist refute): inc = max(own, accused) + 1."""
        if self.lifeguard:
            self._awareness.apply_delta(1)
        self._announce(max(self._incarnation, accused) + 1, now)
        self.stats["refutes"] += 1

    def _announce_lateness(self, now: float) -> None:
        """Tell the cluster how late we answer, unasked, when LatenessAnnouncer says so."""
        if not self._left and self._late.announce_due(now):
            self._announce(self._incarnation + 1, now)
            self.stats["lateness_announcements"] += 1

    def _announce(self, incarnation: int, now: float) -> None:
        """Gossip an Alive at `incarnation`, with our lateness as of `now`."""
        self._incarnation = incarnation
        table = self._members.table
        table.set(replace(table[self.name], incarnation=incarnation))
        self._queue_update(self.name, self._alive_message(now))

    # -- dissemination and anti-entropy ---------------------------------------

    def _gossip(self, now: float) -> None:
        if not len(self._queue):
            return
        peers = self._random_members(self.config.gossip_nodes,
                                     lambda m: self._gossipable(m, now))
        room = self.config.packet_budget - COMPOUND_OVERHEAD
        for peer in peers:
            messages = self._queue.take(room, self._retransmit_limit(), MAX_PARTS)
            if not messages:
                return
            self._outbox.append((peer.addr, messages, False))

    def _gossipable(self, member: MemberInfo, now: float) -> bool:
        if member.name == self.name or member.state is LEFT:
            return False
        return member.state is not DEAD or (
            now - member.state_since < self.config.gossip_to_the_dead_time)

    def _push_pull(self, now: float) -> None:
        self._next_push_pull = now + push_pull_scale(self.config.push_pull_interval,
                                                     len(self._members.ring))
        if self._left:
            return
        peers = self._random_members(1, lambda m: m.state is ALIVE and m.name != self.name)
        if peers:
            self._streams.append(StreamRequest(peers[0].addr, self._push_pull_state(False)))

    def _push_pull_state(self, join: bool) -> PushPull:
        nodes = tuple(NodeState(name=m.name, addr=m.addr, incarnation=m.incarnation,
                                state=m.state, meta=m.meta)
                      for m in self._members.table if m.name in self._members.ring)
        user = self._delegate.local_state(join) if self._delegate is not None else b""
        return PushPull(nodes=nodes, join=join, user_state=user)

    def _merge(self, remote: PushPull, now: float) -> None:
        """memberlist mergeState: a remote DEAD becomes our own suspicion, not a verdict."""
        for node in remote.nodes:
            if node.state is ALIVE:
                self._on_alive(Alive(incarnation=node.incarnation, node=node.name,
                                     addr=node.addr, meta=node.meta), now)
            elif node.state is LEFT:
                self._on_dead(Dead(incarnation=node.incarnation, node=node.name,
                                   sender=node.name), now)
            else:
                self._on_suspect(Suspect(incarnation=node.incarnation, node=node.name,
                                         sender=self.name), now)
        if remote.user_state and self._delegate is not None:
            self._delegate.merge_remote_state(remote.user_state, remote.join)

    # -- helpers --------------------------------------------------------------

    def _send(self, to: Addr, messages: list[Message]) -> None:
        self._outbox.append((to, messages, True))

    def _fill(self, to: Addr, messages: list[Message], piggyback: bool) -> Packet:
        if piggyback:
            messages = self._queue.piggyback(messages,
                                             self.config.packet_budget - COMPOUND_OVERHEAD,
                                             self._retransmit_limit(), MAX_PARTS)
        return Packet(to, tuple(messages))

    def _queue_update(self, node: str, message: Alive | Suspect | Dead) -> None:
        self._queue.push(("node", node), message, part_size(message))

    def _retransmit_limit(self) -> int:
        return retransmit_limit(self.config.retransmit_mult, len(self._members.ring))

    def _alive_message(self, now: float) -> Alive:
        late = min(self._late.announced(now), MAX_LATENESS_MS / 1000)
        return Alive(incarnation=self._incarnation, node=self.name, addr=self.addr,
                     meta=self._meta, lateness_ms=math.ceil(round(late * 1000, 6)))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _random_members(self, k: int,
                        accept: Callable[[MemberInfo], bool]) -> list[MemberInfo]:
        members = self._members
        return k_random_members(k, members.ring.names, members.table, accept, self._rng)


def _advance(due: float, interval: float, now: float) -> float:
    """The next tick of a fixed-rate timer; skip ticks missed while we were not called."""
    due += interval
    return due if due > now else now + interval

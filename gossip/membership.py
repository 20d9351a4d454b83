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

Parts: `Membership` holds the member table and applies state changes, joins,
leaves and push-pulls; its `Prober` (`probing.py`) does the failure
detection and its `Outbox` (`dissemination.py`) the dissemination, each
given what it works with when the core makes them.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from gossip.awareness import Awareness
from gossip.codec import (
    MAX_LATENESS_MS,
    MAX_META,
    MAX_NAME,
)
from gossip.config import GossipConfig, push_pull_scale
from gossip.dissemination import Outbox, always_min_transmits
from gossip.errors import ConfigError
from gossip.lateness import Lateness
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
from gossip.probing import Prober
from gossip.rtt import RttHistogram

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

ALIVE, SUSPECT, DEAD, LEFT = (
    MemberState.ALIVE,
    MemberState.SUSPECT,
    MemberState.DEAD,
    MemberState.LEFT,
)

STAT_NAMES = (
    "probes",
    "acks",
    "nacks",
    "indirect_probes",
    "probe_failures",
    "relayed_pings",
    "misdirected_pings",
    "suspicions",
    "suspicions_refuted",
    "suspicions_confirmed",
    "confirmations",
    "refutes",
    "failures",
    "leaves",
    "joins",
    "rejoins",
    "conflicts",
    "user_delivered",
    "user_duplicates",
    "push_pulls",
    "push_pulls_initiated",
    "push_pulls_served",
    "push_pull_failures",
    "packets",
    "unexpected",
    "tcp_pings",
    "tcp_acks",
    "tcp_ping_failures",
    "tcp_pings_served",
    "late_acks",
    "lateness_announcements",
)
"""Keys of `Membership.stats`, all present from the start."""


class StateDelegate(Protocol):
    """The layer above: the agent's replicated tables (memberlist delegate.go)."""

    def local_state(self, join: bool) -> bytes:
        """Our full state for a push-pull (join: the exchange is a join)."""

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        """A peer's full state from a push-pull."""

    def notify_user(self, payload: bytes, source: str) -> None:
        """A User message arrived (once per payload); `source` = the peer that relayed it."""


class Membership:
    """One member's view of the cluster and its part in SWIM; see the module docstring."""

    def __init__(
        self,
        config: GossipConfig,
        name: str,
        addr: Addr,
        *,
        rng: random.Random,
        now: float,
        meta: bytes = b"",
        state: StateDelegate | None = None,
        lifeguard: bool = True,
        incarnation: int = 0,
        wall_offset: float = 0.0,
        user_min_transmits: Callable[[bytes], int] = always_min_transmits,
    ) -> None:
        """`user_min_transmits`: how many times at least this node sends a User payload,
        its own or one it passes on (`gossip.dissemination.USER_MIN_TRANSMITS`)."""
        if not 1 <= len(name) <= MAX_NAME:
            raise ConfigError(f"name must be 1..{MAX_NAME} chars")
        if len(meta) > MAX_META or incarnation < 0:
            raise ConfigError(f"meta must be <= {MAX_META} B and incarnation >= 0")
        self.config, self.name, self.addr, self.lifeguard = config, name, addr, lifeguard
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self._rng, self._delegate, self._meta = rng, state, meta
        self._incarnation, self._left = incarnation, False
        self._members = MemberStates(config, rng, lifeguard=lifeguard)
        self._outbox = Outbox(config, name, self._members, self._random_members, user_min_transmits)
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._due: float | None = None  # the last next_timer() answer (shells arm it)
        self._late = Lateness(
            enabled=lifeguard and config.lateness,
            threshold=config.probe_timeout,
            window=config.lateness_window,
            ttl=config.lateness_ttl,
        )
        self._streams: list[StreamRequest] = []
        self._events: deque[Event] = deque()
        # Stagger the periodic work inside its first interval (memberlist triggerFunc):
        # the prober picks its phase first, then gossip and push-pull theirs.
        self._prober = Prober(
            config,
            name,
            addr,
            lifeguard=lifeguard,
            rng=rng,
            now=now,
            wall_offset=wall_offset,
            members=self._members,
            late=self._late,
            awareness=self._awareness,
            stats=self.stats,
            send=self._outbox.send,
            open_stream=self._open_stream,
            random_members=self._random_members,
            suspect=self._on_suspect,
            left=lambda: self._left,
        )
        self._next_gossip = now + rng.random() * config.gossip_interval
        self._last_gossip = self._next_gossip - config.gossip_interval
        #: the gossip tick's period while nothing is queued (see `next_timer`)
        self._idle_gossip = max(config.gossip_interval, config.probe_interval / 2)
        self._next_push_pull = (
            now + rng.random() * config.push_pull_interval
            if config.push_pull_interval > 0
            else math.inf
        )
        me = MemberInfo(
            name=name, addr=addr, state=ALIVE, incarnation=incarnation, meta=meta, state_since=now
        )
        self._members.add_self(me)
        self._outbox.update(name, self._alive_message(now))
        self._events.append(MemberJoined(me))

    # -- inputs ---------------------------------------------------------------

    def join(self, seeds: Sequence[Addr], now: float) -> None:
        """Push-pull (join=True) with every seed but ourselves; replies via handle_stream_reply."""
        for seed in dict.fromkeys(seeds):
            if seed != self.addr:
                self._streams.append(StreamRequest(seed, self._push_pull_state(join=True)))
                self.stats["push_pulls_initiated"] += 1

    def leave(self, now: float) -> None:
        """Graceful leave: gossip Dead(node=self, sender=self); peers mark us LEFT."""
        if self._left:
            return
        self._left = True
        self._prober.forget_probes()
        me = replace(self._members.table[self.name], state=LEFT, state_since=now)
        self._members.table.set(me)
        self._outbox.update(
            self.name, Dead(incarnation=self._incarnation, node=self.name, sender=self.name)
        )
        self._events.append(MemberLeft(me))
        self.stats["leaves"] += 1

    def handle_packet(self, messages: Sequence[Message], source: Addr, now: float) -> None:
        """The messages of one datagram from `source`."""
        for message in messages:
            self._dispatch(message, source, now)
        self._expire_suspicions(now)  # a confirmation may have moved a deadline into the past

    def handle_stream(
        self, message: PushPull | Ping, source: Addr, now: float
    ) -> PushPull | Ack | None:
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

    def handle_stream_reply(self, message: PushPull | Ack | None, to: Addr, now: float) -> None:
        """The answer to one of our StreamRequests, or None if the stream failed."""
        if isinstance(message, Ack):
            self._prober.on_tcp_ack(message, to, now)
            return
        if message is None:
            if not self._prober.tcp_ping_failed(to):
                self.stats["push_pull_failures"] += 1
            return
        self.stats["push_pulls"] += 1
        self._merge(message, now)

    def handle_timer(self, now: float) -> None:
        """Run everything due at or before `now`."""
        if self._due is not None:  # what the shell was told: how late it runs us
            self._late.timer_fired(self._due, now)
        self._prober.handle_timer(now)
        self._announce_lateness(now)
        if now >= self._prober.next_probe:
            self._prober.start_probe(now)
        self._expire_suspicions(now)
        if now >= self._next_gossip:
            self._next_gossip = _advance(self._next_gossip, self.config.gossip_interval, now)
            self._last_gossip = now
            self._outbox.gossip(now)
        if now >= self._next_push_pull:
            self._push_pull(now)

    def broadcast(self, payload: bytes, key: str | None = None) -> None:
        """Disseminate a User payload; a newer one with the same key replaces the queued older."""
        self._outbox.broadcast(payload, key)

    # -- outputs --------------------------------------------------------------

    def packets_to_send(self) -> list[Packet]:
        """Datagrams to send now; queued broadcasts are piggybacked as they are drained."""
        packets = self._outbox.packets()
        self.stats["packets"] += len(packets)
        return packets

    def streams_to_open(self) -> list[StreamRequest]:
        streams, self._streams = self._streams, []
        return streams

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def next_timer(self) -> float | None:
        """Absolute time at which handle_timer is next due."""
        gossip = self._next_gossip
        if not len(self._outbox):
            # The gossip tick sends only queued broadcasts; with none queued it only
            # senses loop stalls (its lateness feeds `Lateness`), which a slower tick
            # does as well: an idle node is not woken five times a second for nothing.
            # A broadcast queued meanwhile makes the regular slot due again.
            gossip = self._last_gossip + self._idle_gossip
            # It rides the next probe when that comes soon enough: one wake-up a probe
            # period instead of two (a wake-up of an idle asyncio loop costs ~0.3 ms of
            # CPU on a VM before any work: docs/performance.md, idle CPU).
            ride = self._prober.next_probe
            if ride <= self._last_gossip + self.config.probe_interval:
                gossip = ride
        times = [gossip, self._next_push_pull, self._prober.next_deadline()]
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

    def probe_rtt(self) -> RttHistogram:
        """Round trips of the probes answered so far, by the path their Ack took."""
        return self._prober.rtt

    def suspicions(self, now: float) -> dict[str, tuple[float, int]]:
        """Suspected member -> (seconds left before it is declared dead, confirmations)."""
        return {
            name: (max(0.0, s.deadline - now), s.confirmations)
            for name, s in self._members.suspicions.items()
        }

    def lateness(self, now: float) -> float:
        """Seconds we answer late, as measured and announced (0: not late; lateness.py)."""
        return self._late.own(now)

    def late_members(self, now: float) -> dict[str, float]:
        """Members whose fresh announcement says they answer late: name -> seconds."""
        return {
            m.name: late
            for m in self._members.table
            if m.name != self.name
            and (late := self._late.given(m.lateness, m.lateness_at, now)) > 0
        }

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
        return (
            f"<Membership {self.name} inc={self._incarnation} alive={alive}/{len(table)} "
            f"health={self._awareness.score} queued={len(self._outbox)}>"
        )

    # -- incoming messages ----------------------------------------------------

    def _dispatch(self, message: Message, source: Addr, now: float) -> None:
        match message:
            case Ping():
                self._prober.on_ping(message, source)
            case IndirectPing():
                self._prober.on_indirect_ping(message, source, now)
            case Ack():
                self._prober.on_ack(message, now, source)
            case Nack():
                self._prober.on_nack(message)
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

    def _on_user(self, user: User, source: Addr) -> None:
        digest = self._outbox.first_seen(user)
        if digest is None:
            self.stats["user_duplicates"] += 1
            return
        self.stats["user_delivered"] += 1
        if self._delegate is not None:
            name = self._members.table.name_at(source) or f"{source[0]}:{source[1]}"
            self._delegate.notify_user(user.payload, name)
        self._outbox.pass_on(user, digest)

    # -- state changes (SWIM §4.2; the rules are members.MemberStates) --------

    def _on_alive(self, alive: Alive, now: float) -> None:
        if alive.node != self.name:
            self._accept(alive, self._members.apply_alive(alive, now))
        elif not self._left and (
            alive.incarnation > self._incarnation
            or (
                alive.incarnation == self._incarnation
                and (alive.meta, alive.addr) != (self._meta, self.addr)
            )
        ):
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
            self._outbox.update(change.member.name, news)
        if change.event is not None:
            self._events.append(change.event)
        if change.stat is not None:
            self.stats[change.stat] += 1
        if change.ended_suspicion is not None:
            self.stats[f"suspicions_{change.ended_suspicion}"] += 1

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
        self._outbox.update(self.name, self._alive_message(now))

    # -- dissemination and anti-entropy ---------------------------------------

    def _push_pull(self, now: float) -> None:
        self._next_push_pull = now + push_pull_scale(
            self.config.push_pull_interval, len(self._members.ring)
        )
        if self._left:
            return
        peers = self._random_members(1, lambda m: m.state is ALIVE and m.name != self.name)
        if peers:
            self._streams.append(StreamRequest(peers[0].addr, self._push_pull_state(False)))
            self.stats["push_pulls_initiated"] += 1

    def _push_pull_state(self, join: bool) -> PushPull:
        nodes = tuple(
            NodeState(
                name=m.name, addr=m.addr, incarnation=m.incarnation, state=m.state, meta=m.meta
            )
            for m in self._members.table
            if m.name in self._members.ring
        )
        user = self._delegate.local_state(join) if self._delegate is not None else b""
        return PushPull(nodes=nodes, join=join, user_state=user)

    def _merge(self, remote: PushPull, now: float) -> None:
        """memberlist mergeState: a remote DEAD becomes our own suspicion, not a verdict."""
        for node in remote.nodes:
            if node.state is ALIVE:
                self._on_alive(
                    Alive(
                        incarnation=node.incarnation, node=node.name, addr=node.addr, meta=node.meta
                    ),
                    now,
                )
            elif node.state is LEFT:
                self._on_dead(
                    Dead(incarnation=node.incarnation, node=node.name, sender=node.name), now
                )
            else:
                self._on_suspect(
                    Suspect(incarnation=node.incarnation, node=node.name, sender=self.name), now
                )
        if remote.user_state and self._delegate is not None:
            self._delegate.merge_remote_state(remote.user_state, remote.join)

    # -- helpers --------------------------------------------------------------

    def _open_stream(self, request: StreamRequest) -> None:
        self._streams.append(request)

    def _alive_message(self, now: float) -> Alive:
        late = min(self._late.announced(now), MAX_LATENESS_MS / 1000)
        return Alive(
            incarnation=self._incarnation,
            node=self.name,
            addr=self.addr,
            meta=self._meta,
            lateness_ms=math.ceil(round(late * 1000, 6)),
        )

    def _random_members(self, k: int, accept: Callable[[MemberInfo], bool]) -> list[MemberInfo]:
        members = self._members
        return k_random_members(k, members.ring.names, members.table, accept, self._rng)


def _advance(due: float, interval: float, now: float) -> float:
    """The next tick of a fixed-rate timer; skip ticks missed while we were not called."""
    due += interval
    return due if due > now else now + interval

"""N membership cores over the simulated network, driven by one event heap.

Each `SimNode` holds a real `gossip.membership.Membership` (the agent's core,
not a model of it) and a `RecordingDelegate`. The loop is the asyncio shell's
loop with the I/O taken out: pop the next event (a packet arriving, a stream
reaching its peer, a stream's answer coming back, a node's timer, a scenario
action), feed it to the core with the virtual `now`, then collect what the
core wants done (`packets_to_send`, `streams_to_open`, `next_event`,
`next_timer`) and turn it into future events.

Timers are cancelled lazily: a node remembers the one deadline it asked for
(`timer_at`) and a popped timer entry that no longer matches is skipped.

Wire mode (`wire=True`, the default) sends every packet through
`gossip.codec` (the bytes counted are the real datagram, the 1400 B budget is
real, and the receiver decodes). `wire=False` hands the message objects over
and counts `encoded_size` plus the compound framing: the same sizes, less CPU.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gossip import codec
from gossip.config import GossipConfig
from gossip.dissemination import always_min_transmits
from gossip.errors import EncodeError
from gossip.members import (
    Event,
    MemberAlive,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberSuspected,
    MemberUpdated,
)
from gossip.membership import Membership
from gossip.messages import Ack, Addr, Packet, Ping, PushPull, StreamRequest
from gossip.sim.clock import CALL, PACKET, REPLY, STREAM, TIMER, EventQueue
from gossip.sim.metrics import Metrics
from gossip.sim.network import NetProfile, SimNetwork
from gossip.sim.node import RecordingDelegate, SimNode, node_addr
from gossip.sim.sizes import SizeCache

TIMER_SPIN_LIMIT = 10_000  # timers at one instant before we call the core stuck

EventHook = Callable[[float, SimNode, Event], None]


class SimError(RuntimeError):
    """The simulation cannot go on (a core that never lets time advance)."""


class SimCluster:
    """`size` nodes n0..n{size-1}, each alone at first (timers running) until it joins.

    `join_all` (or `join`) makes them one cluster; `crash`, `restart`, `leave`,
    `broadcast` and the `network`'s faults act on it; `run_until` / `run_for` /
    `run_until_true` advance virtual time. `metrics` watches every event.
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int,
        config: GossipConfig | None = None,
        profile: NetProfile | None = None,
        lifeguard: bool = True,
        wire: bool = True,
        trace: bool = False,
        user_min_transmits: Callable[[bytes], int] = always_min_transmits,
    ) -> None:
        self.config = config or GossipConfig.lan()
        self._user_min_transmits = user_min_transmits
        self.lifeguard = lifeguard
        self.wire = wire
        self.seed = seed
        self.queue = EventQueue()
        self._rng = random.Random(seed)
        self.network = SimNetwork(
            profile or NetProfile.lan(), random.Random(self._rng.getrandbits(64))
        )
        self.metrics = Metrics(self.is_up)
        self.stats: Counter[str] = Counter()
        self.trace: list[str] | None = [] if trace else None
        self.hooks: list[EventHook] = []
        self.user_hooks: list[Callable[[str, bytes, float], None]] = []
        self.nodes: list[SimNode] = []
        self._by_addr: dict[Addr, int] = {}
        self._by_name: dict[str, int] = {}
        self._budget = self.config.packet_budget
        self._sizes = SizeCache()
        self._spin = 0
        for index in range(size):
            node = SimNode(index, *self._new_core(index))
            self.nodes.append(node)
            self._by_addr[node.addr] = index
            self._by_name[node.name] = index
        for node in self.nodes:
            self._flush(node)

    def __repr__(self) -> str:
        up = sum(1 for n in self.nodes if n.up)
        return (
            f"<SimCluster nodes={len(self.nodes)} up={up} now={self.queue.now:.3f} "
            f"seed={self.seed} pending={len(self.queue)}>"
        )

    # -- construction ----------------------------------------------------------------

    def _new_core(self, index: int) -> tuple[Membership, RecordingDelegate]:
        name = f"n{index}"
        delegate = RecordingDelegate(name, self.queue, self._user_arrived)
        core = Membership(
            self.config,
            name,
            node_addr(index),
            rng=random.Random(self._rng.getrandbits(64)),
            now=self.queue.now,
            state=delegate,
            lifeguard=self.lifeguard,
            user_min_transmits=self._user_min_transmits,
        )
        return core, delegate

    # -- views ---------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.queue.now

    def node(self, name: str) -> SimNode:
        return self.nodes[self._by_name[name]]

    def is_up(self, name: str) -> bool:
        index = self._by_name.get(name)
        return index is not None and self.nodes[index].up

    def up_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes if n.up]

    def converged(self) -> bool:
        """Every member (up, not left) holds every other (alive or suspect) and no one else."""
        members = [n for n in self.nodes if n.up and not n.left]
        names = {n.name for n in members}
        count = len(names) - 1
        return all(len(n.known) == count and n.known <= names for n in members)

    def sent_bytes(self) -> list[int]:
        return [n.sent_bytes for n in self.nodes]

    # -- actions -------------------------------------------------------------------------

    def at(self, time: float, action: Callable[[], None]) -> None:
        """Run `action` at virtual `time` (in event order)."""
        self.queue.push(time, CALL, -1, action)

    def join(self, index: int, seeds: Sequence[int] = (0,)) -> None:
        node = self.nodes[index]
        node.core.join([self.nodes[s].addr for s in seeds if s != index], self.queue.now)
        self._flush(node)

    def join_all(self, stagger: float = 0.01, seed: int = 0) -> None:
        """Every node but `seed` joins it, one every `stagger` seconds from now."""
        start = self.queue.now
        others = [n.index for n in self.nodes if n.index != seed]
        for k, index in enumerate(others):
            self.at(start + k * stagger, functools.partial(self.join, index, (seed,)))

    def broadcast(self, index: int, payload: bytes, key: str | None = None) -> None:
        node = self.nodes[index]
        node.core.broadcast(payload, key)
        self._flush(node)

    def crash(self, index: int, *, watch: bool = True) -> None:
        """Kill the node: no more timers, sends or receives. `watch`: measure its detection."""
        node = self.nodes[index]
        if not node.up:
            return
        node.up = False
        node.timer_at = None
        self.network.crashed.add(index)
        self.metrics.observer_gone(node.name)
        if watch:
            self.metrics.crashed(node.name, self.queue.now, (n.name for n in self.nodes if n.up))

    def restart(self, index: int, seeds: Sequence[int] = (0,)) -> None:
        """A fresh process under the same name and address, joining `seeds`."""
        node = self.nodes[index]
        node.core, node.delegate = self._new_core(index)
        node.generation += 1
        node.up = True
        node.left = False
        node.timer_at = None
        node.known = set()
        self.network.crashed.discard(index)
        self.metrics.restarted(node.name)
        self.join(index, [s for s in seeds if self.nodes[s].up])

    def leave(self, index: int, linger: float = 2.0) -> None:
        """Graceful leave: the core gossips it for `linger` seconds, then the process stops."""
        node = self.nodes[index]
        node.core.leave(self.queue.now)
        node.left = True
        self._flush(node)
        self.at(self.queue.now + linger, functools.partial(self.crash, index, watch=False))

    def set_slow(self, indices: Iterable[int]) -> None:
        self.network.slow = set(indices)

    # -- running ---------------------------------------------------------------------------

    def run_until(self, time: float) -> None:
        """Process every event up to and including `time`; then the clock reads `time`."""
        self.queue.run_until(time, self._dispatch)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.queue.now + seconds)

    def run_until_true(
        self, predicate: Callable[[], bool], timeout: float, poll: float = 0.1
    ) -> bool:
        """Run until `predicate()` holds (checked every `poll` virtual seconds) or `timeout`."""
        deadline = self.queue.now + timeout
        while not predicate():
            if self.queue.now >= deadline:
                return False
            self.run_until(min(deadline, self.queue.now + poll))
        return True

    # -- the loop body -----------------------------------------------------------------------

    def _dispatch(self, entry: tuple[float, int, int, int, Any]) -> None:
        now, _, kind, index, payload = entry
        if kind == CALL:
            if self.trace is not None:
                self.trace.append(f"{now!r} call")
            payload()
            return
        node = self.nodes[index]
        if self.trace is not None:
            self.trace.append(f"{now!r} {kind} {node.name} {_describe(payload)}")
        if kind == TIMER:
            if payload != node.generation or node.timer_at != now or not node.up:
                return
            node.timer_at = None
            node.core.handle_timer(now)
        elif kind == PACKET:
            if not node.up:
                self.stats["packets_to_down"] += 1
                return
            source, data = payload
            messages = codec.decode_packet(data) if self.wire else data
            node.core.handle_packet(messages, self.nodes[source].addr, now)
        elif kind == STREAM:
            self._stream_arrived(node, now, payload)
        else:  # REPLY
            to, data, generation = payload
            if generation != node.generation or not node.up:
                return
            reply = self._stream_message(data)
            node.core.handle_stream_reply(
                reply if isinstance(reply, PushPull | Ack) else None, to, now
            )
        self._flush(node)

    def _stream_message(self, data: Any) -> PushPull | Ping | Ack | None:
        """A stream's content as the core takes it (None: failed or not a stream message)."""
        if data is None:
            return None
        message = codec.decode_stream(data) if self.wire else data
        if not isinstance(message, PushPull | Ping | Ack):
            self.stats["stream_not_push_pull"] += 1
            return None
        return message

    def _stream_arrived(self, node: SimNode, now: float, payload: Any) -> None:
        source, data, generation = payload
        opener = self.nodes[source]
        if not node.up:  # connection refused: the opener hears at once (one RTT)
            self._reply(opener, node.addr, None, generation, now + self.network.profile.delay)
            return
        request = self._stream_message(data)
        if not isinstance(request, PushPull | Ping):
            self._reply(opener, node.addr, None, generation, now + self.network.profile.delay)
            return
        answer = node.core.handle_stream(request, opener.addr, now)
        if answer is None:  # a TCP ping meant for another node: closed without a word
            self._reply(opener, node.addr, None, generation, now + self.network.profile.delay)
            return
        if self.wire:
            answer_data: Any = codec.encode_stream(answer)
            size = len(answer_data)
        else:
            answer_data, size = answer, codec.encoded_size(answer)
        node.sent_bytes += size
        self.stats["tcp_bytes"] += size
        back = self.network.stream_arrival(node.index, source, now)
        if back is None:
            self._reply(
                opener, node.addr, None, generation, now + self.network.profile.stream_timeout
            )
        else:
            self._reply(opener, node.addr, answer_data, generation, back)

    def _reply(self, opener: SimNode, peer: Addr, data: Any, generation: int, at: float) -> None:
        if data is None:
            self.stats["streams_failed"] += 1
        self.queue.push(at, REPLY, opener.index, (peer, data, generation))

    def _flush(self, node: SimNode) -> None:
        """Collect everything the core wants done after an input."""
        core = node.core
        for packet in core.packets_to_send():
            self._send(node, packet)
        for request in core.streams_to_open():
            self._open(node, request)
        event = core.next_event()
        while event is not None:
            self._on_event(node, event)
            event = core.next_event()
        if not node.up:
            return
        deadline = core.next_timer()
        queue = self.queue
        if deadline is None:
            node.timer_at = None
            return
        if deadline < queue.now:
            deadline = queue.now
        if deadline != node.timer_at:
            if deadline == queue.now:
                self._spin += 1
                if self._spin > TIMER_SPIN_LIMIT:
                    raise SimError(f"{node.name}: next_timer() stays at {queue.now!r}")
            else:
                self._spin = 0
            node.timer_at = deadline
            queue.push(deadline, TIMER, node.index, node.generation)

    def _send(self, node: SimNode, packet: Packet) -> None:
        messages = packet.messages
        stats = self.stats
        if self.metrics.watching:  # when was a crashed node first probed? (relays excluded)
            for message in messages:
                if isinstance(message, Ping) and message.source_addr is None:
                    self.metrics.probed(self.queue.now, message.target)
        if self.wire:
            try:
                data: Any = codec.encode_packet(messages, self._budget)
            except EncodeError as exc:  # a core bug: the shell would drop it the same way
                stats[f"encode_{exc.reason}"] += 1
                return
            size = len(data)
        else:
            data, size = messages, self._sizes.packet(messages)
            if size > self._budget:
                stats["encode_oversized"] += 1
                return
        node.sent_bytes += size
        stats["packets"] += 1
        stats["udp_bytes"] += size
        target = self._by_addr.get(packet.to)
        if target is None:
            stats["unknown_addr"] += 1
            return
        at = self.network.packet_arrival(node.index, target, self.queue.now)
        if at is None:
            stats["packets_lost"] += 1
            return
        self.queue.push(at, PACKET, target, (node.index, data))

    def _open(self, node: SimNode, request: StreamRequest) -> None:
        if self.wire:
            data: Any = codec.encode_stream(request.message)
            size = len(data)
        else:
            data, size = request.message, codec.encoded_size(request.message)
        node.sent_bytes += size
        self.stats["streams"] += 1
        self.stats["tcp_bytes"] += size
        now = self.queue.now
        target = self._by_addr.get(request.to)
        at = None if target is None else self.network.stream_arrival(node.index, target, now)
        if target is None or at is None:
            self._reply(
                node, request.to, None, node.generation, now + self.network.profile.stream_timeout
            )
            return
        self.queue.push(at, STREAM, target, (node.index, data, node.generation))

    def _on_event(self, node: SimNode, event: Event) -> None:
        now = self.queue.now
        member = event.member
        name = member.name
        if isinstance(event, MemberFailed):
            self.metrics.failed(now, node.name, name, member.incarnation)
            node.known.discard(name)
        elif isinstance(event, MemberSuspected):
            self.metrics.suspected(now, node.name, name, member.incarnation, event.by)
            if name != node.name:
                node.known.add(name)
        elif isinstance(event, MemberLeft):
            node.known.discard(name)
        elif isinstance(event, MemberJoined | MemberAlive | MemberUpdated) and name != node.name:
            node.known.add(name)
        for hook in self.hooks:
            hook(now, node, event)

    def _user_arrived(self, name: str, payload: bytes, at: float) -> None:
        for hook in self.user_hooks:
            hook(name, payload, at)


def _describe(payload: Any) -> str:
    """A short, deterministic rendering of an event's payload for the trace."""
    if payload is None or isinstance(payload, int):
        return str(payload)
    if isinstance(payload, tuple) and payload:
        head = payload[0]
        body = payload[1] if len(payload) > 1 else None
        if isinstance(body, bytes):
            return f"{head} {len(body)}B {body[:64].hex()}"
        return f"{head} {body!r}"[:200]
    return repr(payload)[:200]

"""Dissemination of the membership core: what rides on datagrams, sans-IO.

SWIM §4.1 and memberlist queue.go, as the `gossip.membership` docstring tells
it. `Outbox` is the part of `Membership` that sends: state changes and User
payloads wait in a transmit-limited queue (`broadcasts.py`) and are
piggybacked on every datagram up to its budget; every `gossip_interval`
they also go to `gossip_nodes` random peers (dead ones too, for
`gossip_to_the_dead_time`). A User payload is delivered once per digest and
passed on by every member that receives it (epidemic).
"""

from __future__ import annotations

from collections.abc import Callable

from gossip.broadcasts import BroadcastQueue, RecentDigests
from gossip.codec import COMPOUND_OVERHEAD, MAX_PARTS, part_size
from gossip.config import GossipConfig, retransmit_limit
from gossip.errors import EncodeError
from gossip.members import MemberInfo, MemberStates
from gossip.messages import Addr, Alive, Dead, MemberState, Message, Packet, Suspect, User

RandomMembers = Callable[[int, Callable[[MemberInfo], bool]], list[MemberInfo]]

#: The fewest times each member that holds a User payload sends it on. memberlist's
#: limit, mult * ceil(log10(n + 1)), is 4 below 10 members: a holder's 4 sends go to 3
#: random peers on one gossip tick and 1 on the next, so each misses a given peer with
#: p ~ 3/16, and all 4 holders of a 5-node cluster miss it with p ~ 0.1 %. Simulated
#: (`tests/unit/test_gossip_dissemination.py`): 26 of 1,000 runs of a network, a service
#: and two tasks left a record away from one node for 10 s and more, until a push-pull
#: (30 s on `lan`); with 6 sends 1, with 8 none. State records are few and small;
#: membership news keeps memberlist's limit (probes repair a missed one). An application
#: may give a payload less (`Membership`'s `user_min_transmits`): the agent's digest
#: announcements, repeated every 10 s and only read by `mesh doctor`, keep memberlist's 4,
#: or they would double an idle cluster's gossip.
USER_MIN_TRANSMITS = 8


def always_min_transmits(_payload: bytes) -> int:
    """Every User payload's floor: `USER_MIN_TRANSMITS`."""
    return USER_MIN_TRANSMITS


class Outbox:
    def __init__(
        self,
        config: GossipConfig,
        name: str,
        members: MemberStates,
        random_members: RandomMembers,
        user_min_transmits: Callable[[bytes], int] = always_min_transmits,
    ) -> None:
        self.config, self.name = config, name
        #: a User payload's floor of sends, by its bytes (here and where it is passed on)
        self._user_min_transmits = user_min_transmits
        self._members = members
        self._random_members = random_members
        self._queue = BroadcastQueue(config.broadcast_queue_depth)
        self._recent_user = RecentDigests(config.recent_user_messages)
        self._datagrams: list[tuple[Addr, list[Message], bool]] = []  # (to, messages, piggyback)

    def __len__(self) -> int:
        """Broadcasts queued."""
        return len(self._queue)

    def send(self, to: Addr, messages: list[Message]) -> None:
        """A datagram to `to`; queued broadcasts ride on it as room allows."""
        self._datagrams.append((to, messages, True))

    def packets(self) -> list[Packet]:
        """Datagrams to send now; queued broadcasts are piggybacked as they are drained."""
        packets = [
            self._fill(to, messages, piggyback) for to, messages, piggyback in self._datagrams
        ]
        self._datagrams.clear()
        return packets

    def broadcast(self, payload: bytes, key: str | None = None) -> None:
        """Disseminate a User payload; a newer one with the same key replaces the queued older."""
        message = User(payload=payload)
        size = part_size(message)
        if size + COMPOUND_OVERHEAD > self.config.packet_budget:
            raise EncodeError("oversized", f"User of {len(payload)} B does not fit a datagram")
        digest = RecentDigests.digest(payload)
        self._recent_user.add(digest)
        self._queue.push(
            ("user", key) if key is not None else ("msg", digest),
            message,
            size,
            self._user_min_transmits(payload),
        )

    def first_seen(self, user: User) -> bytes | None:
        """The digest of a User payload seen for the first time; None for a repeat."""
        digest = RecentDigests.digest(user.payload)
        return digest if self._recent_user.add(digest) else None

    def pass_on(self, user: User, digest: bytes) -> None:
        """Epidemic: a User payload delivered here is gossiped on."""
        floor = self._user_min_transmits(user.payload)
        self._queue.push(("msg", digest), user, part_size(user), floor)

    def update(self, node: str, message: Alive | Suspect | Dead) -> None:
        """News of `node`, replacing any queued older news of it."""
        self._queue.push(("node", node), message, part_size(message))

    def gossip(self, now: float) -> None:
        """The queued broadcasts to `gossip_nodes` random peers (the gossip tick)."""
        if not len(self._queue):
            return
        peers = self._random_members(self.config.gossip_nodes, lambda m: self._gossipable(m, now))
        room = self.config.packet_budget - COMPOUND_OVERHEAD
        for peer in peers:
            messages = self._queue.take(room, self._retransmit_limit(), MAX_PARTS)
            if not messages:
                return
            self._datagrams.append((peer.addr, messages, False))

    def _gossipable(self, member: MemberInfo, now: float) -> bool:
        if member.name == self.name or member.state is MemberState.LEFT:
            return False
        return member.state is not MemberState.DEAD or (
            now - member.state_since < self.config.gossip_to_the_dead_time
        )

    def _fill(self, to: Addr, messages: list[Message], piggyback: bool) -> Packet:
        if piggyback:
            messages = self._queue.piggyback(
                messages,
                self.config.packet_budget - COMPOUND_OVERHEAD,
                self._retransmit_limit(),
                MAX_PARTS,
            )
        return Packet(to, tuple(messages))

    def _retransmit_limit(self) -> int:
        return retransmit_limit(self.config.retransmit_mult, len(self._members.ring))

"""The gossip protocol's messages: frozen, slotted, keyword-only, numbered types.

The numbers are the wire type bytes and are append-only: a number, once
shipped, keeps its meaning forever (memberlist's rule; its numbering is kept
where the message is the same). `gossip.codec` turns these into bytes and
back; the membership core only ever sees these objects.

Addresses are `(host, port)` tuples. `incarnation` is the SWIM incarnation
number a member alone may raise (to refute a suspicion of itself).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

Addr = tuple[str, int]


class MessageType(enum.IntEnum):
    PING = 0
    INDIRECT_PING = 1
    ACK = 2
    SUSPECT = 3
    ALIVE = 4
    DEAD = 5
    PUSH_PULL = 6
    COMPOUND = 7  # codec only: several messages in one packet
    USER = 8
    NACK = 11


class MemberState(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    seq: int
    target: str  # the node the sender means to reach (a stale address gets a different node)
    source: str  # the sender's name, to learn its address from the packet
    source_addr: Addr | None = None  # set when the ping is on behalf of an indirect probe


@dataclass(frozen=True, slots=True, kw_only=True)
class IndirectPing:
    seq: int
    target: str
    target_addr: Addr
    source: str
    nack: bool = True  # Lifeguard: answer NACK if the target stays silent


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    seq: int
    payload: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class Nack:
    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Alive:
    incarnation: int
    node: str
    addr: Addr
    meta: bytes = b""
    lateness_ms: int = 0  # how late the sender answers, by its own measure (gossip/lateness.py)


@dataclass(frozen=True, slots=True, kw_only=True)
class Suspect:
    incarnation: int
    node: str
    sender: str  # who suspects: distinct senders are Lifeguard's independent confirmations


@dataclass(frozen=True, slots=True, kw_only=True)
class Dead:
    incarnation: int
    node: str
    sender: str  # sender == node: a graceful leave


@dataclass(frozen=True, slots=True, kw_only=True)
class User:
    """An opaque payload of the layer above (a state-table delta), disseminated by gossip."""

    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeState:
    name: str
    addr: Addr
    incarnation: int
    state: MemberState
    meta: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class PushPull:
    """Full state, exchanged over TCP on join and periodically (anti-entropy)."""

    nodes: tuple[NodeState, ...]
    join: bool = False
    user_state: bytes = b""  # the layer above's full state (the replicated tables)


Message = Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead | User | PushPull

TYPE_OF: dict[type, MessageType] = {
    Ping: MessageType.PING,
    IndirectPing: MessageType.INDIRECT_PING,
    Ack: MessageType.ACK,
    Nack: MessageType.NACK,
    Alive: MessageType.ALIVE,
    Suspect: MessageType.SUSPECT,
    Dead: MessageType.DEAD,
    User: MessageType.USER,
    PushPull: MessageType.PUSH_PULL,
}


@dataclass(frozen=True, slots=True)
class Packet:
    """Messages for one peer, to go out as one UDP datagram (compound if several)."""

    to: Addr
    messages: tuple[Message, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """Open a TCP stream to `to`, send `message`, and feed the reply back to the core.

    A PushPull is answered with a PushPull; a Ping (memberlist's TCP fallback
    probe) with an Ack, or nothing if the node is not the one meant.
    """

    to: Addr
    message: PushPull | Ping

"""Cluster membership and replication.

SWIM membership with the Lifeguard refinements, piggybacked dissemination,
TCP push-pull anti-entropy and keyring encryption: a sans-IO core fed packets
and an injected clock (`Membership`), one asyncio UDP/TCP transport on port
7946, and a deterministic simulator that drives the same core. The contract
between the parts is docs/gossip.md.
"""

from gossip.config import (
    GossipConfig,
    push_pull_scale,
    remaining_suspicion_time,
    retransmit_limit,
    suspicion_confirmations_wanted,
    suspicion_max_timeout,
    suspicion_min_timeout,
    suspicion_timeout,
)
from gossip.errors import (
    DECODE_REASONS,
    ConfigError,
    DecodeError,
    EncodeError,
    GossipError,
    LocalProtocolError,
    RemoteProtocolError,
)
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
from gossip.membership import Membership, StateDelegate
from gossip.messages import (
    Ack,
    Addr,
    Alive,
    Dead,
    IndirectPing,
    MemberState,
    Message,
    MessageType,
    Nack,
    NodeState,
    Packet,
    Ping,
    PushPull,
    StreamRequest,
    Suspect,
    User,
)

__all__ = [
    "DECODE_REASONS",
    "Ack",
    "Addr",
    "Alive",
    "ConfigError",
    "Dead",
    "DecodeError",
    "EncodeError",
    "Event",
    "GossipConfig",
    "GossipError",
    "IndirectPing",
    "LocalProtocolError",
    "MemberAlive",
    "MemberFailed",
    "MemberInfo",
    "MemberJoined",
    "MemberLeft",
    "MemberState",
    "MemberSuspected",
    "MemberUpdated",
    "Membership",
    "Message",
    "MessageType",
    "Nack",
    "NodeState",
    "Packet",
    "Ping",
    "PushPull",
    "RemoteProtocolError",
    "StateDelegate",
    "StreamRequest",
    "Suspect",
    "User",
    "push_pull_scale",
    "remaining_suspicion_time",
    "retransmit_limit",
    "suspicion_confirmations_wanted",
    "suspicion_max_timeout",
    "suspicion_min_timeout",
    "suspicion_timeout",
]

"""Gossip tuning: one frozen config with memberlist's knobs, and its formulas.

Every time is in seconds (a float), every size in bytes. The defaults are
memberlist's `DefaultLANConfig` (config.go at 1b4c746); `wan()` and `local()`
are the other profiles. The scaling rules are pure functions below, each
written once and referred to from the field docs, so a formula cannot drift
between a comment and the code (it did in memberlist: config.go says
`log(N+1)` while util.go computes `max(1, log10(N))`; we follow util.go).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gossip.errors import ConfigError

__all__ = [
    "GossipConfig",
    "push_pull_scale",
    "remaining_suspicion_time",
    "retransmit_limit",
    "suspicion_confirmations_wanted",
    "suspicion_max_timeout",
    "suspicion_min_timeout",
    "suspicion_timeout",
]

PUSH_PULL_SCALE_THRESHOLD = 32  # util.go pushPullScaleThreshold
MIN_UDP_BUFFER = 256  # room for a ping with its addresses and one small broadcast


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """SWIM + Lifeguard tuning. Defaults = memberlist DefaultLANConfig."""

    probe_interval: float = 1.0
    """Seconds between failure-detector probes (SWIM protocol period T), before the
    Lifeguard local-health scaling: the period used is `probe_interval * (health + 1)`."""

    probe_timeout: float = 0.5
    """Seconds to wait for a direct ack before asking `indirect_checks` peers to probe
    (SWIM ping-req). Not scaled by health (memberlist state.go). Must be < probe_interval."""

    probe_rota: bool = True
    """Pick probe targets by the rota (`gossip/rota.py`): in each period of a clock the
    nodes share, every member is probed by exactly one node, so a crash is first probed
    within two periods. False: memberlist's shuffled round-robin, where that wait is
    near-exponential (one period mean, several at the tail)."""

    indirect_checks: int = 3
    """Peers asked to probe on our behalf after a direct probe timed out (SWIM k)."""

    retransmit_mult: int = 4
    """Each broadcast is sent `retransmit_limit(retransmit_mult, n)` times =
    mult * ceil(log10(n + 1))."""

    suspicion_mult: int = 4
    """Minimum suspicion timeout = `suspicion_min_timeout(suspicion_mult, n, probe_interval)`
    = mult * max(1, log10(n)) * probe_interval; Lifeguard wants `mult - 2` confirmations."""

    suspicion_max_timeout_mult: int = 6
    """Lifeguard: a suspicion starts at max = this * min and decays toward min as
    independent confirmations arrive (`suspicion_timeout`)."""

    awareness_max_multiplier: int = 8
    """Lifeguard local health: the score ranges 0 .. this - 1, stretching the probe period
    up to this many times (8 s at LAN defaults)."""

    lateness: bool = True
    """Our extension of Lifeguard (`gossip/lateness.py`): a node measures how late it
    answers (the 75th percentile of its recent probe round trips), waits that much
    longer for its own probes and announces it in its Alive; its probers and their
    relays wait that much longer for it. A slow but alive node then neither accuses
    others nor is suspected every few seconds; one that then crashes is found that
    much later. Only with Lifeguard on."""

    lateness_window: float = 30.0
    """Seconds of probe round trips the lateness is measured over."""

    lateness_ttl: float = 60.0
    """Seconds an announced lateness is trusted; a node still late re-announces every
    half of it."""

    gossip_interval: float = 0.2
    """Seconds between gossip rounds (dissemination separate from probing, Serf's deviation)."""

    gossip_nodes: int = 3
    """Random peers each gossip round sends its queued broadcasts to (fanout)."""

    gossip_to_the_dead_time: float = 30.0
    """Seconds a dead member still receives gossip (so it may learn it is dead and refute),
    and after which it leaves the probe list and push-pull state (memberlist resetNodes)."""

    push_pull_interval: float = 30.0
    """Seconds between full-state TCP syncs with one random peer, scaled by
    `push_pull_scale(interval, n)`; 0 disables periodic push-pull (join still syncs)."""

    udp_buffer_size: int = 1400
    """Largest datagram the core builds, in bytes (memberlist UDPBufferSize)."""

    packet_overhead: int = 0
    """Bytes kept free in every datagram for the layers below the codec: the shell
    sets it when it seals packets (29 B for the AES-GCM envelope, 2 + len for a label)."""

    tcp_timeout: float = 10.0
    """Seconds the shell allows a push-pull stream to connect, send and answer."""

    tcp_fallback: bool = True
    """Probe over TCP too when the UDP ping goes unanswered (memberlist's default,
    DisableTcpPings=false): a lossy UDP path then costs no false suspicion."""

    dead_node_reclaim_time: float = 0.0
    """Seconds after which a DEAD member's name may be taken by a node at another address;
    0 = never (memberlist). A LEFT member's name may always be taken."""

    tombstone_timeout: float = 3600.0
    """Seconds a DEAD/LEFT member stays in `members()` (and blocks stale resurrection by an
    old Alive) before it is forgotten entirely. Serf keeps 24 h; one hour bounds memory."""

    broadcast_queue_depth: int = 4096
    """Most broadcasts queued at once; beyond it the most-sent, oldest are dropped
    (Serf MaxQueueDepth, memberlist TransmitLimitedQueue.Prune)."""

    recent_user_messages: int = 4096
    """How many recent User payload digests are remembered to deliver each one once."""

    def __post_init__(self) -> None:
        for name in (
            "probe_interval",
            "probe_timeout",
            "gossip_interval",
            "tcp_timeout",
            "lateness_window",
            "lateness_ttl",
        ):
            _require(getattr(self, name) > 0, f"{name} must be > 0")
        _require(
            self.probe_timeout < self.probe_interval,
            "probe_timeout must be < probe_interval (SWIM: the timeout fits in a period)",
        )
        for name in (
            "gossip_to_the_dead_time",
            "push_pull_interval",
            "dead_node_reclaim_time",
            "tombstone_timeout",
        ):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0")
        _require(
            self.tombstone_timeout >= self.gossip_to_the_dead_time,
            "tombstone_timeout must be >= gossip_to_the_dead_time",
        )
        _require(self.indirect_checks >= 0, "indirect_checks must be >= 0")
        for name in (
            "retransmit_mult",
            "suspicion_mult",
            "suspicion_max_timeout_mult",
            "awareness_max_multiplier",
            "gossip_nodes",
            "broadcast_queue_depth",
            "recent_user_messages",
        ):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")
        _require(
            MIN_UDP_BUFFER <= self.udp_buffer_size <= 65507,
            f"udp_buffer_size must be {MIN_UDP_BUFFER}..65507",
        )
        _require(
            0 <= self.packet_overhead <= self.udp_buffer_size - MIN_UDP_BUFFER,
            "packet_overhead leaves too little room in udp_buffer_size",
        )

    @property
    def packet_budget(self) -> int:
        """Bytes the codec may fill in one datagram: udp_buffer_size - packet_overhead."""
        return self.udp_buffer_size - self.packet_overhead

    @classmethod
    def lan(cls) -> GossipConfig:
        """memberlist DefaultLANConfig: 1 s / 500 ms probes, 200 ms x 3 gossip, 30 s push-pull."""
        return cls()

    @classmethod
    def wan(cls) -> GossipConfig:
        """memberlist DefaultWANConfig: LAN with slower probes and gossip, longer suspicion."""
        return cls(
            probe_interval=5.0,
            probe_timeout=3.0,
            suspicion_mult=6,
            gossip_interval=0.5,
            gossip_nodes=4,
            gossip_to_the_dead_time=60.0,
            push_pull_interval=60.0,
            tcp_timeout=30.0,
        )

    @classmethod
    def local(cls) -> GossipConfig:
        """Fast timings for tests on one host; LAN's counts (fanout, retransmits, suspicion mult).

        Not memberlist's DefaultLocalConfig (which keeps 1 s probes and lowers the
        counts): probe 200 ms / 100 ms, gossip 50 ms, push-pull 2 s, the dead gossiped
        3 s and forgotten after 60 s, TCP timeout 1 s. A crash in a 3-node cluster is
        declared within about two probe periods plus 4 x 0.2 s of suspicion (~1.2 s).
        """
        return cls(
            probe_interval=0.2,
            probe_timeout=0.1,
            gossip_interval=0.05,
            gossip_to_the_dead_time=3.0,
            push_pull_interval=2.0,
            tcp_timeout=1.0,
            tombstone_timeout=60.0,
        )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def retransmit_limit(mult: int, n: int) -> int:
    """Times a broadcast is sent: mult * ceil(log10(n + 1)) (memberlist util.go retransmitLimit)."""
    return mult * math.ceil(math.log10(n + 1))


def suspicion_min_timeout(mult: int, n: int, interval: float) -> float:
    """mult * max(1, log10(n)) * interval (memberlist util.go suspicionTimeout).

    The node scale is truncated to thousandths as memberlist does to fit a
    time.Duration, so 50 nodes at LAN defaults give 6.792 s, not 6.7959 s.
    """
    scale = max(1.0, math.log10(max(1, n)))
    return mult * math.floor(scale * 1000) / 1000 * interval


def suspicion_max_timeout(max_mult: int, min_timeout: float) -> float:
    """Lifeguard's starting suspicion timeout: max_mult * min (memberlist state.go suspectNode)."""
    return max_mult * min_timeout


def suspicion_confirmations_wanted(mult: int, n: int) -> int:
    """Lifeguard k: mult - 2 independent confirmations, or 0 when fewer than k other peers
    could confirm (n - 2 < k), so small clusters go straight to the min timeout (state.go)."""
    k = mult - 2
    return 0 if n - 2 < k else k


def suspicion_timeout(confirmations: int, k: int, min_timeout: float, max_timeout: float) -> float:
    """Total suspicion timeout after `confirmations` of `k` wanted (Lifeguard LHA-Suspicion).

    max - (max - min) * ln(C + 1) / ln(k + 1), floored to the millisecond and
    never below min; k < 1 means min from the start (memberlist suspicion.go
    newSuspicion and remainingSuspicionTime).
    """
    if k < 1:
        return min_timeout
    frac = math.log(confirmations + 1) / math.log(k + 1)
    raw = max_timeout - frac * (max_timeout - min_timeout)
    return max(min_timeout, math.floor(raw * 1000) / 1000)


def remaining_suspicion_time(
    n: int, k: int, elapsed: float, min_timeout: float, max_timeout: float
) -> float:
    """memberlist suspicion.go remainingSuspicionTime: the timeout minus time elapsed.

    Unlike newSuspicion this does not special-case k < 1 (the function is only
    called on confirmations, which need k >= 1); it may be negative (fire now).
    """
    frac = math.log(n + 1) / math.log(k + 1)
    raw = max_timeout - frac * (max_timeout - min_timeout)
    return max(min_timeout, math.floor(raw * 1000) / 1000) - elapsed


def push_pull_scale(interval: float, n: int) -> float:
    """Push-pull period: unchanged up to 32 nodes, then x (ceil(log2 n - 5) + 1) (util.go)."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return interval
    mult = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
    return mult * interval

"""The measured scenarios: dissemination, crash detection, false positives.

Each builds a `SimCluster`, brings it up (every node joins n0, staggered),
waits until membership has converged, applies its faults and measures with
`gossip.sim.metrics`. Every random choice a scenario makes (which node
broadcasts, which crashes, which are slow, when) comes from its own
`random.Random` seeded from the scenario's seed, so a result is a pure
function of its arguments.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gossip.config import GossipConfig
from gossip.sim.cluster import SimCluster
from gossip.sim.metrics import (
    SPREAD_QUANTILES,
    Crash,
    DetectionSummary,
    Metrics,
    bytes_per_node_second,
    spread,
)
from gossip.sim.network import NetProfile

JOIN_STAGGER = 0.01  # seconds between two joins while a cluster comes up


class ConvergenceError(RuntimeError):
    """The cluster did not converge in time: nothing after it would mean anything."""


def bring_up(
    cluster: SimCluster, *, stagger: float = JOIN_STAGGER, timeout: float = 300.0
) -> float:
    """Every node joins n0; run until membership converged. Returns the virtual time taken."""
    start = cluster.now
    cluster.join_all(stagger)
    cluster.run_for(stagger * len(cluster.nodes))
    if not cluster.run_until_true(cluster.converged, timeout, poll=0.5):
        raise ConvergenceError(f"{cluster!r}: not converged after {timeout:g} s")
    return cluster.now - start


# -- dissemination -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spread:
    """One user broadcast: from whom, and the time until each fraction of live nodes has it."""

    origin: str
    times: dict[float, float | None]


@dataclass(frozen=True, slots=True)
class DisseminationResult:
    nodes: int
    loss: float
    spreads: tuple[Spread, ...]
    bytes_per_node_s: float
    converge_s: float

    def times(self, q: float) -> list[float | None]:
        return [s.times[q] for s in self.spreads]


def dissemination(
    nodes: int,
    losses: Sequence[float],
    *,
    broadcasts: int = 5,
    seed: int = 1,
    wait: float = 30.0,
    settle: float = 1.0,
    wire: bool = True,
    config: GossipConfig | None = None,
) -> list[DisseminationResult]:
    """Converge `nodes` at 0% loss, then per loss level time `broadcasts` user broadcasts.

    Each broadcast starts from a random live node once the previous one has
    reached everyone (or `wait` passed), plus `settle` seconds for most of its
    retransmissions to go out (a fresh broadcast goes first in every packet
    anyway: the queue sends the least-sent first).
    """
    rng = random.Random(f"dissemination/{seed}")
    cluster = SimCluster(nodes, seed=seed, config=config, profile=NetProfile.lan(), wire=wire)
    converge_s = bring_up(cluster)
    got: Counter[bytes] = Counter()
    cluster.user_hooks.append(lambda _name, payload, _at: got.update((payload,)))
    results = []
    for loss in losses:
        cluster.network.loss = loss
        before, start_all = cluster.sent_bytes(), cluster.now
        spreads = []
        for k in range(broadcasts):
            origin = rng.choice(cluster.up_nodes())
            payload = f"update {loss:g}/{k} from {origin.name}".encode()
            start = cluster.now
            cluster.broadcast(origin.index, payload)
            live = [n.name for n in cluster.up_nodes()]
            cluster.run_until_true(_reached(got, payload, len(live) - 1), wait, poll=0.05)
            arrivals = {
                n.name: t
                for n in cluster.up_nodes()
                if (t := n.delegate.received.get(payload)) is not None
            }
            spreads.append(Spread(origin.name, spread(arrivals, origin.name, start, live)))
            cluster.run_for(settle)
        rate = bytes_per_node_second(cluster.sent_bytes(), before, cluster.now - start_all)
        results.append(DisseminationResult(nodes, loss, tuple(spreads), rate, converge_s))
    return results


def _reached(got: Counter[bytes], payload: bytes, count: int) -> Callable[[], bool]:
    return lambda: got[payload] >= count


# -- crash detection ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DetectionResult:
    nodes: int
    loss: float
    summary: DetectionSummary
    false_deaths: int
    rejoin_failures: int
    bytes_per_node_s: float


def _known_everywhere(crash: Crash) -> Callable[[], bool]:
    return lambda: crash.complete


def detection(
    nodes: int,
    crashes: int,
    *,
    loss: float = 0.01,
    seed: int = 1,
    wait: float = 60.0,
    rejoin_wait: float = 120.0,
    wire: bool = True,
    config: GossipConfig | None = None,
) -> DetectionResult:
    """Crash one node at a time; wait until every other node marks it failed (or `wait`),
    restart it under the same name and address, wait until it is known alive everywhere
    again, repeat. Victims are distinct (never n0, the rejoin seed); each crash comes at a
    random phase of the probe period."""
    rng = random.Random(f"detection/{seed}")
    cluster = SimCluster(nodes, seed=seed, config=config, profile=NetProfile.lan(loss), wire=wire)
    bring_up(cluster)
    cluster.metrics = Metrics(cluster.is_up)
    victims = rng.sample(range(1, nodes), min(crashes, nodes - 1))
    before, start = cluster.sent_bytes(), cluster.now
    rejoin_failures = 0
    for victim in victims:
        cluster.run_for(rng.uniform(0.0, 1.0))
        cluster.crash(victim)
        crash = cluster.metrics.crashes[-1]
        cluster.run_until_true(_known_everywhere(crash), wait, poll=0.1)
        cluster.restart(victim, seeds=(0,))
        if not cluster.run_until_true(cluster.converged, rejoin_wait, poll=0.5):
            rejoin_failures += 1
    rate = bytes_per_node_second(cluster.sent_bytes(), before, cluster.now - start)
    return DetectionResult(
        nodes,
        loss,
        cluster.metrics.detection(),
        len(cluster.metrics.false_deaths),
        rejoin_failures,
        rate,
    )


# -- false positives ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FalsePositiveResult:
    nodes: int
    loss: float
    slow: tuple[str, ...]
    lifeguard: bool
    seconds: float
    false_deaths: int
    false_suspicions: int
    of_slow: int  # suspicions whose suspect is a slow node
    by_slow: int  # suspicions of a healthy node first raised by a slow node
    among_healthy: int  # a healthy node suspected by a healthy node (loss alone)
    deaths_of_slow: int  # false deaths whose victim is a slow node
    bytes_per_node_s: float
    core_stats: dict[str, int] = field(default_factory=dict)


def false_positives(
    nodes: int,
    *,
    loss: float = 0.10,
    slow_fraction: float = 0.05,
    seconds: float = 600.0,
    lifeguard: bool = True,
    seed: int = 1,
    wire: bool = True,
    config: GossipConfig | None = None,
) -> FalsePositiveResult:
    """Converge at 0% loss, then run `seconds` with `loss` on every link and a fraction of
    nodes slow (receive path 0.5-2.5 s late). Nothing crashes: every death and every
    suspicion counted is false."""
    rng = random.Random(f"false/{seed}")
    cluster = SimCluster(
        nodes, seed=seed, config=config, profile=NetProfile.lan(), lifeguard=lifeguard, wire=wire
    )
    bring_up(cluster)
    slow = sorted(rng.sample(range(nodes), round(nodes * slow_fraction)))
    cluster.network.loss = loss
    cluster.set_slow(slow)
    cluster.metrics = Metrics(cluster.is_up)
    before, start = cluster.sent_bytes(), cluster.now
    cluster.run_for(seconds)
    slow_names = {cluster.nodes[i].name for i in slow}
    suspicions = cluster.metrics.false_suspicions.values()
    stats: Counter[str] = Counter()
    for node in cluster.nodes:
        stats.update(node.core.stats)
    return FalsePositiveResult(
        nodes,
        loss,
        tuple(sorted(slow_names)),
        lifeguard,
        seconds,
        len(cluster.metrics.false_deaths),
        len(suspicions),
        sum(1 for s in suspicions if s.member in slow_names),
        sum(1 for s in suspicions if s.member not in slow_names and s.by in slow_names),
        sum(1 for s in suspicions if s.member not in slow_names and s.by not in slow_names),
        sum(1 for member, _ in cluster.metrics.false_deaths if member in slow_names),
        bytes_per_node_second(cluster.sent_bytes(), before, cluster.now - start),
        dict(stats),
    )


__all__ = [
    "SPREAD_QUANTILES",
    "ConvergenceError",
    "DetectionResult",
    "DisseminationResult",
    "FalsePositiveResult",
    "Spread",
    "bring_up",
    "detection",
    "dissemination",
    "false_positives",
]

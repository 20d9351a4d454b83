"""The probe rota (gossip/rota.py) alone, then inside the simulated cluster.

The rota's promises: in one period every member is probed by exactly one
other, over M - 1 periods each member probes every other once, every node
holding the same members computes the same order, and a target the caller
will not probe is passed over for the next one.
"""

from __future__ import annotations

import dataclasses
import random

from hypothesis import given
from hypothesis import strategies as st

from gossip.config import GossipConfig
from gossip.rota import ProbeRota
from gossip.sim import NetProfile, SimCluster
from gossip.sim.scenarios import bring_up


def rota_of(names: list[str]) -> ProbeRota:
    rota = ProbeRota()
    for name in names:
        rota.set(name, True)
    return rota


def take_all(_: str) -> bool:
    return True


@given(st.integers(min_value=2, max_value=40), st.integers(min_value=0, max_value=10**9))
def test_each_period_is_a_permutation_without_fixed_points(size: int, period: int) -> None:
    names = [f"n{i}" for i in range(size)]
    rota = rota_of(names)
    targets = [rota.target(name, period, take_all) for name in names]
    assert sorted(t for t in targets if t is not None) == sorted(names)
    assert all(t != name for name, t in zip(names, targets, strict=True))


def test_over_m_minus_one_periods_each_node_probes_everyone_else_once() -> None:
    names = [f"node-{i}" for i in range(17)]
    rota = rota_of(names)
    for name in names:
        seen = [rota.target(name, 1_000 + p, take_all) for p in range(len(names) - 1)]
        assert sorted(t for t in seen if t is not None) == sorted(set(names) - {name})


def test_the_order_depends_on_the_names_only() -> None:
    names = [f"host{i}.example" for i in range(30)]
    shuffled = names[:]
    random.Random(7).shuffle(shuffled)
    a, b = rota_of(names), rota_of(shuffled)
    assert a.order() == b.order()
    assert a.order() != sorted(names)  # hashed: neighbours by name are not neighbours here
    b.set("host3.example", False)
    b.set("host3.example", True)
    assert a.order() == b.order()


def test_a_member_the_caller_skips_passes_the_turn_on() -> None:
    names = [f"n{i}" for i in range(6)]
    rota = rota_of(names)
    planned = rota.target("n0", 3, take_all)
    assert planned is not None
    other = rota.target("n0", 3, lambda name: name != planned)
    assert other not in (None, planned, "n0")
    assert rota.target("n0", 3, lambda name: False) is None


def test_alone_or_absent_probes_no_one() -> None:
    assert rota_of(["solo"]).target("solo", 5, take_all) is None
    assert rota_of(["a", "b"]).target("stranger", 5, take_all) is None
    rota = rota_of(["a", "b", "c"])
    rota.set("b", False)
    assert len(rota) == 2 and "b" not in rota
    assert rota.target("a", 0, take_all) == "c"


def test_in_the_cluster_nodes_due_in_one_period_probe_distinct_members() -> None:
    cluster = SimCluster(30, seed=4, profile=NetProfile.lan(0.0))
    bring_up(cluster)
    cluster.run_for(5.3)
    by_slot: dict[int, list[str | None]] = {}
    for node in cluster.nodes:  # each node's next probe: which rota period, which target
        core = node.core
        slot = core._prober.slot(core._prober.next_probe)
        target = core._members.rota.target(core.name, slot, core._prober._probeable)
        by_slot.setdefault(slot, []).append(target)
    assert 1 <= len(by_slot) <= 2  # "now" falls inside a period: some are due in the next
    for targets in by_slot.values():
        assert None not in targets and len(set(targets)) == len(targets)


def crash_waits(config: GossipConfig, crashes: int = 30, seed: int = 2) -> list[float]:
    """Crash -> first probe of the crashed node, at 0% loss, one crash at a time."""
    cluster = SimCluster(40, seed=seed, config=config, profile=NetProfile.lan(0.0))
    bring_up(cluster)
    rng = random.Random(seed)
    waits = []
    for victim in rng.sample(range(1, 40), crashes):
        cluster.run_for(rng.uniform(0.0, 1.0))
        cluster.crash(victim)
        crash = cluster.metrics.crashes[-1]
        assert cluster.run_until_true(lambda c=crash: c.complete, 60.0)  # type: ignore[misc]
        assert crash.first_probed is not None
        waits.append(crash.first_probed - crash.at)
        cluster.restart(victim, seeds=(0,))
        assert cluster.run_until_true(cluster.converged, 60.0)
    return waits


def test_with_the_rota_a_crashed_node_is_probed_within_two_periods() -> None:
    # The first probe of slot r comes at the prober's phase in it, or, if that passed
    # already, in slot r + 1: under two periods while every prober is at health 0
    # (no loss, and relays' nacks reach a prober before its deadline).
    waits = crash_waits(GossipConfig.lan())
    assert max(waits) < 2.0, waits
    # memberlist's shuffled ring, same seed and crashes: the wait is near-exponential
    # with a one-period mean, so 30 crashes see a longer one.
    ring = crash_waits(dataclasses.replace(GossipConfig.lan(), probe_rota=False))
    assert max(ring) > 2.0, ring


def test_probing_a_crashed_node_costs_its_probers_no_health() -> None:
    # Every relay nacks before the prober's deadline (80% of the time it has left), so
    # failing to reach a node that really is down is not held against the prober. With
    # memberlist's timing the nacks came a few ms late and each prober took +3, then
    # skipped its next rota periods.
    cluster = SimCluster(20, seed=5, profile=NetProfile.lan(0.0))
    bring_up(cluster)
    cluster.crash(7)
    crash = cluster.metrics.crashes[-1]
    assert cluster.run_until_true(lambda: crash.complete, 60.0)
    probers = [n.core for n in cluster.up_nodes() if n.core.stats["probe_failures"]]
    assert probers  # it was probed, and those probes failed
    assert sum(c.stats["nacks"] for c in probers) >= 2 * len(probers)
    assert [c.health_score() for c in probers] == [0] * len(probers)

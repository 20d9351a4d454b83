"""The cluster under faults, end to end: DNS, a crashed agent, a partition, loss, a rolling restart.

Four nodes, lan gossip timings. Each test prints its figure (seconds to
converge, answers lost) for the closing note. Names resolve through `dig` at
each node's embedded DNS and through glibc's resolver inside the nodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.e2e.conftest import (
    UPSTREAM_ADDRESS,
    UPSTREAM_NAME,
    MeshCluster,
    secs,
    start_cluster,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

NODES = 4
#: The gossip issue's bound from a crash to every view dropping the node's tasks (lan).
DETECTION_BOUND = 15.0
#: lan push-pull interval (30 s for a cluster this size) plus the failed-member reconnect.
HEAL_BOUND = 35.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[MeshCluster]:
    yield from start_cluster(NODES, "userspace")


@pytest.fixture(scope="module")
def web(cluster: MeshCluster) -> dict[int, str]:
    """Service `web` with one real task per node: node index -> task address."""
    cluster.mesh(1, "network", "create", "front")
    cluster.mesh(1, "service", "create", "web", "--network", "front")
    for node in range(1, NODES + 1):
        cluster.task(node, "web", 8000 + node)
    every = sorted(cluster.address(i) for i in range(1, NODES + 1))
    assert (
        wait_for(lambda: all(cluster.dig(i, "tasks.web") == every for i in range(1, NODES + 1)), 20)
        is not None
    )
    return {i: cluster.address(i) for i in range(1, NODES + 1)}


def test_system_resolver_in_task_namespaces(cluster: MeshCluster, web: dict[int, str]) -> None:
    vip = cluster.mesh(2, "service", "inspect", "web")["vips"][0]["address"]
    for node in range(1, NODES + 1):
        hosts = cluster.run(node, ["getent", "ahostsv4", "web"]).split()
        assert hosts[0] == vip
        tasks = set(cluster.run(node, ["getent", "ahostsv4", "tasks.web"]).split())
        assert set(web.values()) <= tasks
        upstream = cluster.run(node, ["getent", "hosts", UPSTREAM_NAME]).split()
        assert upstream[:1] == [UPSTREAM_ADDRESS]


def test_killed_agent_tasks_leave_every_view_and_return(
    cluster: MeshCluster, web: dict[int, str]
) -> None:
    victim, others = 4, [1, 2, 3]
    cluster.stop(victim, kill=True)
    try:
        gone = wait_for(
            lambda: all(web[victim] not in cluster.dig(i, "tasks.web") for i in others),
            30,
            step=0.2,
        )
        print(f"\nkill -9 n{victim}: its task left DNS on every other node in {secs(gone)}")
        assert gone is not None and gone <= DETECTION_BOUND
    finally:
        cluster.start(victim)
    back = wait_for(
        lambda: all(web[victim] in cluster.dig(i, "tasks.web") for i in others), 30, step=0.2
    )
    print(f"restart n{victim}: its task was back everywhere in {secs(back)}")
    assert back is not None


def test_partition_each_side_serves_then_heals(cluster: MeshCluster, web: dict[int, str]) -> None:
    side_a, side_b = [1, 2], [3, 4]
    cluster.partition(side_a, side_b)
    try:

        def split() -> bool:
            return all(
                cluster.dig(i, "tasks.web") == sorted(web[j] for j in side_a) for i in side_a
            ) and all(cluster.dig(i, "tasks.web") == sorted(web[j] for j in side_b) for i in side_b)

        seen = wait_for(split, 40, step=0.5)
        print(
            f"\npartition {side_a}|{side_b}: each side served only its own tasks after {secs(seen)}"
        )
        assert seen is not None
        # A registration on one side while split must reach the other after healing.
        cluster.mesh(3, "service", "create", "api", "--network", "front")
    finally:
        cluster.heal()
    every = sorted(web.values())

    def one_view() -> bool:
        return all(
            cluster.dig(i, "tasks.web") == every
            and cluster.dig(i, "api") != []
            and set(cluster.members(i).values()) == {"alive"}
            for i in range(1, NODES + 1)
        )

    healed = wait_for(one_view, 60, step=0.5)
    print(f"healed: one view on every node after {secs(healed)} (bound {HEAL_BOUND} s)")
    assert healed is not None and healed <= HEAL_BOUND


#: how long the 20 % loss lasts: about 40 probe rounds per node at the lan profile's 1 s
#: period (120 s, then 60 s before: CI's 20-minute budget is the reason for the shorter
#: run; what it holds, nobody declared dead, needs a suspicion to outlast the verdict,
#: 5 s, and the 10 % soak after it holds the false removals to 0)
LOSS_SECONDS = 40
#: ... and the 10 % loss of issue 19's goal (0 false removals in a 10 %-loss soak)
TEN_PERCENT_SECONDS = 30


@dataclass
class UnderLoss:
    """What the cluster did during a spell of random loss on every node's underlay."""

    deaths: list[str] = field(default_factory=list)
    #: seconds until each registration made during the loss was answered on every node
    spread: list[float | None] = field(default_factory=list)
    suspicions: int = 0
    #: times a node hid a suspect node's reals (lb/failover.py) that was alive: false
    false_removals: int = 0
    longest_refuted: float = 0.0

    def line(self, percent: int, seconds: int) -> str:
        return (
            f"{percent}% loss for {seconds} s: {len(self.deaths)} dead sightings; "
            f"{len(self.spread)} registrations reached every node in "
            f"{', '.join(secs(t) for t in self.spread) or '-'}; suspicions {self.suspicions}, "
            f"suspect nodes taken out of an L4 table (false removals) {self.false_removals}; "
            f"the longest refuted suspicion since the agents started {self.longest_refuted:.2f} s"
        )


def under_loss(cluster: MeshCluster, percent: int, seconds: int, registrations: int) -> UnderLoss:
    """`percent`% loss for `seconds`, watching every node's view once a second and making
    `registrations` services spread over the spell; healed on the way out."""
    import time

    def failover_and_suspicions() -> tuple[int, int, float]:
        """Hidings of suspect nodes by the L4 driver (lb/failover.py) and suspicions, summed."""
        failover = [cluster.api(i, "/v1/lb")["failover"] for i in range(1, NODES + 1)]
        suspicions = sum(
            int(cluster.api(i, "/v1/gossip")["counts"].get("suspicions", 0))
            for i in range(1, NODES + 1)
        )
        hidden = sum(f["nodes_hidden"] for f in failover)
        return hidden, suspicions, max(f["refuted_longest"] for f in failover)

    def settled() -> bool:  # no suspicion left over from before (the 20 % run's)
        return all(
            cluster.api(i, "/v1/lb")["failover"]["suspects"] == 0
            and set(cluster.members(i).values()) == {"alive"}
            for i in range(1, NODES + 1)
        )

    assert wait_for(settled, 30, step=0.5) is not None, "the cluster did not settle"
    seen = UnderLoss()
    hidden_before, suspicions_before, _ = failover_and_suspicions()
    cluster.lossy(percent)
    try:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            for node in range(1, NODES + 1):
                seen.deaths += [
                    f"n{node} saw {name} dead"
                    for name, status in cluster.members(node).items()
                    if status == "dead"
                ]
            made = len(seen.spread)
            if made < registrations and time.monotonic() - started > seconds / (
                registrations + 1
            ) * (made + 1):
                name = f"lossy{percent}x{made + 1}"
                cluster.mesh(made + 1, "service", "create", name, "--network", "front")
                seen.spread.append(
                    wait_for(
                        lambda n=name: all(  # type: ignore[misc]
                            cluster.dig(i, n) != [] for i in range(1, NODES + 1)
                        ),
                        30,
                        step=0.2,
                    )
                )
            time.sleep(1)
        hidden_after, suspicions_after, seen.longest_refuted = failover_and_suspicions()
    finally:
        cluster.heal()
    seen.false_removals = hidden_after - hidden_before
    seen.suspicions = suspicions_after - suspicions_before
    return seen


def test_twenty_percent_loss_declares_nobody_dead(
    cluster: MeshCluster, web: dict[int, str]
) -> None:
    """Nobody dead, and registrations still spread. The false removals are printed, not
    held to 0: issue 19's goal for them is a 10 % loss (the next test); at 20 % a
    refutation has once taken 3.8 s (a CI run, 3 false removals of one node), beyond
    any hold short of the verdict itself."""
    seen = under_loss(cluster, 20, LOSS_SECONDS, registrations=3)
    print("\n" + seen.line(20, LOSS_SECONDS))
    assert seen.deaths == []
    assert None not in seen.spread


def test_ten_percent_loss_takes_no_live_node_out_of_the_l4_tables(
    cluster: MeshCluster, web: dict[int, str]
) -> None:
    """Issue 19's goal: no false removal (a live node's reals hidden as a suspect's) in a
    10 % loss soak, nor anyone declared dead."""
    seen = under_loss(cluster, 10, TEN_PERCENT_SECONDS, registrations=0)
    print("\n" + seen.line(10, TEN_PERCENT_SECONDS))
    assert seen.deaths == []
    assert seen.false_removals == 0


def test_rolling_restart_keeps_every_service(cluster: MeshCluster, web: dict[int, str]) -> None:
    """Also a rolling upgrade: each node's data dir is made what an agent from before
    data dir versioning left (no format-version file) while it is down, and the restarted
    agent migrates it to version 1 with its state kept."""
    missing: list[str] = []
    for node in range(1, NODES + 1):
        cluster.stop(node)
        data_dir = cluster.layout.state_dir / f"n{node}"
        (data_dir / "format-version").unlink()
        cluster.start(node)
        assert (data_dir / "format-version").read_text() == "1\n"
        log = (cluster.layout.state_dir / f"n{node}.log").read_text()
        assert "event=data_dir_migrated source=0 to=1" in log, f"n{node} did not migrate"
        for other in range(1, NODES + 1):
            if cluster.dig(other, "web") == []:
                missing.append(f"web missing on n{other} after restarting n{node}")
        back = wait_for(lambda n=node: set(cluster.members(n).values()) == {"alive"}, 30)  # type: ignore[misc]
        assert back is not None, f"n{node} did not rejoin"
    every = sorted(web.values())
    settled = wait_for(
        lambda: all(cluster.dig(i, "tasks.web") == every for i in range(1, NODES + 1)), 30, step=0.5
    )
    print(
        f"\nrolling restart of {NODES} agents: {len(missing)} lookups missed the service; "
        f"every task everywhere {secs(settled)} after the last restart"
    )
    assert missing == []
    assert settled is not None

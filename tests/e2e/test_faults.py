"""The cluster under faults, end to end: DNS, a crashed agent, a partition, loss, a rolling restart.

Four nodes, lan gossip timings. Each test prints its figure (seconds to
converge, answers lost) for the closing note. Names resolve through `dig` at
each node's embedded DNS and through glibc's resolver inside the nodes.
"""

from __future__ import annotations

from collections.abc import Iterator

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


#: how long the 20 % loss lasts: about 60 probe rounds per node at the lan profile's 1 s
#: period (120 s before: CI's 20-minute budget is the reason for the shorter run)
LOSS_SECONDS = 60


def test_twenty_percent_loss_declares_nobody_dead(
    cluster: MeshCluster, web: dict[int, str]
) -> None:
    import time

    def failover_and_suspicions() -> tuple[int, int]:
        """Hidings of suspect nodes by the L4 driver (lb/failover.py) and suspicions, summed."""
        failover = [cluster.api(i, "/v1/lb")["failover"] for i in range(1, NODES + 1)]
        longest.append(max(f["refuted_longest"] for f in failover))
        hidden = sum(f["nodes_hidden"] for f in failover)
        suspicions = sum(
            int(cluster.api(i, "/v1/gossip")["counts"].get("suspicions", 0))
            for i in range(1, NODES + 1)
        )
        return hidden, suspicions

    longest: list[float] = []
    hidden_before, suspicions_before = failover_and_suspicions()
    cluster.lossy(20)
    deaths: list[str] = []
    spread: list[float | None] = []
    try:
        started = time.monotonic()
        while time.monotonic() - started < LOSS_SECONDS:
            for node in range(1, NODES + 1):
                deaths += [
                    f"n{node} saw {name} dead"
                    for name, status in cluster.members(node).items()
                    if status == "dead"
                ]
            if len(spread) < 3 and time.monotonic() - started > LOSS_SECONDS / 4 * (
                len(spread) + 1
            ):
                name = f"lossy{len(spread) + 1}"
                cluster.mesh(len(spread) + 1, "service", "create", name, "--network", "front")
                spread.append(
                    wait_for(
                        lambda n=name: all(  # type: ignore[misc]
                            cluster.dig(i, n) != [] for i in range(1, NODES + 1)
                        ),
                        30,
                        step=0.2,
                    )
                )
            time.sleep(1)
        hidden_after, suspicions_after = failover_and_suspicions()
    finally:
        cluster.heal()
    false_removals = hidden_after - hidden_before
    print(
        f"\n20% loss for {LOSS_SECONDS} s: {len(deaths)} dead sightings; 3 registrations reached "
        f"every node in {', '.join(secs(t) for t in spread)}; suspicions "
        f"{suspicions_after - suspicions_before}, suspect nodes taken out of an L4 table "
        f"(false removals) {false_removals}; the longest refuted suspicion {longest[-1]:.2f} s"
    )
    assert deaths == []
    assert false_removals == 0
    assert None not in spread


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

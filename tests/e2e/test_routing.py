"""The routing mesh end to end: a client outside the cluster, published ports on every node.

Three nodes, `--lb auto` (nftables here: root in a namespace, no ip_vs), one
real HTTP task per node. The client connects to each node's address: every
node answers and spreads over the tasks of all nodes. Then the HTTP routing
mesh by Host, and a crash of one agent under load.

Every test runs twice: with the agents as root, and as deploy/meshplane.service
runs them, a non-root user (nobody) holding only CAP_NET_ADMIN and
CAP_NET_BIND_SERVICE (`setpriv`, ambient capabilities, no new privileges), its data
dir its own: the same nftables backend, DNS on :53 and the HRM on :80.
"""

from __future__ import annotations

import collections
import concurrent.futures
import http.client
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import MeshCluster, harness, secs, start_cluster, wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

NODES = 3
PUBLISHED = 8080
HOST = "web.example"


#: the user the unprivileged variant runs its agents as (nobody)
SERVICE_USER = harness.RunAs(65534, 65534, harness.UNIT_CAPS)


@pytest.fixture(scope="module", params=["root", "service-user"])
def cluster(request: pytest.FixtureRequest) -> Iterator[MeshCluster]:
    yield from start_cluster(NODES, "auto", SERVICE_USER if request.param != "root" else None)


def test_agents_run_as_the_user_they_were_given(cluster: MeshCluster) -> None:
    """Each agent runs as that user with exactly those capabilities, and its kernel LB
    is the one root gets (auto: nftables here), not a userspace fallback."""
    for node in range(1, NODES + 1):
        pid = cluster.state["nodes"][node - 1]["pid"]
        status = dict(
            line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        uid = int(status["Uid"].split()[0])
        eff = int(status["CapEff"], 16)
        info = cluster.api(node, "/v1/agent")
        print(
            f"\nn{node}: uid {uid}, CapEff {eff:#x}, lb {cluster.api(node, '/v1/lb')['backend']}, "
            f"missing {info['capabilities']['missing']}"
        )
        if cluster.run_as is None:
            assert uid == 0
            assert info["capabilities"]["missing"] == []
        else:
            assert uid == cluster.run_as.uid
            assert eff == (1 << 10 | 1 << 12), f"{eff:#x}"  # NET_BIND_SERVICE, NET_ADMIN
            assert status["NoNewPrivs"].strip() == "1"
            assert info["capabilities"]["effective"] == ["CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN"]
            missing = info["capabilities"]["missing"]
            assert len(missing) == 1 and missing[0].startswith("no CAP_SYS_ADMIN: sandboxes")
            # The data dir and what the agent made in it are the user's.
            data_dir = Path(cluster.state["nodes"][node - 1]["log"]).parent / f"n{node}"
            assert {p.stat().st_uid for p in [data_dir, *data_dir.iterdir()]} == {uid}
        assert cluster.api(node, "/v1/lb")["backend"] == cluster.api(1, "/v1/lb")["backend"]
        assert cluster.api(node, "/v1/lb")["backend"] != "userspace"


def get(
    cluster: MeshCluster, address: str, port: int, host: str | None = None, timeout: float = 3.0
) -> str:
    """One request on a new connection from the client namespace: the body, or the error."""

    def fetch() -> str:
        conn = http.client.HTTPConnection(address, port, timeout=timeout)
        try:
            conn.request("GET", "/", headers={"Host": host} if host else {})
            response = conn.getresponse()
            body = response.read().decode().strip()
            return body if response.status == 200 else f"status {response.status}"
        except OSError as exc:
            return f"error {type(exc).__name__}"
        finally:
            conn.close()

    return str(harness.in_netns(cluster.state["client"], fetch))


@pytest.fixture(scope="module")
def web(cluster: MeshCluster) -> list[str]:
    cluster.mesh(
        1,
        "service",
        "create",
        "web",
        "--publish",
        f"{PUBLISHED}:80",
        "--label",
        f"mesh.http.hosts={HOST}",
        "--label",
        "mesh.http.port=80",
    )
    idents = []
    for node in range(1, NODES + 1):
        cluster.task(node, "web", 8000 + node, target=80)
        idents.append(f"n{node}:{8000 + node}")

    def everywhere() -> bool:
        return all(
            len(cluster.api(i, "/v1/lb")["services"]) > 0
            and sum(
                len(s["reals"])
                for s in cluster.api(i, "/v1/lb")["services"]
                if s["port"] == PUBLISHED
            )
            == NODES
            for i in range(1, NODES + 1)
        )

    assert wait_for(everywhere, 30) is not None
    return idents


def test_published_port_answers_on_every_node_and_spreads(
    cluster: MeshCluster, web: list[str]
) -> None:
    backend = cluster.api(1, "/v1/lb")["backend"]
    per_node = {}
    for node in range(1, NODES + 1):
        seen = collections.Counter(
            get(cluster, cluster.address(node), PUBLISHED) for _ in range(60)
        )
        per_node[f"n{node}"] = dict(seen)
        assert set(seen) == set(web), f"n{node}: {seen}"
        assert min(seen.values()) >= 10, f"n{node} spread: {seen}"
    print(f"\nrouting mesh ({backend}): 60 connections to each node's :{PUBLISHED} -> {per_node}")


def test_http_routing_mesh_by_host_on_every_node(cluster: MeshCluster, web: list[str]) -> None:
    for node in range(1, NODES + 1):
        seen = collections.Counter(get(cluster, cluster.address(node), 80, HOST) for _ in range(30))
        assert set(seen) == set(web), f"n{node}: {seen}"
        assert get(cluster, cluster.address(node), 80, "nobody.example") == "status 404"
    print(f"\nHRM: Host {HOST} on :80 of every node reached all {len(web)} tasks")


def test_traffic_keeps_flowing_when_an_agent_dies(cluster: MeshCluster, web: list[str]) -> None:
    victim, survivors = 3, [1, 2]
    results: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def load(node: int) -> None:
        deadline = time.monotonic() + 40
        while not stop.is_set() and time.monotonic() < deadline:
            results[get(cluster, cluster.address(node), PUBLISHED, timeout=2.0)] += 1

    with concurrent.futures.ThreadPoolExecutor(len(survivors)) as pool:
        running = [pool.submit(load, n) for n in survivors]
        time.sleep(2)
        cluster.stop(victim, kill=True)
        gone = wait_for(
            lambda: all(
                not any(
                    r["address"] == cluster.address(victim)
                    for s in cluster.api(n, "/v1/lb")["services"]
                    for r in s["reals"]
                )
                for n in survivors
            ),
            30,
            step=0.2,
        )
        time.sleep(3)
        stop.set()
        for future in running:
            future.result()
    cluster.start(victim)
    failed = sum(n for body, n in results.items() if body not in web)
    print(
        f"\nkill -9 n{victim} under load through n1, n2: {sum(results.values())} requests, "
        f"{failed} failed; its task left their LB tables in {secs(gone)}"
    )
    assert gone is not None
    # Only a request in flight when the agent died may fail: one per load thread.
    assert failed <= len(survivors)
    assert (
        wait_for(
            lambda: len({get(cluster, cluster.address(1), PUBLISHED) for _ in range(20)}) == NODES,
            30,
        )
        is not None
    )

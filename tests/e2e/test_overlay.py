"""Issue 16 "Done when" (overlay), end to end: three nodes, one overlay network.

Three node namespaces, each with a real agent (`--lb nftables`, the HRM on :80),
joined by an underlay switch (192.168.77.0/24: each agent's `--advertise`, so its
VTEP); one overlay network `app` (10.77.0.0/24) made on node 1:

- `web` (published 8080): one task per node, `w1` on node 1, `w2`, `w3`;
- `only3` (published 8090, HRM host only3.test): one task `o3`, on node 3 only.

Every task is started with `mesh task run --detach` on its node and answers HTTP
with its name. Clients: curl and getent inside the tasks' sandboxes (the glibc
resolver at 127.0.0.11), curl from each node's outside namespace. Every loop is
bounded in count and time; every figure printed (`pytest -rP` shows them).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mesh.sandbox.names import mac_of
from tests.helpers.netns import unavailable
from tests.helpers.overlay_lab import OverlayCluster, OverlayNode
from tests.helpers.sandbox_lab import NODE_UPLINK, wait_for

CURL = ["curl", "-sS", "--max-time", "3"]
SUBNET = "10.77.0.0/24"


class Overlay:
    def __init__(self, cluster: OverlayCluster) -> None:
        self.cluster = cluster
        self.nodes = cluster.nodes
        self.tasks: dict[str, dict[str, Any]] = {}
        self.net_id = ""

    def node_of(self, task: str) -> OverlayNode:
        return self.nodes[int(task[-1]) - 1]

    def inside(self, task: str, script: str, timeout: float = 30) -> str:
        """`sh -c SCRIPT` inside a task's sandbox, as `mesh task exec` runs it."""
        node = self.node_of(task)
        done = node.in_sandbox(
            self.tasks[task]["sandbox"]["netns"], ["sh", "-c", script], timeout=timeout
        )
        return done.stdout + done.stderr


def _tools_missing() -> str | None:
    for tool in ("curl", "getent", "nft", "nsenter", "bridge"):
        if subprocess.run(["which", tool], capture_output=True, check=False).returncode:
            return f"{tool} is not installed"
    return None


@pytest.fixture(scope="module")
def overlay() -> Iterator[Overlay]:
    reason = unavailable() or _tools_missing()
    if reason is not None:
        pytest.skip(reason)
    cluster = OverlayCluster(3)
    try:
        print(f"3 agents up and all alive in {cluster.start():.1f} s")
        n1 = cluster.nodes[0]
        n1.mesh_ok("network", "create", "app", "--driver", "overlay", "--subnet", SUBNET)
        n1.mesh_ok("service", "create", "web", "--network", "app", "--publish", "8080:80")
        n1.mesh_ok(
            "service",
            "create",
            "only3",
            "--network",
            "app",
            "--publish",
            "8090:80",
            "--label",
            "mesh.http.hosts=only3.test",
            "--label",
            "mesh.http.port=80",
        )
        made = Overlay(cluster)
        made.net_id = n1.mesh_json("network", "inspect", "app")["id"]
        started = time.monotonic()
        for node in cluster.nodes:
            # the network and services reach the node by gossip; its bridge is made
            # once it has its own address there, and its peers are the other nodes'
            def ready(node: OverlayNode = node) -> bool:
                app = node.overlays().get("app")
                return app is not None and app["peers"] >= 2

            assert wait_for(ready, 30) is not None, f"{node.name}: {node.overlays()}"
        print(f"the overlay served on all 3 nodes {time.monotonic() - started:.1f} s later")
        for node in cluster.nodes:
            name = f"w{node.index}"
            made.tasks[name] = node.serve("web", name)
        made.tasks["o3"] = cluster.nodes[2].serve("only3", "o3")
        # a service on a bridge network of node 3 alone: the routing mesh reaches it
        # through ingress (an overlay), which its task joins as it publishes a port
        n3 = cluster.nodes[2]
        n3.mesh_ok("network", "create", "b3", "--driver", "bridge", "--subnet", "10.79.0.0/24")
        n3.mesh_ok(
            "service",
            "create",
            "br3",
            "--network",
            "b3",
            "--publish",
            "8095:80",
            "--label",
            "mesh.http.hosts=br3.test",
            "--label",
            "mesh.http.port=80",
        )
        made.tasks["b3"] = n3.serve("br3", "b3")
        for name, task in made.tasks.items():
            node = made.node_of(name)

            def answers(address: str = task["address"], node: OverlayNode = node) -> bool:
                done = node.run([*CURL, f"http://{address}/"], timeout=10)
                return bool(done.stdout.strip())

            assert wait_for(answers, 30) is not None, f"task {name} never served:\n{node.log()}"
        yield made
    finally:
        for node in cluster.nodes:
            if node.agent is not None and node.agent.poll() not in (None, -9):
                print(f"{node.name}'s agent had exited ({node.agent.returncode}):\n{node.log()}")
        cluster.close()


def test_every_node_has_the_vxlan_with_the_networks_vni_and_the_peers(overlay: Overlay) -> None:
    vnis = {n.overlays()["app"]["vni"] for n in overlay.nodes}
    assert vnis == {4097}
    ingress = {n.overlays()["ingress"]["vni"] for n in overlay.nodes}
    assert ingress == {4096}
    hosts = [n.overlays()["app"]["host_address"] for n in overlay.nodes]
    assert len(set(hosts)) == 3, hosts
    remote = {
        t: mac_of(task["addresses"]["app"])
        for t, task in overlay.tasks.items()
        if "app" in task["addresses"]
    }
    for node in overlay.nodes:
        macs = node.fdb_macs(overlay.net_id)
        expected = {mac for t, mac in remote.items() if overlay.node_of(t) is not node}
        expected |= {mac_of(h) for h in hosts if h != node.overlays()["app"]["host_address"]}
        assert expected <= macs, f"{node.name}: {sorted(expected - macs)} missing"


def test_each_task_reaches_the_others_by_name_and_by_the_services_vip(overlay: Overlay) -> None:
    vip = overlay.nodes[0].mesh_json("service", "inspect", "web")["vips"]
    vip_app = next(v["address"] for v in vip if v["network"] == "app")
    for me in ("w1", "w2", "w3"):
        for other in ("w1", "w2", "w3"):
            if other == me:
                continue
            out = overlay.inside(me, f"getent hosts {other}; curl -sS --max-time 3 http://{other}/")
            assert overlay.tasks[other]["address"] in out and out.strip().endswith(other), out
        seen: set[str] = set()
        for _ in range(12):
            out = overlay.inside(me, "curl -sS --max-time 3 http://web/").strip()
            seen.add(out)
            if seen == {"w1", "w2", "w3"}:
                break
        assert seen == {"w1", "w2", "w3"}, f"from {me} by the VIP {vip_app}: {seen}"
        assert vip_app in overlay.inside(me, "getent hosts web")


def test_a_published_port_on_node_1_reaches_the_task_only_on_node_3(overlay: Overlay) -> None:
    # o3: on the overlay app; b3: on a bridge network of node 3, reached through ingress
    for ident, port, host in (("o3", 8090, "only3.test"), ("b3", 8095, "br3.test")):
        for node in overlay.nodes:
            for argv in (
                [*CURL, f"http://{NODE_UPLINK}:{port}/"],
                [*CURL, "-H", f"Host: {host}", f"http://{NODE_UPLINK}/"],
            ):
                got = node.outside.run(argv, check=False)
                assert got.stdout.strip() == ident, f"{node.name} {argv}: {got.stdout}{got.stderr}"
    # and the service of every node's tasks, from node 2's outside
    seen = set()
    for _ in range(12):
        seen.add(
            overlay.nodes[1].outside.run([*CURL, f"http://{NODE_UPLINK}:8080/"]).stdout.strip()
        )
    assert seen == {"w1", "w2", "w3"}


def test_doctor_checks_the_overlay_sandboxes_with_the_nodes_own_address(overlay: Overlay) -> None:
    node = overlay.nodes[2]
    done = node.mesh("doctor", "--settle", "0", "--json", timeout=120)
    report = json.loads(done.stdout)
    sandbox = [f for f in report["findings"] if f["check"] == "sandbox"]
    failed = [f["message"] for f in sandbox if f["status"] == "fail"]
    print(f"doctor on node 3: {len(sandbox)} sandbox findings, failed: {failed}")
    assert not failed
    own = node.overlays()["app"]["host_address"]
    assert any(f"default route via {own}" in f["message"] for f in sandbox), sandbox


def test_kill_9_of_a_node_withdraws_its_endpoints_from_the_others(overlay: Overlay) -> None:
    n3 = overlay.nodes[2]
    gone_macs = {mac_of(overlay.tasks[t]["address"]) for t in ("w3", "o3")}
    gone_addresses = {overlay.tasks[t]["address"] for t in ("w3", "o3")}
    host3 = n3.overlays()["app"]["host_address"]
    gone_macs.add(mac_of(host3))
    gone_addresses.add(host3)
    others = overlay.nodes[:2]
    for node in others:
        assert gone_macs <= node.fdb_macs(overlay.net_id)
        assert gone_addresses <= node.neighbours(overlay.net_id)
    killed_at = time.monotonic()
    n3.kill_agent()

    def withdrawn() -> bool:
        return all(
            not (gone_macs & n.fdb_macs(overlay.net_id))
            and not (gone_addresses & n.neighbours(overlay.net_id))
            for n in others
        )

    took = wait_for(withdrawn, 30, step=0.05)
    assert took is not None, [n.fdb_macs(overlay.net_id) for n in others]
    print(
        f"node 3's endpoints left the FDB and neighbour tables of nodes 1 and 2 "
        f"{time.monotonic() - killed_at:.2f} s after kill -9 (gossip profile local)"
    )
    # the others still reach each other
    out = overlay.inside("w1", "curl -sS --max-time 3 http://w2/")
    assert out.strip() == "w2", out

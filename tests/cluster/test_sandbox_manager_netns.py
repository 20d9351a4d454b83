"""The sandbox manager in a real agent (root): an agent inside its own node namespace
(`nsenter --net`, `--lb nftables`) makes a sandboxed task's namespace, veth, address,
default route and resolv.conf; after a kill -9, a veth deleted by hand and an orphan
namespace of ours, the restart puts the veth back and removes the orphan, touching
nothing else; deleting the task removes its namespace and veths."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.core.netns import entered
from mesh.sandbox.names import VETH_PREFIX, VXLAN_PREFIX, bridge_name, netns_name, veth_name
from tests.cluster.conftest import require_tools
from tests.helpers.netns import NETNS_ETC, NETNS_RUN, Lab, Netns
from tests.helpers.sandbox_node import NodeAgent, remove_sandboxes

pytestmark = [pytest.mark.root, pytest.mark.slow]

SUBNET = "10.151.7.0/24"
GATEWAY = "10.151.7.1"


@pytest.fixture
def node(netns_ready: None) -> Iterator[tuple[Lab, Netns]]:
    require_tools("nsenter", "nft", "ip")
    with Lab("t15m") as lab:
        yield lab, lab.namespace("node")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.returncode} {done.stderr.strip()}")
    return done


def links(ns: Netns) -> set[str]:
    out = sh("ip", "-n", ns.name, "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def wait_for(what: str, check: Any, timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - started


def assert_sandbox_up(node: Netns, name: str, task: dict[str, Any], net_id: str) -> None:
    assert (NETNS_RUN / name).exists()
    # From the host, with ip netns exec: the sandbox is usable by anything.
    addr = sh("ip", "netns", "exec", name, "ip", "-o", "-4", "addr", "show", "dev", "eth0")
    assert f"{task['address']}/24" in addr.stdout
    route = sh("ip", "netns", "exec", name, "ip", "route", "show", "default").stdout
    assert f"default via {GATEWAY} dev eth0" in route
    resolv = (NETNS_ETC / name / "resolv.conf").read_text()
    assert "nameserver 127.0.0.11" in resolv
    veth = veth_name(task["id"], 0)
    master = sh("ip", "-n", node.name, "-o", "link", "show", "dev", veth).stdout
    assert f"master {bridge_name(net_id)}" in master


def is_up(node: Netns, name: str, task: dict[str, Any], net_id: str) -> bool:
    try:
        assert_sandbox_up(node, name, task, net_id)
    except AssertionError:
        return False
    return True


def test_sandbox_made_reconciled_after_kill_9_and_removed(
    node: tuple[Lab, Netns], tmp_path: Path
) -> None:
    lab, ns = node
    agent = NodeAgent(ns, tmp_path / "data", extra=["--lb", "nftables"])
    try:
        agent.start()
        assert "sandboxes_enabled" in agent.log()
        net = agent.api_ok(
            "POST", "/v1/networks", {"name": "front", "driver": "bridge", "subnet": SUBNET}, 201
        )
        assert net["scope"] == "local" and net["node"] == agent.node_name
        agent.api_ok("POST", "/v1/services", {"name": "web", "networks": ["front"]}, 201)
        started = time.monotonic()
        task = agent.api_ok("POST", "/v1/services/web/tasks", {"sandbox": {"netns": None}}, 201)
        print(f"sandboxed task created (201, sandbox up) in {time.monotonic() - started:.3f}s")
        name = netns_name(agent.node_name, task["id"])
        assert task["sandbox"]["netns"] == str(NETNS_RUN / name)
        assert task["addresses"] == {"front": task["address"]}
        # 201 only once the sandbox is up: no waiting here.
        assert_sandbox_up(ns, name, task, net["id"])

        # kill -9: the sandbox stays as it is.
        agent.kill()
        assert (NETNS_RUN / name).exists()
        veth = veth_name(task["id"], 0)
        sh("ip", "-n", ns.name, "link", "delete", veth)
        orphan = f"{agent.prefix}orphan000000"
        sh("ip", "netns", "add", orphan)
        # Not ours: another node's prefix, and a link without our prefix in the node.
        foreign = f"mp-ffffff-{lab.tag}"
        sh("ip", "netns", "add", foreign)
        try:
            sh("ip", "-n", ns.name, "link", "add", "keepbr0", "type", "bridge")
            sh("ip", "-n", ns.name, "link", "add", "keepv0", "type", "veth", "peer", "keepv1")
            before = links(ns)
            assert veth not in before
            # Orphans of ours in the node: a veth and a bridge no record owns.
            sh("ip", "-n", ns.name, "link", "add", "mpvdeadbeef0", "type", "veth", "peer", "orph1")
            sh("ip", "-n", ns.name, "link", "add", "mpbr-deadbeef", "type", "bridge")

            agent.start()
            took = wait_for("the sandbox repaired", lambda: is_up(ns, name, task, net["id"]))
            print(f"restart: veth, address and route back {took:.3f}s after the API answered")
            wait_for("the orphan gone", lambda: not (NETNS_RUN / orphan).exists())
            assert_sandbox_up(ns, name, task, net["id"])
            assert (NETNS_RUN / foreign).exists()
            assert links(ns) == before | {veth}
            assert agent.sandboxes() == [name]
            reconciled = [
                line for line in agent.log().splitlines() if "sandboxes_reconciled" in line
            ]
            print(reconciled[-1])
            assert f"netns {orphan}" in reconciled[-1]
            assert "veth mpvdeadbeef0" in reconciled[-1]
            assert "bridge network deadbeef" in reconciled[-1]
            info = agent.api_ok("GET", "/v1/agent")["sandboxes"]
            assert info["enabled"] and info["prefix"] == agent.prefix
            # ingress is an overlay, served by every node with sandboxes (issue 16)
            assert (info["networks"], info["sandboxes"]) == (["front", "ingress"], 1)
            assert info["stats"]["orphans_removed"] == 3  # the namespace, veth and bridge
            assert info["stats"]["repaired"] == 1
        finally:
            sh("ip", "netns", "delete", foreign, check=False)

        agent.api_ok("DELETE", f"/v1/tasks/{task['id']}", None, 202)  # drained, then removed
        wait_for("the sandbox gone", lambda: not (NETNS_RUN / name).exists())
        assert veth not in links(ns)
        assert not (NETNS_ETC / name).exists()
        assert agent.sandboxes() == []
    finally:
        agent.shutdown()
        remove_sandboxes(agent.node_name)


def test_an_adopted_namespace_keeps_what_was_not_ours(
    node: tuple[Lab, Netns], tmp_path: Path
) -> None:
    lab, ns = node
    # A namespace the agent did not make (a container's, say), with a link of its own.
    theirs = lab.namespace("theirs")
    theirs.ip("link", "add", "own0", "type", "bridge")
    agent = NodeAgent(ns, tmp_path / "data", extra=["--lb", "nftables"])
    try:
        agent.start()
        net = agent.api_ok(
            "POST", "/v1/networks", {"name": "front", "driver": "bridge", "subnet": SUBNET}, 201
        )
        agent.api_ok("POST", "/v1/services", {"name": "web", "networks": ["front"]}, 201)
        task = agent.api_ok(
            "POST", "/v1/services/web/tasks", {"sandbox": {"netns": theirs.name}}, 201
        )
        assert task["sandbox"]["adopted"] is True
        inside = links(theirs)
        assert {"lo", "own0", "eth0"} <= inside
        addr = theirs.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
        assert f"{task['address']}/24" in addr
        assert agent.sandboxes() == []  # nothing of ours under /run/netns

        # A clean stop leaves the sandbox as it is (tasks are durable); the restart keeps it.
        assert agent.stop() == 0
        assert links(theirs) == inside
        assert bridge_name(net["id"]) in links(ns)
        agent.start()
        agent.api_ok("GET", f"/v1/tasks/{task['id']}")
        assert links(theirs) == inside

        agent.api_ok("DELETE", f"/v1/tasks/{task['id']}", None, 202)
        wait_for("the endpoint gone", lambda: "eth0" not in links(theirs))
        assert (NETNS_RUN / theirs.name).exists()
        assert links(theirs) == inside - {"eth0"}
    finally:
        agent.shutdown()
        remove_sandboxes(agent.node_name)


BURST = 30


def test_kill_9_during_a_burst_of_sandboxed_tasks_leaks_nothing(
    node: tuple[Lab, Netns], tmp_path: Path
) -> None:
    """kill -9 while 30 sandboxed tasks are being created at once; after the restart
    every namespace and veth of ours belongs to a task of the state, every task of the
    state (every acked one among them) has its sandbox up, and nothing else is left."""
    _lab, ns = node
    agent = NodeAgent(ns, tmp_path / "data", extra=["--lb", "nftables"])
    try:
        agent.start()
        net = agent.api_ok(
            "POST", "/v1/networks", {"name": "front", "driver": "bridge", "subnet": SUBNET}, 201
        )
        agent.api_ok("POST", "/v1/services", {"name": "web", "networks": ["front"]}, 201)
        acked: list[str] = []
        lock = threading.Lock()
        url = f"http://{agent.api}/v1/services/web/tasks"

        def create(_: int) -> None:
            body = json.dumps({"sandbox": {"netns": None}}).encode()
            request = urllib.request.Request(
                url, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            # Each client thread in the node's namespace, where the API listens.
            with entered(str(NETNS_RUN / ns.name)):
                try:
                    with urllib.request.urlopen(request, timeout=30) as answer:
                        if answer.status == 201:
                            with lock:
                                acked.append(json.loads(answer.read())["id"])
                except (urllib.error.URLError, OSError):
                    pass  # the agent was killed under this request

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=BURST) as pool:
            futures = [pool.submit(create, i) for i in range(BURST)]
            wait_for("a third acked", lambda: len(acked) >= BURST // 3, timeout=60)
            agent.kill()
            for future in futures:
                future.result()
        print(f"{len(acked)} of {BURST} acked in {time.monotonic() - started:.2f}s, then kill -9")

        agent.start()
        tasks = {t["id"]: t for t in agent.api_ok("GET", "/v1/tasks")}
        assert set(acked) <= set(tasks), "an acked task was lost"
        names = {netns_name(agent.node_name, t) for t in tasks}

        def in_step() -> bool:
            veths = {
                link
                for link in links(ns)
                if link.startswith(VETH_PREFIX) and not link.startswith(VXLAN_PREFIX)
            }
            return set(agent.sandboxes()) == names and veths == {veth_name(t, 0) for t in tasks}

        took = wait_for("namespaces and veths as the state has them", in_step, timeout=60)
        print(f"restart: {len(tasks)} sandboxes in step with the state after {took:.2f}s")
        for task in tasks.values():
            assert_sandbox_up(ns, netns_name(agent.node_name, task["id"]), task, net["id"])
    finally:
        agent.shutdown()
        remove_sandboxes(agent.node_name)

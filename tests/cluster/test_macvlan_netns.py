"""A macvlan network across two real agents whose parents share one LAN (root).

    seg: bridge sw ── lan0 of node1 (10.216.0.11, agent 1, gossip)
                  ── lan0 of node2 (10.216.0.12, agent 2, gossip)
                  ── eth0 of out   (10.216.0.1: the LAN's router, and a host)

The network is created once (on node 1) with a slice of the LAN per node
(`ip_range@<node>`) and a host shim per node; gossip brings it to node 2. A
sandboxed task is created on each node at the same moment (no wait for gossip
between them): each gets an address from its own node's slice, the two
sandboxes reach each other and the router across the LAN, each node reaches
its own task through its shim, and the DNS inside a sandbox answers the
service's name with both tasks once the state has converged.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.sandbox.names import SHIM_PREFIX
from tests.cluster.conftest import require_tools
from tests.helpers.netns import Lab, Netns
from tests.helpers.sandbox_node import NodeAgent, remove_sandboxes

pytestmark = [pytest.mark.root, pytest.mark.slow]

SUBNET, ROUTER = "10.216.0.0/24", "10.216.0.1"
NODE_ADDRESSES = ("10.216.0.11", "10.216.0.12")
SLICES = ("10.216.0.64/27", "10.216.0.96/27")
SHIMS = ("10.216.0.251", "10.216.0.252")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.returncode} {done.stderr.strip()}")
    return done


def in_sandbox(task: dict[str, Any], *argv: str) -> subprocess.CompletedProcess[str]:
    name = Path(task["sandbox"]["netns"]).name
    return sh("ip", "netns", "exec", name, *argv, check=False)


def pings(task: dict[str, Any], address: str) -> bool:
    return in_sandbox(task, "ping", "-c", "1", "-W", "2", "-q", address).returncode == 0


def wait_for(what: str, check: Any, timeout: float = 20.0) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.fixture
def cluster(netns_ready: None, tmp_path: Path) -> Iterator[tuple[Netns, list[NodeAgent]]]:
    require_tools("nsenter", "nft", "ip", "ping", "getent")
    with Lab("t16mvc") as lab:
        seg, outside = lab.namespace("seg"), lab.namespace("out")
        nodes = [lab.namespace("n1"), lab.namespace("n2")]
        switch = lab.bridge(seg, "sw")
        ends = [(outside, "eth0", ROUTER)] + [
            (ns, "lan0", address) for ns, address in zip(nodes, NODE_ADDRESSES, strict=True)
        ]
        for i, (ns, dev, address) in enumerate(ends):
            lab.veth(seg, f"p{i}", ns, dev)
            seg.ip("link", "set", f"p{i}", "master", switch)
            ns.add_address(dev, f"{address}/24")
        agents = [
            NodeAgent(
                ns,
                tmp_path / f"node{i + 1}",
                extra=[
                    "--advertise",
                    f"{NODE_ADDRESSES[i]}:7946",
                    "--gossip-profile",
                    "local",
                    "--lb",
                    "nftables",
                    "--address-pool",
                    "10.40.0.0/16",
                    *(["--join", f"{NODE_ADDRESSES[0]}:7946"] if i else []),
                ],
            )
            for i, ns in enumerate(nodes)
        ]
        try:
            for agent in agents:
                agent.start()
            yield outside, agents
        finally:
            for agent in agents:
                agent.shutdown()
                remove_sandboxes(agent.node_name)


def test_tasks_on_two_nodes_share_the_lan_each_from_its_own_slice(
    cluster: tuple[Netns, list[NodeAgent]],
) -> None:
    outside, (one, two) = cluster
    options = {"parent": "lan0"}
    for agent, part, shim in zip((one, two), SLICES, SHIMS, strict=True):
        options[f"ip_range@{agent.node_name}"] = part
        options[f"host_shim@{agent.node_name}"] = shim
    body = {"name": "lan", "driver": "macvlan", "subnet": SUBNET, "gateway": ROUTER}
    one.api_ok("POST", "/v1/networks", {**body, "options": options}, 201)
    one.api_ok(
        "POST", "/v1/services", {"name": "web", "networks": ["lan"], "endpoint_mode": "dnsrr"}, 201
    )
    took = wait_for(
        "node 2 to know the service", lambda: two.request("GET", "/v1/services/web")[0] == 200
    )
    print(f"the network and service reached node 2 in {took:.2f} s")

    # both at once: neither has heard of the other's task when it picks an address
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        made = list(
            pool.map(
                lambda a: a.api_ok(
                    "POST", "/v1/services/web/tasks", {"sandbox": {"netns": None}}, 201
                ),
                (one, two),
            )
        )
    addresses = [task["addresses"]["lan"] for task in made]
    print(f"node 1's task at {addresses[0]}, node 2's at {addresses[1]}")
    for address, part in zip(addresses, SLICES, strict=True):
        base = int(part.split(".")[3].split("/")[0])
        assert base <= int(address.rsplit(".", 1)[1]) < base + 32, (address, part)

    t1, t2 = made
    assert pings(t1, addresses[1]) and pings(t2, addresses[0])  # across the LAN
    assert pings(t1, ROUTER) and pings(t2, ROUTER)
    assert (
        outside.run(["ping", "-c", "1", "-W", "2", "-q", addresses[1]], check=False).returncode == 0
    )
    for agent, ns_address in zip((one, two), addresses, strict=True):
        node_ping = agent.ns.run(["ping", "-c", "1", "-W", "2", "-q", ns_address], check=False)
        assert node_ping.returncode == 0, "a node reaches its own task through its shim"
        shims = agent.ns.run(["ip", "-o", "link", "show"]).stdout
        assert SHIM_PREFIX in shims

    def both_answered() -> bool:
        done = in_sandbox(t1, "getent", "ahostsv4", "web")
        return set(addresses) <= {line.split()[0] for line in done.stdout.splitlines()}

    took = wait_for("the DNS in a sandbox of node 1 to answer both tasks", both_answered)
    print(f"node 1's sandbox resolved web to both nodes' tasks after {took:.2f} s")

    for agent, task in zip((one, two), made, strict=True):
        agent.api_ok("DELETE", f"/v1/tasks/{task['id']}", None, 202)
    wait_for("the sandboxes gone", lambda: not one.sandboxes() and not two.sandboxes())
    one.api_ok("DELETE", "/v1/services/web", None, 204)
    one.api_ok("DELETE", "/v1/networks/lan", None, 204)
    for agent in (one, two):
        wait_for(
            f"{agent.node_name}'s shim gone",
            lambda agent=agent: SHIM_PREFIX not in agent.ns.run(["ip", "-o", "link"]).stdout,
        )

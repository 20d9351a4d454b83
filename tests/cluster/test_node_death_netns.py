"""A node dies whole under steady traffic through the routing mesh (nftables).

Topology (fresh namespaces, removed afterwards):

    node1 10.21.0.1 (+ task .11) ┐
    node2 10.21.0.2 (+ task .21) ├── bridge (in a switch namespace)
    node3 10.21.0.3 (+ task .31) │
    client 10.21.0.100 ──────────┘

One agent per node on the nftables backend, gossip on the lan profile (the
defaults: a crash is declared dead some 5.5 s later with three nodes). Service
`web` publishes port 30080 in ingress mode over one echo task per node. A client
in its own namespace sends a request (connect, read the task's greeting) to node
3's published port every 1/RATE s, each failing after TIMEOUT s without a
greeting. Two seconds in, node 1 dies whole: its agent is killed with SIGKILL and
its only link deleted, so its task cannot answer either. The figure is the share
of requests started in the 30 s after that failed (printed; the issue's goal is
1 %). Node 3 must have taken node 1's task out of its table before gossip's
verdict: by passive outlier detection (`GET /v1/lb` `outliers`: the SYNs it
DNATed there went unanswered and a direct connect too), or while node 1 was
suspect (`failover`); with `--lb-outlier-detection off` (OUTLIERS=off in the
environment: the figure without it) only the latter.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import NetnsAgent, require_tools
from tests.helpers.agent import REPO
from tests.helpers.echo import EchoServer
from tests.helpers.netns import Lab, Netns

pytestmark = [pytest.mark.root, pytest.mark.slow]

SUBNET = "10.21.0"
NODES = (f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.3")
CLIENT = f"{SUBNET}.100"
TASKS = ((0, f"{SUBNET}.11"), (1, f"{SUBNET}.21"), (2, f"{SUBNET}.31"))  # (node, address)
TASK_PORT = 9000
HEALTH_PORT = 9100
PUBLISHED = 30080
#: about the issue's 782 requests in 30 s
RATE = 26.0
#: a request with no greeting this long after it started has failed: long enough for
#: the SYN retransmitted 1 s after the first one (Linux's initial RTO), no longer
TIMEOUT = 2.0
BEFORE = 2.0  # seconds of traffic before the node dies
AFTER = 30.0  # the seconds counted
SLACK = 30.0
#: MESH_TEST_OUTLIERS=off: the same run with passive outlier detection off, for the figure
OUTLIERS = os.environ.get("MESH_TEST_OUTLIERS", "on")


@dataclass
class Mesh:
    lab: Lab
    switch: Netns
    nodes: list[Netns]
    client: Netns
    agents: list[NetnsAgent]
    servers: list[EchoServer] = field(default_factory=list)


def build_topology(lab: Lab) -> tuple[Netns, list[Netns], Netns]:
    switch = lab.namespace("switch")
    bridge = lab.bridge(switch, "br0")
    nodes = [lab.namespace(f"node{i + 1}") for i in range(3)]
    client = lab.namespace("client")
    for index, (ns, address) in enumerate([*zip(nodes, NODES, strict=True), (client, CLIENT)]):
        port = f"p{index}"
        lab.veth(ns, "eth0", switch, port)
        switch.ip("link", "set", port, "master", bridge)
        ns.add_address("eth0", f"{address}/24")
    for node, address in TASKS:
        nodes[node].add_address("eth0", f"{address}/24")
    for ns in nodes:
        ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    return switch, nodes, client


def bound_socket(address: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    return sock


def wait_for(check: Any, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < SLACK, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - start


def lb_reals(agent: NetnsAgent) -> set[str]:
    for service in agent.api_ok("GET", "/v1/lb")["services"]:
        if service["port"] == PUBLISHED and service["address"] == "0.0.0.0":
            return {r["address"] for r in service["reals"] if r["weight"] > 0}
    return set()


def event_times(agent: NetnsAgent, since: float) -> dict[str, float]:
    """Seconds after `since` (wall clock) of the first line of each L4 event in the log."""
    wanted = ("lb_real_ejected", "lb_node_hidden", "lb_node_gone")
    found: dict[str, float] = {}
    for line in agent.log().splitlines():
        match = re.match(r"ts=(\S+)Z .*event=(\w+)", line)
        if match and match[2] in wanted and match[2] not in found:
            stamp = datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S.%f")
            found[match[2]] = round(stamp.replace(tzinfo=UTC).timestamp() - since, 2)
            if match[2] == "lb_real_ejected":
                print(line)  # with unanswered_for: the oldest flow's wait, check included
    return found


def statuses(agent: NetnsAgent) -> dict[str, str]:
    return {m["name"]: m["status"] for m in agent.api_ok("GET", "/v1/members")}


@pytest.fixture
def mesh(netns_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    require_tools("nft")
    with Lab("mpfo") as lab:
        switch, nodes, client = build_topology(lab)
        root: Path = tmp_path_factory.mktemp("node-death")
        agents = [
            NetnsAgent(
                ns,
                root / f"node{i + 1}",
                extra=[
                    "--node-name",
                    f"node{i + 1}",
                    "--advertise",
                    f"{NODES[i]}:7946",
                    "--lb",
                    "nftables",
                    "--publish-address",
                    "0.0.0.0",
                    "--address-pool",
                    "10.41.0.0/16",
                    "--lb-outlier-detection",
                    OUTLIERS,
                    *(["--join", f"{NODES[0]}:7946"] if i else []),
                ],
            )
            for i, ns in enumerate(nodes)
        ]
        made = Mesh(lab, switch, nodes, client, agents)
        health: list[EchoServer] = []
        try:
            for agent in agents:
                agent.start()
            for node, address in TASKS:
                ns = nodes[node]
                made.servers.append(
                    EchoServer(address, TASK_PORT, ns.call(bound_socket, address, TASK_PORT))
                )
                health.append(
                    EchoServer(address, HEALTH_PORT, ns.call(bound_socket, address, HEALTH_PORT))
                )
            yield made
        finally:
            for agent in agents:
                if agent.proc is not None and agent.proc.poll() is None:
                    agent.shutdown()
            for server in [*made.servers, *health]:
                server.close()


def test_a_node_dying_whole_costs_few_requests(mesh: Mesh) -> None:
    agents = mesh.agents
    wait_for(lambda: all(len(a.api_ok("GET", "/v1/members")) == 3 for a in agents), "three members")
    agents[0].api_ok("POST", "/v1/networks", {"name": "front"}, 201)
    agents[0].api_ok(
        "POST",
        "/v1/services",
        {
            "name": "web",
            "networks": ["front"],
            "ports": [{"target_port": TASK_PORT, "published_port": PUBLISHED}],
            "health_check": {
                "type": "tcp",
                "port": HEALTH_PORT,
                "interval": 0.5,
                "timeout": 0.5,
                "retries": 1,
            },
        },
        201,
    )
    wait_for(
        lambda: all(a.request("GET", "/v1/services/web")[0] == 200 for a in agents), "the service"
    )
    for node, address in TASKS:
        agents[node].api_ok("POST", "/v1/services/web/tasks", {"address": address}, 201)
    addresses = {address for _, address in TASKS}
    wait_for(lambda: lb_reals(agents[2]) == addresses, "three healthy tasks in node 3's table")

    victim = TASKS[0][1]
    client = mesh.client.popen(
        [
            sys.executable,
            "-m",
            "tests.helpers.steady_client",
            NODES[2],
            str(PUBLISHED),
            str(RATE),
            str(BEFORE + AFTER),
            str(TIMEOUT),
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    try:
        time.sleep(BEFORE)
        # Node 1 dies whole: its agent, and every address on it (its task's too).
        died = time.monotonic()
        died_wall = time.time()
        assert agents[0].proc is not None
        agents[0].proc.send_signal(signal.SIGKILL)
        mesh.switch.ip("link", "delete", "p0")
        out_of_table = wait_for(lambda: victim not in lb_reals(agents[2]), "the task out")
        lb_then = agents[2].api_ok("GET", "/v1/lb")
        outliers = lb_then.get("outliers") or {}
        status_then = statuses(agents[2]).get("node1")
        declared = wait_for(lambda: statuses(agents[2]).get("node1") == "dead", "the verdict")
        # node 1 was suspect before its verdict: by now the filter hid it too
        hidden = agents[2].api_ok("GET", "/v1/lb").get("failover") or {}
        outliers_after = agents[2].api_ok("GET", "/v1/lb").get("outliers") or {}
        output, _ = client.communicate(timeout=BEFORE + AFTER + TIMEOUT + 30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    events = event_times(agents[2], died_wall)
    results: list[list[Any]] = json.loads(output)
    counted = [r for r in results if died <= r[0] < died + AFTER]
    failed = [r for r in counted if r[1] is None]
    in_flight = [r for r in results if died - TIMEOUT <= r[0] < died and r[1] is None]
    print(
        f"\nnode 1 died whole: {len(failed)} of {len(counted)} requests failed in the {AFTER:.0f} s"
        f" after ({100 * len(failed) / max(1, len(counted)):.1f} %, timeout {TIMEOUT} s,"
        f" {RATE:.0f}/s); its task out of node 3's table {out_of_table:.1f} s after"
        f" (node 1 {status_then} then), declared dead {out_of_table + declared:.1f} s after;"
        f" failed at: {[round(r[0] - died, 2) for r in failed]}; errors:"
        f" {sorted({r[2] for r in failed})}; {len(in_flight)} started just before the death"
        f" failed too; node 3's events, s after the death: {events}; node 3's failover:"
        f" {hidden}; outliers when it left: {outliers},"
        f" after the verdict: {outliers_after}"
    )
    assert len(counted) >= 0.9 * RATE * AFTER
    # Before the death nothing fails; a request started just before it may (in flight).
    assert not [r for r in results if r[0] < died - TIMEOUT and r[1] is None], "failed before"
    # Out of the table before the verdict; no false removal.
    assert status_then in ("alive", "suspect"), status_then
    assert hidden.get("nodes_hidden") == 1 and hidden.get("hidden_refuted") == 0, hidden
    if OUTLIERS == "on":
        # ejected by node 3's outlier detection, the live tasks never
        assert outliers.get("ejected") == [f"{victim}:{TASK_PORT}"], outliers
        assert outliers_after.get("ejections") == 1, outliers_after
        assert outliers_after.get("restored") == 0, outliers_after
    # The goal is 1 %: 5.4 % with the verdict alone (5.5 s), 0.9-1.9 % with the
    # suspect-node failover (hidden 2-3 s after the death), 0 of 780 in six runs with
    # outlier detection (ejected 0.64-0.77 s after; a flow flushed before its SYN is
    # retransmitted 1 s after the first is balanced anew and succeeds).
    bound = 0.01 if OUTLIERS == "on" else 0.03
    assert len(failed) <= bound * len(counted), f"{len(failed)} of {len(counted)} failed"

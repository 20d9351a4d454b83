"""The routing mesh across three nodes, as a client in its own namespace sees it.

Topology (fresh namespaces per backend, removed afterwards):

    node1 10.20.0.1 (+ tasks .11, .12) ┐
    node2 10.20.0.2 (+ task .21)       ├── bridge (in a switch namespace)
    node3 10.20.0.3                    │
    client 10.20.0.100 ────────────────┘

One agent per node, joined by gossip. Service `web` publishes port 30080 in
ingress mode; its three tasks are real echo servers (port 9000) on nodes 1 and
2, each with a TCP health check on a second port (9100) that the test can
stop. The client only ever talks to node 3, which runs no task.

- 300 connections from the client to node 3's published port spread within
  ±20% across the three tasks (the spread is printed);
- stopping one task's health listener makes its node mark it unhealthy; once
  node 3's table has dropped it (the time is printed), no new connection
  reaches it, while a connection made to it before carries on and ends cleanly.

Parametrized by backend: `userspace`, and `nftables` when `lb.nft` is part of
the build (skipped with the reason otherwise).
"""

from __future__ import annotations

import importlib.util
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.conftest import NetnsAgent
from tests.helpers.echo import EchoServer, hello
from tests.helpers.netns import Lab, Netns

pytestmark = [pytest.mark.root, pytest.mark.slow]

SUBNET = "10.20.0"
NODES = (f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.3")
CLIENT = f"{SUBNET}.100"
TASKS = ((0, f"{SUBNET}.11"), (0, f"{SUBNET}.12"), (1, f"{SUBNET}.21"))  # (node, address)
TASK_PORT = 9000
HEALTH_PORT = 9100
PUBLISHED = 30080
HEALTH_INTERVAL = 0.5
CONNECTIONS = 300
SLACK = 20.0  # seconds any convergence may take before the test gives up


def backends() -> list[Any]:
    nft_missing = importlib.util.find_spec("lb.nft") is None
    return [
        "userspace",
        pytest.param(
            "nftables",
            marks=pytest.mark.skipif(
                nft_missing, reason="lb.nft (the nftables backend) is not part of this build"
            ),
        ),
    ]


@dataclass
class Mesh:
    lab: Lab
    nodes: list[Netns]
    client: Netns
    agents: list[NetnsAgent]
    servers: list[EchoServer] = field(default_factory=list)
    health: list[EchoServer] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)


def build_topology(lab: Lab) -> tuple[list[Netns], Netns]:
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
    for ns in nodes:  # a kernel backend forwards to tasks on other nodes
        ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    return nodes, client


def lb_reals(agent: NetnsAgent) -> dict[str, int]:
    body = agent.api_ok("GET", "/v1/lb")
    for service in body["services"]:
        if service["port"] == PUBLISHED and service["address"] == "0.0.0.0":
            return {f"{r['address']}:{r['port']}": r["weight"] for r in service["reals"]}
    return {}


def wait_for(check: Any, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < SLACK, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture(params=backends())
def mesh(
    request: pytest.FixtureRequest, netns_ready: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    backend: str = request.param
    with Lab("mpl4") as lab:
        nodes, client = build_topology(lab)
        root: Path = tmp_path_factory.mktemp(f"mesh-{backend}")
        agents = [
            NetnsAgent(
                ns,
                root / f"node{i + 1}",
                extra=[
                    "--node-name",
                    f"node{i + 1}",
                    "--advertise",
                    f"{NODES[i]}:7946",
                    "--gossip-profile",
                    "local",
                    "--lb",
                    backend,
                    "--publish-address",
                    "0.0.0.0",
                    "--address-pool",
                    "10.40.0.0/16",
                    *(["--join", f"{NODES[0]}:7946"] if i else []),
                ],
            )
            for i, ns in enumerate(nodes)
        ]
        made = Mesh(lab, nodes, client, agents)
        try:
            for agent in agents:
                agent.start()
            for node, address in TASKS:
                ns = nodes[node]
                made.servers.append(
                    EchoServer(address, TASK_PORT, ns.call(bound_socket, address, TASK_PORT))
                )
                made.health.append(
                    EchoServer(address, HEALTH_PORT, ns.call(bound_socket, address, HEALTH_PORT))
                )
            yield made
        finally:
            for agent in agents:
                agent.shutdown()
            for server in [*made.servers, *made.health]:
                server.close()


def bound_socket(address: str, port: int) -> socket.socket:
    """A TCP socket bound inside the calling thread's namespace (see Netns.call)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    return sock


def client_hello(mesh: Mesh) -> str | None:
    return mesh.client.call(hello, NODES[2], PUBLISHED)


def test_published_port_on_a_node_without_tasks_spreads_and_drains(mesh: Mesh) -> None:
    agents = mesh.agents
    wait_for(
        lambda: all(len(a.api_ok("GET", "/v1/members")) == 3 for a in agents),
        "three members everywhere",
    )
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
                "interval": HEALTH_INTERVAL,
                "timeout": HEALTH_INTERVAL,
                "retries": 1,
            },
        },
        201,
    )
    wait_for(
        lambda: all(a.request("GET", "/v1/services/web")[0] == 200 for a in agents),
        "the service on every node",
    )
    for (node, address), _server in zip(TASKS, mesh.servers, strict=True):
        task = agents[node].api_ok("POST", "/v1/services/web/tasks", {"address": address}, 201)
        mesh.task_ids.append(task["id"])
    names = [s.name for s in mesh.servers]
    wait_for(
        lambda: lb_reals(agents[2]) == {n: 1 for n in names},
        "all three tasks healthy in node 3's table",
    )

    spread = Counter(client_hello(mesh) for _ in range(CONNECTIONS))
    print(
        f"\nspread of {CONNECTIONS} connections through node 3: "
        + ", ".join(f"{name} {spread[name]}" for name in names)
        + (f", failed {spread[None]}" if spread[None] else "")
    )
    expected = CONNECTIONS / len(names)
    assert set(spread) == set(names), spread
    for name in names:
        assert abs(spread[name] - expected) <= 0.2 * expected, spread
    check_l4_metrics(
        agents[2],
        sum(spread[n] for n in names),
        sum(spread[n] * (len(n) + 1) for n in names),  # each greeting: the name and a newline
    )

    # A connection in flight to the task about to fail (round robin: one of three reaches it).
    victim = mesh.servers[0]
    in_flight: socket.socket | None = None
    for _ in range(3):
        sock = mesh.client.call(socket.socket)
        sock.settimeout(5)
        sock.connect((NODES[2], PUBLISHED))
        greeting = _read_line(sock)
        if greeting == victim.name:
            in_flight = sock
            break
        sock.close()
    assert in_flight is not None, "no connection reached the first task"

    before = victim.connections
    mesh.health[0].close()  # its health check now fails: the node marks it unhealthy
    took = wait_for(
        lambda: victim.name not in lb_reals(agents[2]), "node 3 dropping the failed task"
    )
    print(
        f"failed task out of node 3's table {took:.2f}s after its health listener stopped "
        f"(health interval {HEALTH_INTERVAL}s)"
    )
    after = Counter(client_hello(mesh) for _ in range(30))
    assert victim.name not in after and None not in after, after
    assert victim.connections == before, "a new connection reached the failed task"

    # The removal's conntrack flush runs after the table has changed (on a worker
    # thread, well within a second): give it that time, so that a flush taking the
    # answered flow (its next packet balanced to another task, which resets it)
    # fails here every time, not only when the flush wins the race.
    time.sleep(1.5)
    in_flight.sendall(b"still flowing")
    assert _read_exactly(in_flight, 13) == b"still flowing"
    in_flight.shutdown(socket.SHUT_WR)
    assert in_flight.recv(64) == b""  # a clean end, not a reset
    in_flight.close()


def l4_series(agent: NetnsAgent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The L4 families per service of the agent's `GET /metrics`, parsed by prometheus_client."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://{agent.api}/metrics", timeout=10) as response:
            return str(response.read().decode())

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(agent.ns.call(fetch))
        for s in family.samples
        if s.name.startswith("meshplane_lb_service_")
    }


def check_l4_metrics(agent: NetnsAgent, connections: int, greeting_bytes: int) -> None:
    """Node 3's scrape counts the client's connections to `web` exactly (what the backend
    can count: the userspace proxy the bytes too, nftables connections only)."""
    backend = agent.api_ok("GET", "/v1/lb")["backend"]
    web = (("backend", backend), ("service", "web"))
    conns = ("meshplane_lb_service_connections_total", web)
    wait_for(lambda: l4_series(agent).get(conns, 0) >= connections, "the scrape's connections")
    series = l4_series(agent)
    print(f"node 3's L4 series ({backend}): {series}")
    assert series[conns] == connections
    out = ("meshplane_lb_service_bytes_total", (web[0], ("direction", "out"), web[1]))
    if backend == "userspace":
        assert series[out] == greeting_bytes
        assert (
            series[("meshplane_lb_service_bytes_total", (web[0], ("direction", "in"), web[1]))] == 0
        )
    else:  # nftables: no bytes, no open connections per service (docs/metrics.md)
        assert out not in series
        assert ("meshplane_lb_service_active_connections", web) not in series


def _read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data

"""`traffic-policy=local` on a published port, as a client in its own namespace sees it.

Topology (fresh namespaces per backend, removed afterwards), as
test_routing_mesh_netns.py's:

    node1 10.20.0.1 (+ tasks .11, .12) ┐
    node2 10.20.0.2 (+ task .21)       ├── bridge (in a switch namespace)
    node3 10.20.0.3                    │
    client 10.20.0.100 ────────────────┘

Service `web` publishes 30080 with `traffic_policy: local`. Each task's server
answers with the peer address its accept() returned, so the test reads what the
task saw. Every node runs `--lb-healthz <its address>` (port 10256). The agents
run as root, so the userspace proxy connects transparently (from the client's
address: lb/userspace/transparent.py).

- through node 1, every connection lands on node 1's own tasks, and each task
  saw the client's own address (10.20.0.100), not a node's: no SNAT;
- through node 3 (no task) the connection is refused;
- `GET /v1/lb/healthz/web` (curl, from the client, no credentials) is 200 on
  nodes 1 and 2, 503 on node 3; once node 1's last task fails its health check,
  node 1 answers 503 (the time is printed) while node 2 stays 200.

Parametrized by backend: `nftables` (when `lb.nft` is in the build) and
`userspace`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import NetnsAgent, require_tools
from tests.helpers.echo import EchoServer
from tests.helpers.netns import Lab, Netns

pytestmark = [pytest.mark.root, pytest.mark.slow]

SUBNET = "10.20.0"
NODES = (f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.3")
CLIENT = f"{SUBNET}.100"
TASKS = ((0, f"{SUBNET}.11"), (0, f"{SUBNET}.12"), (1, f"{SUBNET}.21"))  # (node, address)
TASK_PORT = 9000
HEALTH_PORT = 9100
PUBLISHED = 30080
HEALTHZ_PORT = 10256
HEALTH_INTERVAL = 0.5
CONNECTIONS = 40
SLACK = 20.0  # seconds any convergence may take before the test gives up


def backends() -> list[Any]:
    nft_missing = importlib.util.find_spec("lb.nft") is None
    return [
        pytest.param(
            "nftables",
            marks=pytest.mark.skipif(
                nft_missing, reason="lb.nft (the nftables backend) is not part of this build"
            ),
        ),
        "userspace",
    ]


class PeerServer:
    """A task's server that says its own name and the peer address accept() gave it."""

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self.peers: Counter[str] = Counter()
        sock.listen(128)
        sock.settimeout(0.2)
        self.sock = sock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers[peer[0]] += 1
            with contextlib.suppress(OSError), conn:
                conn.sendall(f"{self.name} {peer[0]}\n".encode())

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        self._thread.join(2)


@dataclass
class Mesh:
    backend: str
    nodes: list[Netns]
    client: Netns
    agents: list[NetnsAgent]
    servers: list[PeerServer] = field(default_factory=list)
    health: list[EchoServer] = field(default_factory=list)


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
    for ns in nodes:
        ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    return nodes, client


def bound_socket(address: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    return sock


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
    require_tools("curl")
    backend: str = request.param
    with Lab("mptp") as lab:
        nodes, client = build_topology(lab)
        root: Path = tmp_path_factory.mktemp(f"policy-{backend}")
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
                    "--lb-healthz",
                    NODES[i],
                    *(["--join", f"{NODES[0]}:7946"] if i else []),
                ],
            )
            for i, ns in enumerate(nodes)
        ]
        made = Mesh(backend, nodes, client, agents)
        try:
            for agent in agents:
                agent.start()
            for node, address in TASKS:
                ns = nodes[node]
                made.servers.append(
                    PeerServer(f"{address}:{TASK_PORT}", ns.call(bound_socket, address, TASK_PORT))
                )
                made.health.append(
                    EchoServer(address, HEALTH_PORT, ns.call(bound_socket, address, HEALTH_PORT))
                )
            yield made
        finally:
            for agent in agents:
                agent.shutdown()
            for server in made.servers:
                server.close()
            for health in made.health:
                health.close()


def ask(address: str, port: int) -> str | None:
    """One connection: the task's line (`name peer`), or None when refused or cut."""
    try:
        with socket.create_connection((address, port), timeout=3) as sock:
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(256)
                if not chunk:
                    return None
                data += chunk
            return data.decode().strip()
    except OSError:
        return None


def healthz(mesh: Mesh, node: int) -> int:
    """The status code of the node's health listener, asked by curl from the client."""
    done = mesh.client.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "3",
            f"http://{NODES[node]}:{HEALTHZ_PORT}/v1/lb/healthz/web",
        ],
        check=False,
    )
    return int(done.stdout or 0)


def local_reals(agent: NetnsAgent) -> dict[str, int] | None:
    for service in agent.api_ok("GET", "/v1/lb")["services"]:
        if service["port"] == PUBLISHED and service["address"] == "0.0.0.0":
            assert service["traffic_policy"] == "local"
            return {f"{r['address']}:{r['port']}": r["weight"] for r in service["reals"]}
    return None


def test_local_traffic_policy_keeps_the_client_address_and_healthz_flips(mesh: Mesh) -> None:
    agents = mesh.agents
    wait_for(
        lambda: all(len(a.api_ok("GET", "/v1/members")) == 3 for a in agents),
        "three members everywhere",
    )
    created = agents[0].api_ok(
        "POST",
        "/v1/services",
        {
            "name": "web",
            "ports": [
                {"target_port": TASK_PORT, "published_port": PUBLISHED, "traffic_policy": "local"}
            ],
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
    assert created["ports"][0]["traffic_policy"] == "local"
    wait_for(
        lambda: all(a.request("GET", "/v1/services/web")[0] == 200 for a in agents),
        "the service on every node",
    )
    for node, address in TASKS:
        agents[node].api_ok("POST", "/v1/services/web/tasks", {"address": address}, 201)
    names = [s.name for s in mesh.servers]
    wait_for(lambda: local_reals(agents[0]) == {n: 1 for n in names[:2]}, "node 1's own tasks")
    wait_for(lambda: local_reals(agents[1]) == {names[2]: 1}, "node 2's own task")
    wait_for(lambda: local_reals(agents[2]) == {}, "node 3: the port, with no task")
    wait_for(lambda: len(agents[2].api_ok("GET", "/v1/tasks")) == 3, "every task on node 3")

    # Through node 1: its own tasks only, each seeing the client's own address.
    through1 = Counter(mesh.client.call(ask, NODES[0], PUBLISHED) for _ in range(CONNECTIONS))
    through2 = Counter(mesh.client.call(ask, NODES[1], PUBLISHED) for _ in range(10))
    print(f"\n[{mesh.backend}] through node 1: {dict(through1)}; through node 2: {dict(through2)}")
    assert {line.split()[0] for line in through1 if line} == set(names[:2]), through1
    assert {line.split()[0] for line in through2 if line} == {names[2]}, through2
    assert None not in through1 and None not in through2
    # What the servers' accept() returned: the client's own address, never a node's
    # (nftables: no SNAT; userspace: a transparent connect from the client's address).
    peers = {peer for s in mesh.servers for peer in s.peers}
    print(f"[{mesh.backend}] the tasks' accept() saw {sorted(peers)}")
    assert peers == {CLIENT}
    assert agents[0].api_ok("GET", "/v1/services/web")["problems"] == []

    # Through node 3 (no task of its own): refused, none forwarded.
    started = time.monotonic()
    through3 = [mesh.client.call(ask, NODES[2], PUBLISHED) for _ in range(5)]
    took = (time.monotonic() - started) / 5
    print(f"[{mesh.backend}] through node 3: {through3}, {took * 1000:.1f} ms per refusal")
    assert through3 == [None] * 5
    assert took < 2.5, "a refusal should be immediate (RST or ICMP), not a timeout"

    # The health check, for an external load balancer: no credentials, from outside.
    assert [healthz(mesh, n) for n in range(3)] == [200, 200, 503]
    status, body = agents[0].request("GET", "/v1/lb/healthz/web")
    assert status == 200 and body["local_healthy_tasks"] == 2, body

    # Node 1's tasks fail one by one: it serves while one is left, then flips to 503.
    mesh.health[0].close()
    wait_for(lambda: local_reals(agents[0]) == {names[1]: 1}, "node 1 dropping its first task")
    assert healthz(mesh, 0) == 200
    started = time.monotonic()
    mesh.health[1].close()
    took = wait_for(lambda: healthz(mesh, 0) == 503, "node 1's healthz to flip")
    print(
        f"[{mesh.backend}] node 1's healthz flipped to 503 {took:.2f} s after its last task's "
        f"health listener stopped (health interval {HEALTH_INTERVAL} s)"
    )
    assert [healthz(mesh, n) for n in range(3)] == [503, 200, 503]
    assert mesh.client.call(ask, NODES[0], PUBLISHED) is None  # node 1 now refuses
    status, body = agents[0].request("GET", "/v1/lb/healthz/web")
    assert status == 503 and body["serving"] is False, body
    stats = agents[0].api_ok("GET", "/v1/lb")["healthz"]
    print(f"[{mesh.backend}] node 1's health listener: {stats}")
    assert stats["requests"] >= 3 and stats["refused_busy"] == 0
    if mesh.backend == "userspace":
        # the transparent return path was made in node 1 and goes with its agent
        node1 = mesh.nodes[0]
        assert "lookup 28016" in node1.run(["ip", "rule"]).stdout
        assert "meshplane_tproxy" in node1.run(["nft", "list", "tables"]).stdout
        agents[0].shutdown()
        assert "lookup 28016" not in node1.run(["ip", "rule"]).stdout
        assert "meshplane_tproxy" not in node1.run(["nft", "list", "tables"]).stdout
        assert "28016" not in node1.run(["ip", "route", "show", "table", "all"]).stdout

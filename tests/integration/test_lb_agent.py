"""The agent's L4 load balancer (userspace backend) on loopback: real agents, real task
servers, real connections; `GET /v1/lb` and `mesh lb` show what is programmed."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.agent import REPO, AgentProcess, free_port, gossip_cluster
from tests.helpers.echo import EchoServer, hello

TASK_PORT = 9000


@pytest.fixture
def net() -> str:
    """A /24 of loopback of this test's own: publish address .1, task servers .101+."""
    return f"127.{random.randint(100, 250)}.{random.randint(1, 250)}"


@pytest.fixture
def servers(net: str) -> Iterator[Callable[[int], EchoServer]]:
    made: list[EchoServer] = []

    def serve(index: int) -> EchoServer:
        server = EchoServer(f"{net}.{100 + index}", TASK_PORT)
        made.append(server)
        return server

    yield serve
    for server in made:
        server.close()


def wait_for(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def lb_table(agent: AgentProcess) -> dict[tuple[str, str, int], dict[str, int]]:
    status, body = agent.request("GET", "/v1/lb")
    assert status == 200, body
    return {
        (s["protocol"], s["address"], s["port"]): {
            f"{r['address']}:{r['port']}": r["weight"] for r in s["reals"]
        }
        for s in body["services"]
    }


def mesh_cli(agent: AgentProcess, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mesh", *args, "--api", agent.api],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def add_web(agent: AgentProcess, published: int, **extra: object) -> dict[str, object]:
    status, _ = agent.request("POST", "/v1/networks", {"name": "front"})
    assert status == 201
    status, service = agent.request(
        "POST",
        "/v1/services",
        {
            "name": "web",
            "networks": ["front"],
            "ports": [{"target_port": 80, "published_port": published}],
            **extra,
        },
    )
    assert status == 201, service
    assert isinstance(service, dict)
    return service


def add_task(agent: AgentProcess, address: str) -> str:
    status, task = agent.request(
        "POST", "/v1/services/web/tasks", {"address": address, "ports": {"80": TASK_PORT}}
    )
    assert status == 201, task
    return str(task["id"])


def test_published_port_and_vips_follow_task_health(
    start_agent: Callable[..., AgentProcess],
    net: str,
    servers: Callable[[int], EchoServer],
) -> None:
    publish = f"{net}.1"
    agent = start_agent(extra=["--publish-address", publish])
    body = agent.request("GET", "/v1/lb")[1]
    assert body["backend"] == "userspace" and body["services"] == []
    published = free_port()
    service = add_web(agent, published)
    vips = {v["network"]: v["address"] for v in service["vips"]}  # type: ignore[attr-defined]
    one, two = servers(1), servers(2)
    ids = [add_task(agent, one.address), add_task(agent, two.address)]
    reals = {one.name: 1, two.name: 1}
    wait_for(
        lambda: lb_table(agent).get(("tcp", "0.0.0.0", published)) == reals,
        what="both tasks in the table",
    )
    table = lb_table(agent)
    assert table[("tcp", vips["front"], 80)] == reals
    assert table[("tcp", vips["ingress"], 80)] == reals

    spread = Counter(hello(publish, published) for _ in range(20))
    assert spread == {one.name: 10, two.name: 10}
    assert Counter(hello(vips["front"], 80) for _ in range(4)) == {one.name: 2, two.name: 2}

    # `mesh lb` prints it as ipvsadm -Ln does, `--json` as the API answers
    text = mesh_cli(agent, "lb")
    assert f"TCP  0.0.0.0:{published} rr" in text
    assert f"  -> {one.name}  weight 1" in text
    assert json.loads(mesh_cli(agent, "lb", "--json"))["backend"] == "userspace"

    # unhealthy: out of the table, no new connection reaches it
    assert agent.request("PUT", f"/v1/tasks/{ids[0]}/health", {"status": "unhealthy"})[0] == 200
    wait_for(
        lambda: lb_table(agent)[("tcp", "0.0.0.0", published)] == {two.name: 1},
        what="the unhealthy task out",
    )
    assert set(hello(publish, published) for _ in range(6)) == {two.name}

    # removed (drained, then gone): the table empties; the port still listens, but with
    # no task left a connection is closed at once
    assert agent.request("DELETE", f"/v1/tasks/{ids[1]}")[0] == 202
    wait_for(
        lambda: lb_table(agent)[("tcp", "0.0.0.0", published)] == {},
        what="the drained task removed",
    )
    assert hello(publish, published) is None

    agent.stop()
    assert hello(publish, published, timeout=1) is None  # the listener went with the agent


def test_proxy_protocol_label_is_honoured(
    start_agent: Callable[..., AgentProcess], net: str, servers: Callable[[int], EchoServer]
) -> None:
    publish = f"{net}.1"
    agent = start_agent(extra=["--publish-address", publish])
    published = free_port()
    add_web(agent, published, labels={"mesh.lb.proxy_protocol": "v2", "mesh.lb.scheduler": "lc"})
    server = servers(1)
    add_task(agent, server.address)
    wait_for(
        lambda: bool(lb_table(agent).get(("tcp", "0.0.0.0", published))),
        what="the task in the table",
    )
    body = agent.request("GET", "/v1/lb")[1]
    entry = next(s for s in body["services"] if s["port"] == published)
    assert entry["scheduler"] == "lc" and entry["proxy_protocol"] is True
    # The echo server echoes the header back after its greeting: the proxy sent one.
    with socket.create_connection((publish, published), timeout=3) as sock:
        data = b""
        while len(data) < len(server.name) + 1 + 28:
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
    assert b"\r\n\r\n\x00\r\nQUIT\n" in data


def test_a_port_the_backend_cannot_take_is_logged_and_counted_not_fatal(
    start_agent: Callable[..., AgentProcess], net: str, servers: Callable[[int], EchoServer]
) -> None:
    publish = f"{net}.1"
    agent = start_agent(extra=["--publish-address", publish])
    squatter = socket.socket()  # someone else holds the port (without SO_REUSEPORT)
    squatter.bind((publish, 0))
    squatter.listen(1)
    try:
        add_web(agent, squatter.getsockname()[1])
        add_task(agent, servers(1).address)
        wait_for(
            lambda: agent.request("GET", "/v1/lb")[1]["errors"] >= 1,
            what="the refused listener counted",
        )
        assert "lb_backend_error" in agent.log()
        port = squatter.getsockname()[1]
        unbound = agent.request("GET", "/v1/lb")[1]["unbound"]
        assert list(unbound) == [f"tcp/0.0.0.0:{port}"], unbound
        assert f"not programmed: tcp/0.0.0.0:{port}: cannot listen" in mesh_cli(agent, "lb")
        assert agent.request("GET", "/v1/health")[0] == 200
        vip = agent.request("GET", "/v1/services/web")[1]["vips"][0]["address"]
        assert hello(vip, 80) == f"{net}.101:{TASK_PORT}"  # the VIP serves all the same
    finally:
        squatter.close()
    # The port is free now: a retry (1 s, 2 s, 4 s ... after the failure) takes it.
    wait_for(
        lambda: agent.request("GET", "/v1/lb")[1]["unbound"] == {},
        timeout=20,
        what="the freed port listened on after a retry",
    )
    assert agent.request("GET", "/v1/lb")[1]["unbound_rebound"] == 1
    assert hello(publish, port) == f"{net}.101:{TASK_PORT}"
    assert f"event=lb_listening_after_retry key=tcp/0.0.0.0:{port}" in agent.log()


@pytest.mark.skipif(os.path.exists("/proc/net/ip_vs"), reason="this kernel has ip_vs")
def test_asking_for_ipvs_without_ip_vs_is_a_clear_error(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "data", extra=["--lb", "ipvs"])
    with pytest.raises(RuntimeError, match="agent exited"):
        agent.start(timeout=15)
    assert "event=agent_start_failed" in agent.log()
    # (modprobe may load ip_vs meanwhile: then the missing lb.ipvs is the reason)
    assert (
        "--lb ipvs: this kernel has no ip_vs" in agent.log()
        or "lb.ipvs is not part of this build" in agent.log()
    )
    assert "Traceback" not in agent.log()


def test_routing_mesh_across_three_agents(
    tmp_path: Path, net: str, servers: Callable[[int], EchoServer]
) -> None:
    """Tasks registered on agents 1 and 2 answer on agent 3's published port."""
    with gossip_cluster(tmp_path, 3) as agents:
        published = free_port()
        add_web(agents[0], published)
        wait_for(
            lambda: all(a.request("GET", "/v1/services/web")[0] == 200 for a in agents),
            timeout=20,
            what="the service gossiped to every agent",
        )
        tasks = [(agents[0], servers(1)), (agents[1], servers(2)), (agents[1], servers(3))]
        for agent, server in tasks:
            status, body = agent.request(
                "POST",
                "/v1/services/web/tasks",
                {"address": server.address, "ports": {"80": TASK_PORT}},
            )
            assert status == 201, body
        names = {server.name for _, server in tasks}
        third = agents[2]
        wait_for(
            lambda: set(lb_table(third).get(("tcp", "0.0.0.0", published), {})) == names,
            timeout=20,
            what="every task in agent 3's table",
        )
        address = third.publish_address
        spread = Counter(hello(address, published) for _ in range(30))
        assert spread == {name: 10 for name in names}, spread
        # and every agent answers on its own publish address
        for agent in agents[:2]:
            assert hello(agent.publish_address, published) in names


def lb_series(agent: AgentProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The L4 families per service of a `GET /metrics` scrape, parsed by prometheus_client."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{agent.api}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("meshplane_lb_service_")
    }


def test_metrics_count_each_services_connections_and_bytes(
    start_agent: Callable[..., AgentProcess], net: str, servers: Callable[[int], EchoServer]
) -> None:
    """Real connections through a published port and a VIP; the scrape's counters per
    service are what was sent: connections exactly, bytes each way, the ones held open,
    the connects to a task that refuses them (and the failovers past it)."""
    publish = f"{net}.1"
    agent = start_agent(extra=["--publish-address", publish])
    published = free_port()
    service = add_web(agent, published)
    vip = next(v["address"] for v in service["vips"] if v["network"] == "front")  # type: ignore[attr-defined]
    one, two = servers(1), servers(2)
    add_task(agent, one.address)
    add_task(agent, two.address)
    add_task(agent, f"{net}.103")  # nobody listens there: every connect to it is refused
    wait_for(
        lambda: len(lb_table(agent).get(("tcp", "0.0.0.0", published), {})) == 3,
        what="the tasks in the table",
    )
    payload = bytes(range(256)) * 40  # 10,240 bytes each way per connection
    sent_in = sent_out = 0

    def exchange(address: str, port: int) -> socket.socket:
        nonlocal sent_in, sent_out
        sock = socket.create_connection((address, port), timeout=5)
        greeting = b""
        while not greeting.endswith(b"\n"):
            chunk = sock.recv(256)
            assert chunk, "closed before the greeting"
            greeting += chunk
        sock.sendall(payload)
        echoed = 0
        while echoed < len(payload):
            chunk = sock.recv(65536)
            assert chunk, "closed before the echo"
            echoed += len(chunk)
        sent_in += len(payload)
        sent_out += len(greeting) + echoed
        return sock

    connections = 0
    started = time.monotonic()
    for i in range(60):
        exchange(*((publish, published) if i % 2 else (vip, 80))).close()
        connections += 1
    held = [exchange(publish, published) for _ in range(3)]
    connections += len(held)
    print(f"{connections} connections exchanged in {time.monotonic() - started:.2f} s")
    web = (("backend", "userspace"), ("service", "web"))
    web_in = (web[0], ("direction", "in"), web[1])
    web_out = (web[0], ("direction", "out"), web[1])
    try:
        wait_for(
            lambda: lb_series(agent).get(("meshplane_lb_service_bytes_total", web_out)) == sent_out,
            what="the scrape to show every byte",
        )
        series = lb_series(agent)
        print({name: value for (name, _), value in series.items()})
        assert series[("meshplane_lb_service_connections_total", web)] == connections
        bytes_in = series[("meshplane_lb_service_bytes_total", web_in)]
        assert abs(bytes_in - sent_in) <= sent_in / 100, (bytes_in, sent_in)
        assert series[("meshplane_lb_service_active_connections", web)] == len(held)
        errors = series[("meshplane_lb_service_connect_errors_total", web)]
        assert errors >= 1 and series[("meshplane_lb_service_failovers_total", web)] == errors
    finally:
        for sock in held:
            sock.close()
    wait_for(
        lambda: lb_series(agent).get(("meshplane_lb_service_active_connections", web)) == 0,
        what="the held connections to end",
    )
    assert agent.request("DELETE", "/v1/services/web")[0] in (200, 202, 204)
    wait_for(lambda: lb_series(agent) == {}, what="the removed service's series to go")


def test_affinity_and_maglev_from_the_cli_reach_the_table(
    start_agent: Callable[..., AgentProcess], net: str, servers: Callable[[int], EchoServer]
) -> None:
    """`mesh service update --lb-algorithm maglev --affinity client-ip:60`: the labels, the
    options in `GET /v1/lb` and `mesh lb`, and one client kept on one task."""
    publish = f"{net}.1"
    agent = start_agent(extra=["--publish-address", publish])
    published = free_port()
    add_web(agent, published)
    mesh_cli(agent, "service", "update", "web", "--lb-algorithm", "maglev", "--affinity",
             "client-ip:60")  # fmt: skip
    for index in (1, 2, 3):
        add_task(agent, servers(index).address)
    wait_for(
        lambda: len(lb_table(agent).get(("tcp", "0.0.0.0", published), {})) == 3,
        what="three tasks in the table",
    )
    body = agent.request("GET", "/v1/lb")[1]
    entry = next(s for s in body["services"] if s["port"] == published)
    assert entry["scheduler"] == "mh" and entry["affinity"] == 60
    assert f"TCP  0.0.0.0:{published} mh affinity=60s" in mesh_cli(agent, "lb")
    answered = Counter(hello(publish, published) for _ in range(30))
    assert len(answered) == 1 and None not in answered, answered

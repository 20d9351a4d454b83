"""The agent's DNS server on loopback: real UDP/TCP queries, live changes, worker processes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from tests.helpers.agent import AgentProcess
from tests.helpers.dns_upstream import FakeUpstream

QUERIES = 24  # each from a fresh source port: the kernel spreads them over every process


def ask(agent: AgentProcess, name: str, qtype: str = "A", tcp: bool = False) -> DNSRecord:
    query = bytes(DNSRecord.question(name, qtype).pack())
    if tcp:
        with socket.create_connection(("127.0.0.1", agent.dns_port), timeout=5) as sock:
            sock.sendall(len(query).to_bytes(2, "big") + query)
            size = int.from_bytes(sock.recv(2), "big")
            data = b""
            while len(data) < size:
                data += sock.recv(size - len(data))
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(query, ("127.0.0.1", agent.dns_port))
            data = sock.recv(65535)
    return DNSRecord.parse(data)


def addresses(reply: DNSRecord) -> set[str]:
    return {str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A}


def setup_web(agent: AgentProcess) -> list[str]:
    assert (
        agent.request("POST", "/v1/networks", {"name": "front", "subnet": "127.80.1.0/24"})[0]
        == 201
    )
    assert (
        agent.request(
            "POST", "/v1/services", {"name": "web", "networks": ["front"], "endpoint_mode": "dnsrr"}
        )[0]
        == 201
    )
    ids = []
    for last in (1, 2, 3):
        status, task = agent.request(
            "POST", "/v1/services/web/tasks", {"address": f"127.0.0.{last}"}
        )
        assert status == 201
        ids.append(task["id"])
    return ids


def test_answers_over_udp_and_tcp_and_follows_changes(start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent()
    ids = setup_web(agent)
    assert addresses(ask(agent, "web")) == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}
    assert addresses(ask(agent, "tasks.web", tcp=True)) == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}
    assert ask(agent, "tasks.nope").header.rcode == RCODE.NXDOMAIN
    # Nothing listens upstream (the helper's 127.0.0.1:9): SERVFAIL, quickly.
    assert ask(agent, "example.com").header.rcode == RCODE.SERVFAIL
    status, _ = agent.request("PUT", f"/v1/tasks/{ids[0]}/health", {"status": "unhealthy"})
    assert status == 200
    assert addresses(ask(agent, "web")) == {"127.0.0.2", "127.0.0.3"}
    resolved = agent.request("GET", "/v1/resolve?name=tasks.web")[1]
    assert {a["data"] for a in resolved["answers"]} == {"127.0.0.2", "127.0.0.3"}
    assert agent.request("GET", "/v1/resolve?name=web&network=nope")[0] == 422


def test_workers_share_the_port_and_see_every_change(start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(extra=["--dns-workers", "2"])
    deadline = time.monotonic() + 20
    while agent.log().count("dns_worker_ready") < 2:
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.05)
    # Each process took what its start built out of the collector's full passes.
    frozen = re.findall(r"event=(\w+_ready) .*frozen_objects=(\d+)", agent.log())
    assert sorted(name for name, _ in frozen) == [
        "agent_ready",
        "dns_worker_ready",
        "dns_worker_ready",
    ]
    assert all(int(count) > 10_000 for _, count in frozen), frozen
    ids = setup_web(agent)
    for _ in range(QUERIES):
        assert addresses(ask(agent, "tasks.web")) == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}
    assert agent.request("PUT", f"/v1/tasks/{ids[1]}/health", {"status": "unhealthy"})[0] == 200
    stale = 0
    for _ in range(QUERIES):
        stale += addresses(ask(agent, "tasks.web")) != {"127.0.0.1", "127.0.0.3"}
    print(f"\n{stale} of {QUERIES} queries right after the change were stale")
    assert stale == 0

    # A worker that dies is replaced, and the new one starts from a snapshot.
    pid = int(re.findall(r"event=worker_started pool=dns index=0 pid=(\d+)", agent.log())[0])
    os.kill(pid, signal.SIGKILL)
    while agent.log().count("dns_worker_ready") < 3:
        assert time.monotonic() < deadline + 20, agent.log()
        time.sleep(0.05)
    for _ in range(QUERIES):
        assert addresses(ask(agent, "tasks.web")) == {"127.0.0.1", "127.0.0.3"}


def test_one_askers_queries_are_shared_by_every_process(start_agent) -> None:  # type: ignore[no-untyped-def]
    """Issue 20: one busy asker (one source port) is answered by the agent and its worker.

    Each process serves a dnsrr name's rotations in turn from its own cache, so
    from one process alone the orders repeat with the rotation's period; from
    two, picked at random per query (`dns.reuseport`), they do not.
    """
    agent = start_agent(extra=["--dns-workers", "1"])
    deadline = time.monotonic() + 20
    while agent.log().count("dns_worker_ready") < 1:
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.05)
    setup_web(agent)
    query = bytes(DNSRecord.question("tasks.web", "A").pack())
    orders = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for _ in range(60):
            sock.sendto(query, ("127.0.0.1", agent.dns_port))
            reply = DNSRecord.parse(sock.recv(65535))
            orders.append(tuple(str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A))
    assert all(sorted(order) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"] for order in orders)
    breaks = sum(orders[i + 3] != orders[i] for i in range(len(orders) - 3))
    print(f"\none source port, 60 queries: the 3-order rotation broke {breaks} times")
    assert breaks > 0  # one process alone never breaks it: the hash sends it everything


def test_dns_port_in_use_fails_the_start_clearly(tmp_path: Path) -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    agent = AgentProcess(tmp_path / "data", extra=["--dns", f"127.0.0.1:{port}"])
    try:
        with pytest.raises(RuntimeError, match="agent_start_failed"):
            agent.start()
    finally:
        holder.close()


def dig(agent: AgentProcess, *args: str) -> str:
    """dig's answer, with its comments (the header's status) and sections."""
    if shutil.which("dig") is None:
        pytest.skip("dig is not installed")
    done = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(agent.dns_port), "+time=5", "+tries=1", "+nocookie", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


def test_mesh_space_nxdomain_carries_an_soa_for_dig(start_agent) -> None:  # type: ignore[no-untyped-def]
    """Issue 14, item 5: NXDOMAIN for the mesh's own names carries the zone's SOA (RFC 2308)."""
    agent = start_agent(extra=["--dns-ttl", "7", "--dns-domain", "mesh"])
    setup_web(agent)
    expected = {
        "tasks.nope": r"nope\.\s+7\s+IN\s+SOA\s+ns\.dns\.nope\. hostmaster\.nope\. "
        r"1 7200 1800 86400 7",
        "nope.front": r"front\.\s+7\s+IN\s+SOA\s+ns\.dns\.front\. ",
        "nope.mesh": r"mesh\.\s+7\s+IN\s+SOA\s+ns\.dns\.mesh\. ",
    }
    for name, soa in expected.items():
        for transport in ("+notcp", "+tcp"):
            out = dig(agent, name, "A", transport)
            assert "status: NXDOMAIN" in out and "AUTHORITY: 1" in out, out
            assert re.search(soa, out), out
    reverse = dig(agent, "-x", "127.80.1.99")
    assert "status: NXDOMAIN" in reverse, reverse
    assert re.search(r"1\.80\.127\.in-addr\.arpa\.\s+7\s+IN\s+SOA", reverse), reverse
    nodata = dig(agent, "web", "AAAA")
    assert "status: NOERROR" in nodata and "ANSWER: 0, AUTHORITY: 1" in nodata, nodata
    found = dig(agent, "tasks.web", "A")
    assert "ANSWER: 3, AUTHORITY: 0" in found, found


def test_dead_upstream_is_skipped_and_counted_in_the_dns_stats(start_agent) -> None:  # type: ignore[no-untyped-def]
    """The helper's first upstream (127.0.0.1:9) refuses; after one try it is held down."""
    with FakeUpstream({f"n{i}.test": ["192.0.2.1"] for i in range(5)}) as upstream:
        host, port = upstream.address
        agent = start_agent(extra=["--dns-upstream", f"{host}:{port}"])
        for i in range(5):
            assert addresses(ask(agent, f"n{i}.test")) == {"192.0.2.1"}
        assert upstream.count() == 5
    stats = agent.request("GET", "/v1/dns")[1]["stats"]
    print({k: v for k, v in stats.items() if k.startswith("forwarder_upstream")})
    assert stats["forwarder_upstream_errors"] == 1
    assert (stats["forwarder_upstream_skipped"], stats["forwarder_upstream_backoffs"]) == (4, 1)
    assert stats["forwarder_upstreams_down"] == 1


def start_dnsmasq(upstream_port: int, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """dnsmasq on a free port of 127.0.0.1, forwarding to the agent, once it answers.

    The port is probed free for UDP, but dnsmasq also needs it for TCP and another
    process may take it meanwhile: then dnsmasq exits, and a fresh port is tried.
    """
    for _ in range(5):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        resolver = subprocess.Popen(
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-hosts",
                "--no-resolv",
                f"--server=127.0.0.1#{upstream_port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                f"--port={port}",
                "--pid-file=",
                "--user=root",
                "--log-queries",
                f"--log-facility={log}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while resolver.poll() is None and time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.2),
            ):
                return resolver, port  # listening (TCP is bound after UDP)
            time.sleep(0.05)
        resolver.terminate()
        resolver.wait(10)
    pytest.fail("dnsmasq did not start on any of 5 free ports")


def test_a_caching_resolver_keeps_the_mesh_nxdomain(start_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """dnsmasq in front of the agent caches the NXDOMAIN (it needs the SOA to, RFC 2308 §5)."""
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed")
    agent = start_agent()
    log = tmp_path / "dnsmasq.log"
    resolver, port = start_dnsmasq(agent.dns_port, log)
    try:
        outputs = []
        for _ in range(3):
            done = subprocess.run(
                ["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=3", "tasks.nope", "A"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            outputs.append(done.stdout)
        assert all("status: NXDOMAIN" in out for out in outputs), outputs
        deadline = time.monotonic() + 5
        while log.read_text().count("tasks.nope") < 6 and time.monotonic() < deadline:
            time.sleep(0.05)  # dnsmasq writes its log asynchronously
        lines = [line for line in log.read_text().splitlines() if "tasks.nope" in line]
        print("\n".join(lines))
        assert sum("forwarded tasks.nope" in line for line in lines) == 1, lines
        assert sum("cached tasks.nope is NXDOMAIN" in line for line in lines) == 2, lines
    finally:
        resolver.terminate()
        resolver.wait(10)

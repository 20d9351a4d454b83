"""The agent's DNS server on loopback: real UDP/TCP queries, live changes, worker processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from tests.helpers.agent import AgentProcess

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
    assert agent.request("POST", "/v1/networks", {"name": "front",
                                                  "subnet": "127.80.1.0/24"})[0] == 201
    assert agent.request("POST", "/v1/services", {"name": "web", "networks": ["front"],
                                                  "endpoint_mode": "dnsrr"})[0] == 201
    ids = []
    for last in (1, 2, 3):
        status, task = agent.request("POST", "/v1/services/web/tasks",
                                     {"address": f"127.0.0.{last}"})
        assert status == 201
        ids.append(task["id"])
    return ids


def test_answers_over_udp_and_tcp_and_follows_changes(start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent()
    ids = setup_web(agent)
    assert addresses(ask(agent, "web")) == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}
    assert addresses(ask(agent, "tasks.web", tcp=True)) == {"127.0.0.1", "127.0.0.2",
                                                            "127.0.0.3"}
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
    ids = setup_web(agent)
    for _ in range(QUERIES):
        assert addresses(ask(agent, "tasks.web")) == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}
    assert agent.request("PUT", f"/v1/tasks/{ids[1]}/health",
                         {"status": "unhealthy"})[0] == 200
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

"""Access logs of the HTTP routing mesh with a real agent, real backends and real requests:
every request a JSON line at rate 1 (from two worker processes into one file), about
N*r lines at rate r, and the Combined Log Format parsed by a regex."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import socket
import threading
import time
from pathlib import Path

from tests.helpers.agent import AgentProcess, free_port
from tests.helpers.echo import EchoServer, hello
from tests.helpers.http_backend import BackendProcess

CLF = re.compile(
    r"^(?P<client>\S+) - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/1\.[01]" (?P<status>\d{3}) (?P<bytes>\d+|-) '
    r'"[^"]*" "[^"]*"$'
)


def _service(agent: AgentProcess, host: str, ports: list[int]) -> set[str]:
    """A routed service with a task per backend port; returns the tasks' ids."""
    status, body = agent.request(
        "POST",
        "/v1/services",
        {"name": "web", "labels": {"mesh.http.hosts": host, "mesh.http.port": "80"}},
    )
    assert status == 201, body
    ids = set()
    for port in ports:
        status, body = agent.request(
            "POST", "/v1/services/web/tasks", {"address": "127.0.0.1", "ports": {"80": port}}
        )
        assert status == 201, body
        ids.add(body["id"])
    return ids


def _send(port: int, host: str, count: int) -> None:
    """`count` requests on a few kept-alive connections (so both workers take some)."""
    sent = 0
    while sent < count:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(min(25, count - sent)):
            conn.request("GET", f"/whoami?n={sent}", headers={"Host": host})
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 200
            sent += 1
        conn.close()


def _lines(path: Path, want: int, timeout: float = 10.0) -> list[str]:
    """The log's lines once it holds `want` (or once nothing was added for a second)."""
    deadline = time.monotonic() + timeout
    seen, still = -1, time.monotonic()
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= want:
            return lines
        if len(lines) != seen:
            seen, still = len(lines), time.monotonic()
        elif time.monotonic() - still > 1.0 and seen > 0:
            return lines
        time.sleep(0.1)
    return path.read_text().splitlines() if path.exists() else []


def test_every_request_is_a_json_line_from_each_worker(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    backend = BackendProcess({"t0": str(ports[0]), "t1": str(ports[1])}, tmp_path / "b.log")
    backend.start()
    log_path = tmp_path / "access.log"
    agent = AgentProcess(
        tmp_path / "agent",
        extra=["--http-workers", "2", "--access-log", str(log_path), "--access-log-sample", "1"],
    )
    agent.start()
    try:
        tasks = _service(agent, "web.test", ports)
        time.sleep(1.0)  # the workers follow the feed
        count = 300
        started = time.monotonic()
        _send(agent.http_port, "web.test", count)
        took = time.monotonic() - started
        lines = _lines(log_path, count)
        print(f"{count} requests in {took:.2f} s; {len(lines)} access-log lines")
        entries = [json.loads(line) for line in lines]  # every line whole JSON
        assert len(entries) == count
        assert sorted(int(e["path"] == "/whoami") for e in entries) == [1] * count
        assert {e["method"] for e in entries} == {"GET"}
        assert {e["host"] for e in entries} == {"web.test"}
        assert {e["status"] for e in entries} == {200}
        assert {e["service"] for e in entries} == {"web"}
        assert {e["task"] for e in entries} <= tasks and len({e["task"] for e in entries}) == 2
        assert all(e["bytes"] > 0 and e["duration_ms"] >= 0 for e in entries)
        assert all(e["client"] == "127.0.0.1" for e in entries)
        # Two worker processes wrote into the one file (their counters come with their
        # periodic reports).
        deadline = time.monotonic() + 10
        while True:
            status, stats = agent.request("GET", "/v1/http")
            if stats.get("access_log_written") == count or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        print("HRM access-log counters:", {k: v for k, v in stats.items() if "access" in k})
        assert status == 200 and stats["workers"] == 2
        assert stats["access_log_written"] == count and stats["access_log_dropped"] == 0
    finally:
        agent.stop()
        backend.stop()


def test_sampled_lines_in_the_combined_log_format(tmp_path: Path) -> None:
    port = free_port()
    backend = BackendProcess({"t0": str(port)}, tmp_path / "b.log").start()
    log_path = tmp_path / "access.log"
    agent = AgentProcess(
        tmp_path / "agent",
        extra=[
            "--access-log",
            str(log_path),
            "--access-log-sample",
            "0.3",
            "--access-log-format",
            "clf",
        ],
    )
    agent.start()
    try:
        _service(agent, "clf.test", [port])
        count = 400
        _send(agent.http_port, "clf.test", count)
        lines = _lines(log_path, count)
        print(f"rate 0.3: {len(lines)} of {count} requests logged (expected about 120)")
        assert 60 <= len(lines) <= 180
        for line in lines:
            match = CLF.match(line)
            assert match, line
            assert match["method"] == "GET" and match["status"] == "200"
            assert match["path"] == "/whoami" and match["client"] == "127.0.0.1"
    finally:
        agent.stop()
        backend.stop()


def test_l4_connections_are_logged_when_they_end(tmp_path: Path) -> None:
    net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}"
    log_path = tmp_path / "access.log"
    agent = AgentProcess(
        tmp_path / "agent",
        publish_address=f"{net}.1",
        extra=["--access-log", str(log_path), "--access-log-sample", "1"],
    )
    agent.start()
    servers = [EchoServer(f"{net}.{101 + i}", 9000) for i in range(2)]
    try:
        assert agent.request("POST", "/v1/networks", {"name": "front"})[0] == 201
        published = free_port()
        status, body = agent.request(
            "POST",
            "/v1/services",
            {
                "name": "tcpweb",
                "networks": ["front"],
                "ports": [{"target_port": 80, "published_port": published}],
            },
        )
        assert status == 201, body
        for server in servers:
            status, body = agent.request(
                "POST",
                "/v1/services/tcpweb/tasks",
                {"address": server.address, "ports": {"80": 9000}},
            )
            assert status == 201, body
        deadline = time.monotonic() + 10
        while hello(f"{net}.1", published) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        count = 20
        answers = [hello(f"{net}.1", published) for _ in range(count)]
        assert None not in answers
        lines = _lines(log_path, count + 1)
        entries = [json.loads(line) for line in lines]
        # (connections made while the table was still empty have no backend: "-")
        ours = [
            e
            for e in entries
            if e["kind"] == "tcp" and e["service"].endswith(f":{published}") and e["backend"] != "-"
        ]
        print(f"{count + 1}+ connections, {len(ours)} L4 access-log lines; e.g. {ours[-1]}")
        assert len(ours) >= count + 1
        assert {e["backend"] for e in ours} == {s.name for s in servers}
        assert all(e["client"] == f"{net}.1" or e["client"].startswith("127.") for e in ours)
        assert all(e["bytes_out"] > 0 and e["duration_ms"] >= 0 for e in ours)
        status, lb = agent.request("GET", "/v1/lb")
        assert lb["stats"]["access_log_written"] >= count + 1, lb["stats"]
        assert lb["stats"]["access_log_dropped"] == 0
    finally:
        for server in servers:
            server.close()
        agent.stop()


def test_a_stuck_destination_drops_and_counts_and_never_blocks(tmp_path: Path) -> None:
    """The log is a FIFO nobody reads: the writer blocks once the pipe is full, its
    queue (8,192 entries) fills, and later entries are dropped and counted; every
    request is still answered."""
    port = free_port()
    backend = BackendProcess({"t0": str(port)}, tmp_path / "b.log").start()
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read
    agent = AgentProcess(
        tmp_path / "agent", extra=["--access-log", str(fifo), "--access-log-sample", "1"]
    )
    try:
        agent.start()
        _service(agent, "stuck.test", [port])
        count = 10_000
        started = time.monotonic()
        _send(agent.http_port, "stuck.test", count)  # asserts every answer is 200
        took = time.monotonic() - started
        status, stats = agent.request("GET", "/v1/http")
        counters = {k: v for k, v in stats.items() if k.startswith("access")}
        print(f"{count} requests in {took:.2f} s with the log stuck; {counters}")
        assert status == 200 and stats["requests"] >= count
        assert stats["access_log_dropped"] >= count - 8192 - 1000  # 64 KiB of pipe at most
        assert took < 120  # generous: what matters is that it ended
    finally:
        agent.stop()
        backend.stop()
        os.close(reader)


def test_udp_flows_are_logged_when_they_end(tmp_path: Path) -> None:
    net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}"
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((f"{net}.101", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(2048)
            except TimeoutError:
                continue
            server.sendto(data.upper(), peer)

    echoing = threading.Thread(target=echo, daemon=True)
    echoing.start()
    log_path = tmp_path / "access.log"
    agent = AgentProcess(
        tmp_path / "agent",
        publish_address=f"{net}.1",
        extra=["--access-log", str(log_path), "--access-log-sample", "1"],
    )
    agent.start()
    try:
        assert agent.request("POST", "/v1/networks", {"name": "front"})[0] == 201
        published = free_port()
        status, body = agent.request(
            "POST",
            "/v1/services",
            {
                "name": "udpecho",
                "networks": ["front"],
                "ports": [{"target_port": 53, "published_port": published, "protocol": "udp"}],
            },
        )
        assert status == 201, body
        status, body = agent.request(
            "POST",
            "/v1/services/udpecho/tasks",
            {"address": f"{net}.101", "ports": {"53": server.getsockname()[1]}},
        )
        assert status == 201, body
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(0.5)
            deadline = time.monotonic() + 10
            answered = 0
            while answered < 5 and time.monotonic() < deadline:
                client.sendto(b"hello", (f"{net}.1", published))
                try:
                    answered += client.recv(100) == b"HELLO"
                except TimeoutError:
                    continue
            assert answered == 5
        agent.stop()  # flows end when the proxy closes (else after 30 s idle)
        entries = [json.loads(line) for line in log_path.read_text().splitlines()]
        flows = [e for e in entries if e["kind"] == "udp"]
        print("UDP flows logged:", flows)
        assert len(flows) == 1
        [flow] = flows
        assert flow["service"] == f"udp/0.0.0.0:{published}"
        assert flow["backend"] == f"{net}.101:{server.getsockname()[1]}"
        assert flow["bytes_out"] == 25 and flow["bytes_in"] >= 25  # retries may add some
    finally:
        stop.set()
        agent.stop()
        echoing.join(5)
        server.close()

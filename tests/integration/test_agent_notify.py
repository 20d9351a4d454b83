"""`Type=notify` against the agent itself: the test binds the NOTIFY_SOCKET systemd would.

No systemd runs as PID 1 here, so the protocol is checked from the other end:
READY=1 arrives only once the API answers, WATCHDOG=1 at half of WATCHDOG_USEC,
STOPPING=1 on SIGTERM, and a failed start says why and never READY=1.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.agent import REPO, AgentProcess


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    yield sock, path
    sock.close()


def spawn(agent: AgentProcess, notify: str, **extra: str) -> None:
    """Start the agent as systemd would: NOTIFY_SOCKET (and WATCHDOG_USEC) set, no wait."""
    env = dict(os.environ, PYTHONPATH=str(REPO), NOTIFY_SOCKET=notify, **extra)
    with agent.log_path.open("ab") as log:
        agent.proc = subprocess.Popen(
            agent.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )


def receive(sock: socket.socket, timeout: float) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


def test_ready_once_serving_watchdog_pings_and_stopping_on_sigterm(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    agent = AgentProcess(tmp_path / "data")
    started = time.monotonic()
    spawn(agent, path, WATCHDOG_USEC="1000000")
    try:
        first = receive(sock, 30)
        ready_after = time.monotonic() - started
        # The first word is READY=1, and the API answers at that moment.
        assert first.splitlines()[0] == "READY=1", first
        assert f"MAINPID={agent.proc.pid}" in first.splitlines()  # type: ignore[union-attr]
        status, body = agent.request("GET", "/v1/health", timeout=2)
        assert status == 200, body
        # WATCHDOG=1 every 0.5 s (half of 1 s): count the pings of 3 s.
        pings, deadline = [], time.monotonic() + 3
        while time.monotonic() < deadline:
            message = receive(sock, 2)
            assert message == "WATCHDOG=1", message
            pings.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        print(
            f"\nREADY=1 {ready_after:.2f}s after exec; {len(pings)} WATCHDOG=1 in 3 s, "
            f"largest gap {max(gaps):.2f}s"
        )
        assert len(pings) >= 3
        assert max(gaps) < 0.9  # well inside the 1 s systemd would allow
        agent.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        message = receive(sock, 10)
        while message == "WATCHDOG=1":
            message = receive(sock, 10)
        assert message.splitlines()[0] == "STOPPING=1", message
        assert agent.proc.wait(15) == 0  # type: ignore[union-attr]
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.kill()


def test_a_failed_start_says_why_and_never_ready(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    agent = AgentProcess(tmp_path / "data")
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", agent.port))
        taken.listen()
        spawn(agent, path)
        assert agent.proc is not None
        assert agent.proc.wait(30) == 1
    message = receive(sock, 2)
    print(f"\n{message}")
    assert message.startswith("STATUS=start failed: api 127.0.0.1:"), message
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)  # nothing else: no READY=1


def test_with_hrm_workers_ready_waits_until_they_answer(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """The HRM's worker processes start after the agent's own parts: READY=1 waits for
    them, so the HRM port answers at once (not refused) when READY arrives."""
    sock, path = notify_socket
    agent = AgentProcess(tmp_path / "data", extra=["--http-workers", "2"])
    started = time.monotonic()
    spawn(agent, path)
    try:
        ready = receive(sock, 60)
        took = time.monotonic() - started
        assert ready.splitlines()[0] == "READY=1", ready
        with socket.create_connection(("127.0.0.1", agent.http_port), timeout=5) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: nobody.example\r\nConnection: close\r\n\r\n")
            answer = conn.recv(64)
        print(f"\nREADY=1 {took:.2f}s after exec with 2 HRM workers; the HRM said {answer[:12]!r}")
        assert answer.startswith(b"HTTP/1.1 404"), answer
        assert "http_workers_not_ready" not in agent.log()
    finally:
        agent.stop()

"""`--http-workers N`: the router in N processes sharing the port, fed by the change feed."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.agent import AgentProcess, free_port
from tests.helpers.certs import self_signed
from tests.helpers.http_backend import BackendProcess


def listeners(port: int) -> set[int]:
    """The pids holding a listening TCP socket on the port (from ss)."""
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def status_of(port: int, host: str) -> str:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            f"Host: {host}",
            f"http://127.0.0.1:{port}/whoami",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_workers_share_the_port_and_follow_the_feed(tmp_path: Path) -> None:
    backend_port = free_port()
    backend = BackendProcess({"w0": str(backend_port)}, tmp_path / "backend.log").start()
    cert, key = self_signed(tmp_path, "late.test")
    https_port = free_port()
    agent = AgentProcess(
        tmp_path / "agent",
        extra=[
            "--http-workers",
            "2",
            "--https",
            f"127.0.0.1:{https_port}",
            "--tls-cert",
            f"late.test={cert},{key}",
        ],
    )
    agent.start()
    try:
        assert agent.proc is not None
        deadline = time.monotonic() + 20
        while len(listeners(agent.http_port)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = listeners(agent.http_port)
        assert len(pids) == 2 and agent.proc.pid not in pids, agent.log()
        # A service created after the workers started reaches them through the feed.
        assert status_of(agent.http_port, "late.test") == "404"
        status, body = agent.request(
            "POST",
            "/v1/services",
            {"name": "late", "labels": {"mesh.http.hosts": "late.test", "mesh.http.port": "80"}},
        )
        assert status == 201, body
        status, body = agent.request(
            "POST",
            "/v1/services/late/tasks",
            {"address": "127.0.0.1", "ports": {"80": backend_port}},
        )
        assert status == 201, body
        deadline = time.monotonic() + 10
        codes: list[str] = []
        while time.monotonic() < deadline:
            codes = [status_of(agent.http_port, "late.test") for _ in range(6)]
            if codes == ["200"] * 6:
                break
            time.sleep(0.1)
        assert codes == ["200"] * 6, agent.log()
        assert len(listeners(https_port)) == 2
        tls = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "5",
                "--cacert",
                str(cert),
                "--resolve",
                f"late.test:{https_port}:127.0.0.1",
                f"https://late.test:{https_port}/whoami",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert tls.returncode == 0 and '"w0"' in tls.stdout, tls.stderr
    finally:
        agent.stop()
        backend.stop()
    assert not listeners(agent.http_port)  # the workers went with the agent


def test_http_none_runs_no_router(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent", extra=["--http", "none"])
    agent.start()
    try:
        assert "event=http_listening" not in agent.log()
        assert status_of(agent.http_port, "any.test") == "000"  # nothing listens
    finally:
        agent.stop()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_port_in_use_fails_the_start_with_its_reason(tmp_path: Path, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = AgentProcess(
            tmp_path / "agent", extra=["--http", f"127.0.0.1:{port}", "--http-workers", workers]
        )
        with pytest.raises(RuntimeError, match="agent exited with 1"):
            agent.start()
        assert "event=agent_start_failed" in agent.log()
        # One line naming the role, the address and the holder (this test process).
        assert f"mesh agent: http 127.0.0.1:{port} is in use by PID {os.getpid()}" in agent.log()

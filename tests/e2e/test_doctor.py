"""`mesh doctor` on a real cluster: exit 0 when healthy; each injected fault named, exit 1.

Faults: a stopped task, a killed peer, a published port taken by another
process, a stale LB entry written into the kernel by hand (nftables).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import REPO, MeshCluster, harness, start_cluster, wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

NODES = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[MeshCluster]:
    yield from start_cluster(NODES, "auto")


def doctor(cluster: MeshCluster, node: int) -> tuple[int, list[dict[str, Any]]]:
    ns = cluster.layout.node_ns(node)
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-m",
            "mesh",
            "doctor",
            "--json",
            "--settle",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env={
            "PYTHONPATH": str(REPO),
            "MESH_API": harness.API,
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        },
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)["findings"]


def failures(findings: list[dict[str, Any]]) -> list[str]:
    return [f"{f['check']}: {f['message']}" for f in findings if f["status"] == "fail"]


@pytest.fixture(scope="module")
def web(cluster: MeshCluster) -> dict[int, dict[str, Any]]:
    cluster.mesh(1, "network", "create", "front")
    cluster.mesh(1, "service", "create", "web", "--network", "front", "--publish", "8080:80")
    tasks = {
        node: cluster.task(node, "web", 8000 + node, target=80) for node in range(1, NODES + 1)
    }
    assert (
        wait_for(lambda: all(doctor(cluster, n)[0] == 0 for n in range(1, NODES + 1)), 30, step=1)
        is not None
    )
    return tasks


def test_healthy_cluster(cluster: MeshCluster, web: dict[int, dict[str, Any]]) -> None:
    for node in range(1, NODES + 1):
        code, findings = doctor(cluster, node)
        assert code == 0, failures(findings)
        checks = {f["check"] for f in findings if f["status"] == "ok"}
        assert checks == {"api", "listen", "dns", "lb", "tasks", "gossip", "network", "routes"}, (
            findings
        )


def test_stopped_task(cluster: MeshCluster, web: dict[int, dict[str, Any]]) -> None:
    task = web[2]
    os.kill(task["pid"], signal.SIGKILL)
    code, findings = doctor(cluster, 2)
    assert code == 1
    assert any(task["name"] in m and "does not answer" in m for m in failures(findings)), failures(
        findings
    )
    print(f"\nstopped task -> {failures(findings)}")
    cluster.mesh(2, "task", "rm", task["id"])


def test_killed_peer(cluster: MeshCluster, web: dict[int, dict[str, Any]]) -> None:
    cluster.stop(3, kill=True)
    try:
        assert wait_for(lambda: cluster.members(1).get("n3") != "alive", 20) is not None
        code, findings = doctor(cluster, 1)
        assert code == 1
        assert any(m.startswith("gossip: peer n3") for m in failures(findings)), failures(findings)
        print(f"\nkilled peer -> {failures(findings)}")
    finally:
        cluster.start(3)
    assert wait_for(lambda: cluster.members(1).get("n3") == "alive", 30) is not None


def test_published_port_taken_by_another_process(
    cluster: MeshCluster, web: dict[int, dict[str, Any]]
) -> None:
    ns = cluster.layout.node_ns(1)
    squatter = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-c",
            "import socket, time; s = socket.socket(); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            "s.bind(('0.0.0.0', 9090)); s.listen(); time.sleep(120)",
        ]
    )
    try:
        time.sleep(0.5)
        cluster.mesh(1, "service", "create", "api", "--publish", "9090:80")
        code, findings = doctor(cluster, 1)
        assert code == 1
        assert any(
            "9090/tcp is held by python" in m and str(squatter.pid) in m for m in failures(findings)
        ), failures(findings)
        print(f"\nport taken -> {failures(findings)}")
    finally:
        squatter.kill()
        squatter.wait()
        cluster.mesh(1, "service", "rm", "api")


def test_stale_lb_entry_written_by_hand(
    cluster: MeshCluster, web: dict[int, dict[str, Any]]
) -> None:
    backend = cluster.api(1, "/v1/lb")["backend"]
    if backend != "nftables":
        pytest.skip(f"the hand-written entry is an nftables element; this node runs {backend}")
    # A draining real that no task stands for, as an operator's `nft add element` leaves it.
    element = "weights_tcp_any_8080 { 10.77.0.99 . 80 : 0 }"
    cluster.nft(1, f"add element ip meshplane {element}")
    try:
        code, findings = doctor(cluster, 1)
        assert code == 1
        assert any(
            "stale real server 10.77.0.99:80 under tcp/0.0.0.0:8080" in m
            for m in failures(findings)
        ), failures(findings)
        print(f"\nstale LB entry -> {failures(findings)}")
    finally:
        cluster.nft(1, f"delete element ip meshplane {element}")
    healed = wait_for(lambda: doctor(cluster, 1)[0] == 0, 30, step=1)
    assert healed is not None, failures(doctor(cluster, 1)[1])

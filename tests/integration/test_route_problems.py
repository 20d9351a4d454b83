"""Misconfiguration is loud: a real agent shows an HRM route problem everywhere it is read.

A service with a label the router cannot use gets no route; the problem shows in
`GET /v1/services[/{name}]`, as a warning from `mesh service create/update`, as a
failed `mesh doctor` check, and a request for its host is a 404 whose body names
the label and why (curl), from the agent's own router and from worker processes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess, free_port
from tests.helpers.certs import self_signed
from tests.integration.conftest import StartAgent
from tests.integration.test_cli_flow import mesh, mesh_json

BROKEN = "mesh.http.port 'x' is not a port (1-65535)"


def curl(agent: AgentProcess, host: str) -> tuple[int, str]:
    result = subprocess.run(
        [
            "curl", "-s", "--max-time", "5", "-H", f"Host: {host}",
            "-w", "\n%{http_code}", f"http://127.0.0.1:{agent.http_port}/",
        ],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    body, _, code = result.stdout.rpartition("\n")
    return int(code or 0), body


def answer_within(agent: AgentProcess, host: str, want: str, timeout: float = 5.0) -> str:
    """The router's answer for `host` once it contains `want` (workers follow the feed)."""
    started = time.monotonic()
    body = ""
    while time.monotonic() - started < timeout:
        status, body = curl(agent, host)
        if status == 404 and want in body:
            print(f"\n404 body after {time.monotonic() - started:.2f}s: {body.strip()}")
            return body
        time.sleep(0.05)
    raise AssertionError(f"no 404 naming {want!r} for {host} within {timeout}s: {body!r}")


def problems(agent: AgentProcess, name: str) -> list[dict[str, Any]]:
    status, body = agent.request("GET", f"/v1/services/{name}")
    assert status == 200, body
    return list(body["problems"])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_label_is_loud_everywhere(start_agent: StartAgent, workers: int) -> None:
    agent = start_agent(extra=["--http-workers", str(workers)])
    if workers:  # the worker froze what its start built (mesh.core.heap), tables included
        deadline = time.monotonic() + 20
        while "http_worker_ready" not in agent.log():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.05)
        assert re.search(r"event=http_worker_ready .*frozen_objects=[1-9]\d{4}", agent.log())

    created = mesh(
        agent, "service", "create", "web",
        "--label", "mesh.http.hosts=web.test", "--label", "mesh.http.port=x",
    )  # fmt: skip
    print(f"\nmesh service create: stderr: {created.stderr.strip()}")
    assert created.returncode == 0
    assert created.stderr == (
        f"mesh: warning: service web: label problem in label mesh.http.hosts: {BROKEN}\n"
    )

    body = answer_within(agent, "web.test", "mesh.http.hosts")
    assert body == (
        "404 Not Found: no service is routed for this host: service web names it, but its "
        f"label mesh.http.hosts is not used: {BROKEN}\n"
    )
    assert curl(agent, "other.test") == (
        404,
        "404 Not Found: no service is routed for this host\n",
    )  # a bare 404 only where nothing names the host

    expected = [{"kind": "label", "label": "mesh.http.hosts", "reason": BROKEN}]
    assert problems(agent, "web") == expected
    _, listed = agent.request("GET", "/v1/services")
    assert [s["problems"] for s in listed] == [expected]
    assert mesh_json(agent, "service", "inspect", "web")["problems"] == expected

    doctor = mesh(agent, "doctor", "--json", "--settle", "0", check=False)
    routes = [f for f in json.loads(doctor.stdout)["findings"] if f["check"] == "routes"]
    assert [(f["status"], f["message"]) for f in routes] == [
        ("fail", f"service web: label problem in label mesh.http.hosts: {BROKEN}")
    ]
    assert doctor.returncode == 1

    # Fixed, but to a port its task does not map: routed, and a target-port problem.
    mesh(agent, "task", "add", "web", "--address", "127.0.0.1", "--port", "80=9")
    updated = mesh(agent, "service", "update", "web", "--label-add", "mesh.http.port=8080")
    print(f"mesh service update: stderr: {updated.stderr.strip()}")
    assert "target_port problem in label mesh.http.hosts" in updated.stderr
    assert "target port 8080 is served by no task (they map 80)" in updated.stderr
    assert [p["kind"] for p in problems(agent, "web")] == ["target_port"]

    # A second service claiming the host: the older one keeps it, the new one is told.
    second = mesh(
        agent, "service", "create", "web2",
        "--label", "mesh.http.hosts=web.test", "--label", "mesh.http.port=80",
    )  # fmt: skip
    assert second.stderr == (
        "mesh: warning: service web2: conflict problem in label mesh.http.hosts: "
        "http://web.test is already routed to the older service web\n"
    )

    mesh(agent, "service", "update", "web", "--label-add", "mesh.http.port=80")
    assert problems(agent, "web") == []
    doctor = mesh(agent, "doctor", "--json", "--settle", "0", check=False)
    routes = [f for f in json.loads(doctor.stdout)["findings"] if f["check"] == "routes"]
    assert [f["status"] for f in routes] == ["fail"] and "web2" in routes[0]["message"]


def test_a_host_this_nodes_https_has_no_certificate_for(
    start_agent: StartAgent, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path, "x.test")
    agent = start_agent(
        extra=["--https", f"127.0.0.1:{free_port()}", "--tls-cert", f"x.test={cert},{key}"]
    )
    created = mesh(
        agent, "service", "create", "web",
        "--label", "mesh.http.hosts=x.test,nocert.test", "--label", "mesh.http.port=80",
    )  # fmt: skip
    reason = (
        "no TLS certificate for nocert.test on this node: "
        "HTTPS clients get the default certificate (x.test)"
    )
    print(f"\nmesh service create: stderr: {created.stderr.strip()}")
    assert created.stderr == (
        f"mesh: warning: service web: certificate problem in label mesh.http.hosts: {reason}\n"
    )
    assert problems(agent, "web") == [
        {"kind": "certificate", "label": "mesh.http.hosts", "reason": reason}
    ]

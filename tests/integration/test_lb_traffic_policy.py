"""`traffic-policy=local` through the CLI and the API on one loopback agent (userspace):
where the policy shows, and the per-service health check following the local tasks.
(The client's address as a task sees it: tests/cluster/test_traffic_policy_netns.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from tests.helpers.agent import REPO, AgentProcess, free_port


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


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_local_policy_shows_everywhere_and_healthz_follows_the_local_tasks(
    start_agent: Callable[..., AgentProcess],
) -> None:
    agent = start_agent(extra=["--publish-address", "127.0.0.1", "--lb", "userspace"])
    published = free_port()
    # UDP: a TCP port would set up the transparent return path (lb/userspace/transparent.py)
    # in the host's own namespace; the netns test covers that.
    spec = f"{published}:80/udp,traffic-policy=local"
    mesh_cli(agent, "service", "create", "web", "--publish", spec)
    inspected = json.loads(mesh_cli(agent, "service", "inspect", "web"))
    assert inspected["ports"][0]["traffic_policy"] == "local"
    # the userspace proxy keeps no client address for UDP: said, not hidden
    assert [(p["kind"], p["label"]) for p in inspected["problems"]] == [("lb", "traffic_policy")]
    assert f"{published}->80/udp (local)" in mesh_cli(agent, "service", "ls")
    assert f"UDP  0.0.0.0:{published} rr local" in mesh_cli(agent, "lb")
    description = agent.request("GET", "/v1/openapi.json")[1]
    port_in = description["components"]["schemas"]["PortIn"]["properties"]
    assert port_in["traffic_policy"]["enum"] == ["cluster", "local"]

    # no task: this node does not serve the port
    status, body = agent.request("GET", "/v1/lb/healthz/web")
    assert (status, body["serving"], body["traffic_policy"]) == (503, False, "local"), body
    assert agent.request("GET", "/v1/lb/healthz/nope")[0] == 404

    status, task = agent.request("POST", "/v1/services/web/tasks", {"address": "127.0.0.1"})
    assert status == 201, task
    wait_for(lambda: agent.request("GET", "/v1/lb/healthz/web")[0] == 200, "healthz 200")
    assert agent.request("PUT", f"/v1/tasks/{task['id']}/health", {"status": "unhealthy"})[0] == 200
    wait_for(lambda: agent.request("GET", "/v1/lb/healthz/web")[0] == 503, "healthz 503")

    # the policy switched back by removal and addition
    mesh_cli(
        agent, "service", "update", "web", "--publish-rm", f"{published}/udp",
        "--publish-add", f"{published}:80/udp",
    )  # fmt: skip
    assert (
        json.loads(mesh_cli(agent, "service", "inspect", "web"))["ports"][0]["traffic_policy"]
        == "cluster"
    )

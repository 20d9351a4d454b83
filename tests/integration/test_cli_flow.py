"""The tour of the README, through the `mesh` command alone, across an agent restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.helpers.agent import REPO, AgentProcess
from tests.integration.conftest import StartAgent


def mesh(agent: AgentProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MESH_API=agent.api, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def mesh_json(agent: AgentProcess, *args: str) -> Any:
    return json.loads(mesh(agent, *args, "--json").stdout)


def test_cli_tour_survives_a_restart(start_agent: StartAgent) -> None:
    agent = start_agent()
    mesh(agent, "network", "create", "backend", "--subnet", "127.90.1.0/24")
    mesh(
        agent,
        "service",
        "create",
        "web",
        "--network",
        "backend",
        "--publish",
        "18080:80",
        "--label",
        "tier=front",
        "--label",
        "owner=team-a",
    )
    for port in ("31001", "31002", "31003"):
        mesh(agent, "task", "add", "web", "--address", "127.0.0.1", "--port", f"80={port}")

    service = mesh_json(agent, "service", "inspect", "web")
    assert service["labels"] == {"tier": "front", "owner": "team-a"}
    assert service["ports"] == [
        {
            "protocol": "tcp",
            "target_port": 80,
            "published_port": 18080,
            "publish_mode": "ingress",
            "traffic_policy": "cluster",
        }
    ]
    vips = {v["network"]: v["address"] for v in service["vips"]}
    assert vips["backend"] == "127.90.1.2"
    assert "ingress" in vips
    people = mesh(agent, "service", "inspect", "web").stdout
    assert "127.90.1.2" in people
    tasks = mesh_json(agent, "task", "ls", "web")
    assert sorted(t["ports"]["80"] for t in tasks) == [31001, 31002, 31003]
    table = mesh(agent, "service", "ls").stdout
    assert "web" in table and "*:18080->80/tcp" in table
    network = mesh_json(agent, "network", "inspect", "backend")

    assert agent.stop() == 0
    agent.start()

    assert mesh_json(agent, "service", "inspect", "web") == service
    assert mesh_json(agent, "task", "ls", "web") == tasks
    assert mesh_json(agent, "network", "inspect", "backend") == network


def test_cli_errors_are_one_line_and_non_zero(start_agent: StartAgent) -> None:
    agent = start_agent()
    mesh(agent, "service", "create", "web")
    duplicate = mesh(agent, "service", "create", "web", check=False)
    assert duplicate.returncode == 1
    assert duplicate.stderr.count("\n") == 1 and "already exists" in duplicate.stderr
    unknown = mesh(agent, "task", "add", "nope", "--address", "127.0.0.1", check=False)
    assert unknown.returncode == 1 and "not found" in unknown.stderr
    usage = mesh(
        agent, "task", "add", "web", "--port", "x=y", "--address", "127.0.0.1", check=False
    )
    assert usage.returncode != 0 and "Traceback" not in usage.stderr

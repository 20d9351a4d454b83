"""Every task shows its node's liveness (`node_status`), and lists filter on it.

A node killed with SIGKILL leaves its tasks in the state (they are rightly out
of DNS and the load balancers): on the survivor they must say that their node
is down instead of looking running and healthy, in the API and in `mesh task ls`.
"""

from __future__ import annotations

import time
from typing import Any

from tests.helpers.agent import AgentProcess, gossip_cluster, members
from tests.integration.conftest import StartAgent
from tests.integration.test_cli_flow import mesh
from tests.integration.test_gossip_cluster import wait_until

STATUSES = ("alive", "suspect", "dead", "left", "unknown")


def statuses(agent: AgentProcess, query: str = "") -> dict[str, str]:
    """task address -> node_status, as `agent` lists the tasks."""
    status, tasks = agent.request("GET", f"/v1/tasks{query}")
    assert status == 200, tasks
    return {t["address"]: t["node_status"] for t in tasks}


def test_a_killed_nodes_tasks_show_their_node_dead_on_the_survivor(tmp_path: Any) -> None:
    with gossip_cluster(tmp_path, 2) as (n0, n1):
        wait_until(
            lambda: all(
                len(members(a)) == 2 and set(members(a).values()) == {"alive"} for a in (n0, n1)
            ),
            20,
            "two alive",
        )
        assert n0.request("POST", "/v1/services", {"name": "web"})[0] == 201
        wait_until(
            lambda: n1.request("GET", "/v1/services/web")[0] == 200, 10, "the service reaches n1"
        )
        assert n0.request("POST", "/v1/services/web/tasks", {"address": "127.0.1.1"})[0] == 201
        assert n1.request("POST", "/v1/services/web/tasks", {"address": "127.0.1.2"})[0] == 201
        # each node's task has to reach the other: gossip carries them independently
        wait_until(lambda: len(statuses(n0)) == 2, 10, "n1's task reaches n0")
        wait_until(lambda: len(statuses(n1)) == 2, 10, "n0's task reaches n1")
        assert statuses(n0) == {"127.0.1.1": "alive", "127.0.1.2": "alive"}
        assert statuses(n1) == {"127.0.1.1": "alive", "127.0.1.2": "alive"}

        n1.kill()
        killed = time.monotonic()
        seen: list[str] = []

        def n1_task_dead() -> bool:
            status = statuses(n0)["127.0.1.2"]
            if not seen or seen[-1] != status:
                seen.append(status)
            return status == "dead"

        took = wait_until(n1_task_dead, 30, "n1's task shows its node dead on n0")
        print(
            f"\nn1's task on n0 went {' -> '.join(seen)} "
            f"{time.monotonic() - killed:.1f}s after kill -9 (seen within {took:.1f}s)"
        )
        assert set(seen) <= {"alive", "suspect", "dead"}

        tasks = {t["address"]: t for t in n0.request("GET", "/v1/tasks")[1]}
        dead = tasks["127.0.1.2"]
        assert (dead["node"], dead["node_status"]) == ("n1", "dead")
        assert (dead["state"], dead["health"]) == ("running", "healthy")  # as last reported
        assert tasks["127.0.1.1"]["node_status"] == "alive"  # this node's own
        one = n0.request("GET", f"/v1/tasks/{dead['id']}")[1]
        assert one["node_status"] == "dead"

        assert statuses(n0, "?node_status=dead") == {"127.0.1.2": "dead"}
        assert statuses(n0, "?node_status=alive") == {"127.0.1.1": "alive"}
        assert statuses(n0, "?node_status=alive,dead") == {
            "127.0.1.1": "alive",
            "127.0.1.2": "dead",
        }
        assert statuses(n0, "?node_status=suspect") == {}
        status, by_service = n0.request("GET", "/v1/services/web/tasks?node_status=dead")
        assert status == 200 and [t["address"] for t in by_service] == ["127.0.1.2"]

        listing = mesh(n0, "task", "ls").stdout.splitlines()
        assert "NODE STATUS" in listing[0]
        dead_row = next(line for line in listing if "127.0.1.2" in line)
        assert " dead " in dead_row, listing
        filtered = mesh(n0, "task", "ls", "--node-status", "dead").stdout.splitlines()
        assert len(filtered) == 2 and "127.0.1.2" in filtered[1], filtered


def test_node_status_filter_refuses_an_unknown_status(start_agent: StartAgent) -> None:
    agent = start_agent()
    assert agent.request("POST", "/v1/services", {"name": "web"})[0] == 201
    created = agent.request("POST", "/v1/services/web/tasks", {"address": "127.0.1.1"})[1]
    assert created["node_status"] == "alive"
    for path in (
        "/v1/tasks?node_status=down",
        "/v1/services/web/tasks?node_status=alive,up",
        "/v1/tasks?node_status=",
    ):
        status, body = agent.request("GET", path)
        assert status == 422, (path, body)
        assert body["error"]["code"] == "invalid_value"
        assert all(s in body["error"]["message"] for s in STATUSES), body
    result = mesh(agent, "task", "ls", "--node-status", "down", check=False)
    assert result.returncode != 0 and "alive" in result.stderr
    assert statuses(agent, "?node_status=alive") == {"127.0.1.1": "alive"}
    assert agent.request("GET", "/v1/services/nope/tasks?node_status=alive")[0] == 404

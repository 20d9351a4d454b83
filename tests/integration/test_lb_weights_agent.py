"""Issue 19, weights and locality through a real agent (userspace backend, loopback):
`mesh task add --weight`, `mesh service update --weight TASK=N`, `--locality
prefer-local`, as the CLI sends them and the agent's L4 table programs them."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.helpers.agent import AgentProcess, free_port, gossip_cluster
from tests.helpers.echo import EchoServer, hello
from tests.integration.test_lb_agent import (
    TASK_PORT,
    lb_table,
    mesh_cli,
    net,  # noqa: F401  (fixture)
    servers,  # noqa: F401  (fixture)
    wait_for,
)


def test_task_weights_from_the_cli_shape_traffic_and_weight_zero_drains(
    start_agent: Callable[..., AgentProcess],
    net: str,  # noqa: F811
    servers: Callable[[int], EchoServer],  # noqa: F811
) -> None:
    publish = f"{net}.1"
    agent = start_agent(extra=["--publish-address", publish])
    published = free_port()
    mesh_cli(agent, "service", "create", "web", "--publish", f"{published}:80")
    mesh_cli(agent, "service", "update", "web", "--label-add", "mesh.lb.scheduler=wrr")
    canary, stable = servers(1), servers(2)
    ids = {}
    for server, weight in ((canary, "1"), (stable, "3")):
        out = mesh_cli(
            agent, "task", "add", "web", "--address", server.address,
            "--port", f"80={TASK_PORT}", "--weight", weight, "--json",
        )  # fmt: skip
        task = json.loads(out)
        assert task["weight"] == int(weight)
        ids[server.name] = task["name"]
    key = ("tcp", "0.0.0.0", published)
    wait_for(
        lambda: lb_table(agent).get(key) == {canary.name: 1, stable.name: 3},
        what="weights 1 and 3 in the table",
    )
    spread = Counter(hello(publish, published) for _ in range(400))
    print(f"userspace agent, task weights 1:3 over 400 connections: {dict(spread)}")
    assert spread == {canary.name: 100, stable.name: 300}, spread
    # The service's override, from the CLI: the canary drained, the other weighted 5.
    mesh_cli(
        agent, "service", "update", "web",
        "--weight", f"{ids[canary.name]}=0", "--weight", f"{ids[stable.name]}=5",
    )  # fmt: skip
    wait_for(
        lambda: lb_table(agent).get(key) == {canary.name: 0, stable.name: 5},
        what="the service's weights in the table",
    )
    assert Counter(hello(publish, published) for _ in range(20)) == {stable.name: 20}
    service = json.loads(mesh_cli(agent, "service", "inspect", "web", "--json"))
    assert sorted(service["weights"].values()) == [0, 5]
    # a weight out of range, or a task the service does not have: 422, nothing written
    status, body = agent.request(
        "POST", "/v1/services/web/tasks", {"address": f"{net}.103", "weight": 1001}
    )
    assert status == 422, body
    status, body = agent.request("PATCH", "/v1/services/web", {"weights": {"nope": 1}})
    assert status == 422 and body["error"]["code"] == "unknown_task", body


def test_prefer_local_sends_each_nodes_vip_traffic_to_its_own_task(
    tmp_path: Path,
    net: str,  # noqa: F811
    servers: Callable[[int], EchoServer],  # noqa: F811
) -> None:
    with gossip_cluster(tmp_path, 2) as agents:
        mesh_cli(agents[0], "network", "create", "front")
        mesh_cli(
            agents[0], "service", "create", "web", "--network", "front",
            "--publish", f"{free_port()}:80", "--locality", "prefer-local",
        )  # fmt: skip
        wait_for(
            lambda: all(a.request("GET", "/v1/services/web")[0] == 200 for a in agents),
            timeout=20,
            what="the service gossiped",
        )
        vip = agents[0].request("GET", "/v1/services/web")[1]["vips"][0]["address"]
        key = ("tcp", vip, 80)
        mine = {}
        for index, agent in enumerate(agents):
            server = servers(index + 1)
            status, task = agent.request(
                "POST",
                "/v1/services/web/tasks",
                {"address": server.address, "ports": {"80": TASK_PORT}},
            )
            assert status == 201, task
            mine[agent.node_name] = (server.name, task["id"])
        a, b = mine["n0"][0], mine["n1"][0]
        wait_for(
            lambda: (
                lb_table(agents[0]).get(key) == {a: 1, b: 0}
                and lb_table(agents[1]).get(key) == {a: 0, b: 1}
            ),
            timeout=20,
            what="each node's VIP preferring its own task",
        )
        # n0's task leaves: n0 falls back to n1's.
        status, _ = agents[0].request("DELETE", f"/v1/tasks/{mine['n0'][1]}")
        assert status == 202
        wait_for(
            lambda: lb_table(agents[0]).get(key, {}).get(b) == 1,
            timeout=20,
            what="n0 falling back to n1's task",
        )

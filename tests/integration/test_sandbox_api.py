"""Sandboxed tasks and driver-backed networks through the API (issue 15, the state's part).

A real agent has no sandbox manager here (the manager wires `ApiDeps.sandboxes`), so it
refuses bridge networks and sandboxed tasks with 422 `needs_privileges` and keeps doing
everything else as before. The whole path (created, awaited, rolled back on failure) runs
against the real app, store and state writer in-process, with a fake `SandboxPort`: no
kernel object is made by these tests.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mesh.api.app import ApiDeps, make_app
from mesh.control import Control
from mesh.core.feed import ChangeFeed
from mesh.errors import SandboxFailed
from mesh.ipam import Ipam, parse_pool
from mesh.sandbox.names import netns_prefix
from mesh.state.persist import StateWriter, load
from mesh.state.store import Store
from tests.helpers.agent import AgentProcess
from tests.integration.test_cli_flow import mesh

NODE = "node-1"

# -- a real agent without sandbox support ----------------------------------------


def test_an_agent_without_a_sandbox_manager_refuses_kernel_work_with_needs_privileges(
    agent: AgentProcess,
) -> None:
    status, body = agent.request("POST", "/v1/networks", {"name": "br", "driver": "bridge"})
    assert status == 422 and body["error"]["code"] == "needs_privileges", body
    assert "needs root or CAP_NET_ADMIN and CAP_SYS_ADMIN" in body["error"]["message"]
    status, body = agent.request("POST", "/v1/networks", {"name": "mv", "driver": "macvlan"})
    assert (status, body["error"]["code"]) == (422, "needs_privileges")

    # an overlay network is a record, as before; it carries the new fields
    status, net = agent.request(
        "POST",
        "/v1/networks",
        {"name": "front", "subnet": "10.77.0.0/24", "ip_range": "10.77.0.128/25"},
    )
    assert status == 201, net
    assert (net["driver"], net["scope"], net["node"], net["internal"]) == (
        "overlay",
        "swarm",
        "",
        False,
    )
    assert (net["ip_range"], net["aux_addresses"], net["options"]) == ("10.77.0.128/25", {}, {})

    status, svc = agent.request(
        "POST",
        "/v1/services",
        {"name": "web", "networks": ["front"], "aliases": {"front": ["www"]}},
    )
    assert status == 201 and svc["aliases"] == {"front": ["www"]}, svc
    status, body = agent.request(
        "POST",
        "/v1/services",
        {"name": "api", "networks": ["front"], "aliases": {"front": ["WWW"]}},
    )
    assert (status, body["error"]["code"]) == (409, "alias_in_use"), body

    status, body = agent.request("POST", "/v1/services/web/tasks", {"sandbox": {"netns": None}})
    assert status == 422 and body["error"]["code"] == "needs_privileges", body
    assert "a sandboxed task needs root" in body["error"]["message"]
    status, body = agent.request(
        "POST", "/v1/services/web/tasks", {"address": "127.0.0.1", "sandbox": {}}
    )
    assert (status, body["error"]["code"]) == (422, "invalid_value"), body

    # a host process's task is exactly as before, with no sandbox and no addresses
    status, task = agent.request("POST", "/v1/services/web/tasks", {"address": "127.0.0.5"})
    assert status == 201, task
    assert (task["address"], task["sandbox"], task["addresses"]) == ("127.0.0.5", None, {})

    status, body = agent.request("DELETE", "/v1/networks/front")
    assert (status, body["error"]["code"]) == (409, "network_in_use")
    assert "services web" in body["error"]["message"]


def test_the_cli_shows_scope_and_internal_and_explains_needs_privileges(
    agent: AgentProcess,
) -> None:
    made = mesh(
        agent,
        "network",
        "create",
        "back",
        "--subnet",
        "10.78.0.0/24",
        "--aux-address",
        "r=10.78.0.9",
    )
    assert made.returncode == 0, made.stderr
    listed = mesh(agent, "network", "ls").stdout.splitlines()
    assert listed[0].split() == ["ID", "NAME", "DRIVER", "SCOPE", "SUBNET", "GATEWAY", "INTERNAL"]
    assert [line.split()[1:] for line in listed[1:] if " back " in line] == [
        ["back", "overlay", "swarm", "10.78.0.0/24", "10.78.0.1", "no"]
    ]
    refused = mesh(agent, "network", "create", "br", "--driver", "bridge", check=False)
    assert refused.returncode != 0
    assert "needs root or CAP_NET_ADMIN and CAP_SYS_ADMIN" in refused.stderr
    created = mesh(agent, "service", "create", "web", "--network", "name=back,alias=www")
    assert created.returncode == 0, created.stderr
    status, svc = agent.request("GET", "/v1/services/web")
    assert (status, svc["networks"], svc["aliases"]) == (200, ["back"], {"back": ["www"]})


# -- the whole path in-process, with a fake sandbox port -------------------------


class FakeSandboxes:
    """Records `ready` calls; fails the tasks it is told to fail."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ready_for: list[str] = []
        self.seen_in_store: list[bool] = []
        self.fail_next: str | None = None

    async def ready(self, task_id: str, timeout: float) -> None:  # noqa: ASYNC109
        self.ready_for.append(task_id)
        # the create is committed before the API waits: the manager follows the feed
        self.seen_in_store.append(self.store.get_task(task_id) is not None)
        if self.fail_next is not None:
            reason, self.fail_next = self.fail_next, None
            raise SandboxFailed(reason)


class InProcess:
    def __init__(self, client: TestClient[Any, Any], port: FakeSandboxes, store: Store) -> None:
        self.client, self.port, self.store = client, port, store

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        response = await self.client.request(method, path, json=body)
        return response.status, (await response.json() if response.content_length else None)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[InProcess]:
    import asyncio

    store = Store(NODE, Ipam(parse_pool("10.0.0.0/8")), random.Random(7))
    store.ensure_ingress()
    writer = StateWriter(tmp_path)
    writer.start(asyncio.get_running_loop())
    control = Control(store, ChangeFeed(store.all_records), writer, time.time, lambda _: None)
    port = FakeSandboxes(store)
    deps = ApiDeps(
        control=control,
        node=NODE,
        members=list,
        heartbeat=lambda *_: None,
        drain_grace=0.0,
        sandboxes=port,
        sandbox_timeout=5.0,
    )
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(deps)))
    await client.start_server()
    try:
        yield InProcess(client, port, store)
    finally:
        await client.close()
        writer.close()


async def test_a_sandboxed_task_is_created_awaited_and_answered_with_its_endpoints(
    app: InProcess, tmp_path: Path
) -> None:
    status, net = await app.call(
        "POST",
        "/v1/networks",
        {
            "name": "a",
            "driver": "bridge",
            "subnet": "10.9.1.0/24",
            "aux_addresses": {"r": "10.9.1.3"},
            "options": {"icc": "false"},
            "internal": True,
        },
    )
    assert status == 201, net
    assert (net["scope"], net["node"], net["attachable"], net["internal"]) == (
        "local",
        NODE,
        True,
        True,
    )
    status, _ = await app.call(
        "POST", "/v1/networks", {"name": "b", "driver": "bridge", "subnet": "10.9.2.0/24"}
    )
    assert status == 201
    status, svc = await app.call(
        "POST", "/v1/services", {"name": "web", "networks": ["a", "b"], "aliases": {"b": ["www"]}}
    )
    assert status == 201, svc
    status, task = await app.call(
        "POST", "/v1/services/web/tasks", {"sandbox": {"netns": None}, "ports": {"80": 8080}}
    )
    assert status == 201, task
    assert app.port.ready_for == [task["id"]] and app.port.seen_in_store == [True]
    assert task["sandbox"] == {
        "netns": f"/run/netns/{netns_prefix(NODE)}{task['id']}",
        "adopted": False,
        "endpoints": [
            {
                "network": "a",
                "address": "10.9.1.4",
                "mac": "02:42:0a:09:01:04",
                "interface": "eth0",
            },
            {
                "network": "b",
                "address": "10.9.2.3",
                "mac": "02:42:0a:09:02:03",
                "interface": "eth1",
            },
        ],
    }  # a: .1 gateway, .2 VIP, .3 aux; b: .1 gateway, .2 VIP
    assert task["address"] == "10.9.1.4"
    assert task["addresses"] == {"a": "10.9.1.4", "b": "10.9.2.3"}
    status, again = await app.call("GET", f"/v1/tasks/{task['id']}")
    assert (status, again["sandbox"], again["addresses"]) == (
        200,
        task["sandbox"],
        task["addresses"],
    )

    # adopting a namespace by name
    status, adopted = await app.call(
        "POST", "/v1/services/web/tasks", {"sandbox": {"netns": "ctr1"}}
    )
    assert status == 201, adopted
    assert (adopted["sandbox"]["netns"], adopted["sandbox"]["adopted"]) == ("/run/netns/ctr1", True)

    # a network in use by tasks only: 409 naming them
    status, _ = await app.call("PATCH", "/v1/services/web", {"networks": ["a"]})
    assert status == 200
    status, body = await app.call("DELETE", "/v1/networks/b")
    assert (status, body["error"]["code"]) == (409, "network_in_use")
    assert task["name"] in body["error"]["message"] and adopted["name"] in body["error"]["message"]

    # durable: the sandbox is on disk as answered
    loaded = {r.key: r for r in load(tmp_path).records}
    assert loaded[task["id"]].sandbox.endpoints[1].address == "10.9.2.3"  # type: ignore[union-attr]


async def test_a_sandbox_that_cannot_be_made_takes_its_task_along_with_503(app: InProcess) -> None:
    await app.call(
        "POST", "/v1/networks", {"name": "a", "driver": "bridge", "subnet": "10.9.1.0/24"}
    )
    await app.call("POST", "/v1/services", {"name": "web", "networks": ["a"]})
    app.port.fail_next = "veth: operation not permitted"
    status, body = await app.call("POST", "/v1/services/web/tasks", {"sandbox": {}})
    assert status == 503, body
    assert body["error"] == {"code": "sandbox_failed", "message": "veth: operation not permitted"}
    assert app.store.tasks(service="web") == []
    # its address went back: the next task gets it
    status, task = await app.call("POST", "/v1/services/web/tasks", {"sandbox": {}})
    assert (status, task["address"]) == (201, "10.9.1.3")


async def test_sandbox_refusals_through_the_api(app: InProcess) -> None:
    await app.call("POST", "/v1/networks", {"name": "o", "subnet": "10.9.3.0/24"})
    await app.call("POST", "/v1/services", {"name": "ov", "networks": ["o"]})
    status, body = await app.call("POST", "/v1/services/ov/tasks", {"sandbox": {}})
    assert (status, body["error"]["code"]) == (422, "invalid_value")
    assert "serves no overlay" in body["error"]["message"]
    await app.call("POST", "/v1/services", {"name": "bare"})
    status, body = await app.call("POST", "/v1/services/bare/tasks", {"sandbox": {}})
    assert (status, body["error"]["code"]) == (422, "invalid_value")
    # a bridge network another node made (gossip brought it): listed, refused for sandboxes
    other = Store("node-2", Ipam(parse_pool("10.0.0.0/8")), random.Random(9))
    from mesh.state.specs import NetworkSpec

    made = other.create_network(
        NetworkSpec(name="theirs", driver="bridge", subnet="10.9.4.0/24"), 1.0
    )
    app.store.merge(made[-1].after)
    status, listed = await app.call("GET", "/v1/networks/theirs")
    assert (status, listed["scope"], listed["node"]) == (200, "local", "node-2")
    await app.call("POST", "/v1/services", {"name": "far", "networks": ["theirs"]})
    status, body = await app.call("POST", "/v1/services/far/tasks", {"sandbox": {}})
    assert (status, body["error"]["code"]) == (422, "invalid_value")
    assert "'theirs' is a bridge network of node 'node-2'" in body["error"]["message"]
    assert app.port.ready_for == []  # nothing was created, nothing awaited


async def test_encrypted_networks_need_an_overlay_and_a_keyring(app: InProcess) -> None:
    """`--opt encrypted` (issue 16): an overlay's option, keyed from the gossip keyring."""
    body = {"name": "sec", "subnet": "10.9.5.0/24", "options": {"encrypted": ""}}
    status, answer = await app.call("POST", "/v1/networks", body)
    assert (status, answer["error"]["code"]) == (422, "encrypted_needs_keyring"), answer
    assert "--keyring" in answer["error"]["message"]
    bridge = {**body, "name": "secbr", "driver": "bridge"}
    status, answer = await app.call("POST", "/v1/networks", bridge)
    assert (status, answer["error"]["code"]) == (422, "encrypted_needs_overlay"), answer
    odd = {**body, "options": {"encrypted": "sometimes"}}
    status, answer = await app.call("POST", "/v1/networks", odd)
    assert (status, answer["error"]["code"]) == (422, "invalid_value"), answer
    # encrypted=false asks for nothing: no keyring needed
    plain = {**body, "options": {"encrypted": "false"}}
    assert (await app.call("POST", "/v1/networks", plain))[0] == 201


async def test_an_agent_with_a_keyring_creates_an_encrypted_overlay(tmp_path: Path) -> None:
    import asyncio

    from gossip.keyring_store import LocalKeyringControl
    from gossip.security import Keyring

    store = Store(NODE, Ipam(parse_pool("10.0.0.0/8")), random.Random(7))
    writer = StateWriter(tmp_path)
    writer.start(asyncio.get_running_loop())
    control = Control(store, ChangeFeed(store.all_records), writer, time.time, lambda _: None)
    deps = ApiDeps(
        control=control,
        node=NODE,
        members=list,
        heartbeat=lambda *_: None,
        drain_grace=0.0,
        keyring=LocalKeyringControl(Keyring([b"\x01" * 32])),
    )
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(deps)))
    await client.start_server()
    try:
        body = {"name": "sec", "subnet": "10.9.6.0/24", "options": {"encrypted": ""}}
        response = await client.request("POST", "/v1/networks", json=body)
        created = await response.json()
        assert response.status == 201, created
        assert (created["driver"], created["options"]) == ("overlay", {"encrypted": ""})
    finally:
        await client.close()
        writer.close()

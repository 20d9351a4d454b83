"""The LB inside a sandbox on a real kernel: curl from a 'client' sandbox to a VIP.

Topology, made per test inside namespaces of the test's own (never the host's):

    node namespace: bridge br0 10.88.1.1/24 (the network "front")
        ├─ veth ── task1 namespace  eth0 10.88.1.5, `python -m http.server 8080`
        ├─ veth ── task2 namespace  eth0 10.88.1.6, `python -m http.server 8080`
        └─ veth ── client namespace eth0 10.88.1.9   <- the sandbox with `SandboxLb`

The service `web` has VIP 10.88.1.2 on "front" (target port 80, tasks on 8080),
another VIP on "other" and a published port; `api` is on "back" only. The
node's own backend is a do-nothing one: the sandbox's table works whatever the
node uses. The bridge is made by the test (not the bridge driver).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from lb.driver import LbDriver
from lb.sandbox import SANDBOX_TABLE, SandboxLb
from lb.table import Op, Real, Table, VirtualKey
from lb.view import LbView
from mesh.core.model import Change, Health, Kind, PortConfig, Record, Service, Task, Vip
from tests.helpers.netns import Lab, Netns, unavailable

pytestmark = [pytest.mark.root]

NODE = "n1"
VIP, OTHER_VIP, API_VIP = "10.88.1.2", "10.88.9.2", "10.88.2.2"
TASKS = {"t1": "10.88.1.5", "t2": "10.88.1.6"}
CLIENT = "10.88.1.9"
TIMEOUT = 3.0  # generous per request: CI shares two cores
FRONT_KEY = VirtualKey("tcp", VIP, 80)

WEB = Service(
    name="web",
    id="s-web",
    ports=(PortConfig(protocol="tcp", target_port=80, published_port=30080),),
    vips=(Vip(network="front", address=VIP), Vip(network="other", address=OTHER_VIP)),
    networks=("front", "other"),
)
API = Service(
    name="api",
    id="s-api",
    ports=(PortConfig(protocol="tcp", target_port=80, published_port=30081),),
    vips=(Vip(network="back", address=API_VIP),),
    networks=("back",),
)


def task(task_id: str, health: Health = Health.HEALTHY) -> Task:
    return Task(
        id=task_id,
        name=f"web.{task_id}",
        service="web",
        slot=int(task_id[1:]),
        node=NODE,
        address=TASKS[task_id],
        ports={80: 8080},
        health=health,
    )


def change(before: Record | None, after: Record) -> Change:
    kind = Kind.SERVICE if isinstance(after, Service) else Kind.TASK
    return Change(kind, after.key, before, after)


class NullBackend:
    """The node's own backend does not matter to the sandbox's table."""

    name = "null"

    async def start(self, desired: Table) -> None: ...

    async def apply(self, ops: Sequence[Op]) -> None: ...

    async def read(self) -> Table:
        return {}

    async def close(self) -> None: ...


@dataclass
class Net:
    lab: Lab
    node: Netns
    client: Netns
    tasks: dict[str, Netns]
    servers: list[subprocess.Popen[bytes]]

    @property
    def client_path(self) -> str:
        return f"/run/netns/{self.client.name}"

    def curl(self, url: str) -> str | None:
        done = self.client.run(
            ["curl", "-s", "--max-time", str(TIMEOUT), url], check=False, timeout=TIMEOUT + 5
        )
        return done.stdout.strip() if done.returncode == 0 else None

    def hits(self, count: int) -> list[str | None]:
        """`count` new connections to the VIP, one curl each: which task answered."""
        return [self.curl(f"http://{VIP}/who") for _ in range(count)]

    def nft(self, ns: Netns, *args: str) -> subprocess.CompletedProcess[str]:
        return ns.run(["nft", *args], check=False)


def skip_reason() -> str | None:
    reason = unavailable()
    for tool in ("nft", "curl", "nsenter"):
        if reason is None and shutil.which(tool) is None:
            reason = f"{tool} is not installed"
    return reason


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with Lab(f"t15lb-{os.getpid()}") as lab:
        node = lab.namespace("node")
        node.ip("link", "add", "br0", "type", "bridge")
        node.add_address("br0", "10.88.1.1/24")
        node.up("br0")
        made = Net(lab, node, lab.namespace("client"), {}, [])
        try:
            sandboxes = {**{t: lab.namespace(t) for t in TASKS}, "client": made.client}
            addresses = {**TASKS, "client": CLIENT}
            for index, (role, ns) in enumerate(sandboxes.items()):
                host_side = f"v{index}"  # in the node namespace only
                node.ip("link", "add", host_side, "type", "veth", "peer", "name", "eth0")
                node.ip("link", "set", "eth0", "netns", ns.name)
                node.ip("link", "set", host_side, "master", "br0")
                node.up(host_side)
                ns.add_address("eth0", f"{addresses[role]}/24")
                ns.up("eth0")
                ns.ip("route", "add", "default", "via", "10.88.1.1")
            for task_id, address in TASKS.items():
                root = tmp_path / task_id
                root.mkdir()
                (root / "who").write_text(task_id)
                made.tasks[task_id] = sandboxes[task_id]
                made.servers.append(
                    sandboxes[task_id].popen(
                        [
                            sys.executable,
                            "-m",
                            "http.server",
                            "8080",
                            "--bind",
                            address,
                            "--directory",
                            str(root),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            deadline = time.monotonic() + 15
            for task_id, address in TASKS.items():  # the servers answer directly first
                while made.curl(f"http://{address}:8080/who") != task_id:
                    assert time.monotonic() < deadline, f"{task_id}'s server never answered"
                    time.sleep(0.1)
            yield made
        finally:
            for server in made.servers:
                server.kill()
                server.wait(timeout=10)


@pytest.fixture
async def driver(net: Net) -> AsyncIterator[LbDriver]:
    made = LbDriver(LbView(NODE), NullBackend())
    made.load([WEB, API, task("t1"), task("t2")])
    await made.start()
    try:
        yield made
    finally:
        await made.close()


def spread(answers: list[str | None]) -> dict[str | None, int]:
    counts: dict[str | None, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return counts


async def test_connections_to_the_vip_spread_over_the_healthy_tasks(
    net: Net, driver: LbDriver
) -> None:
    assert net.curl(f"http://{VIP}/who") is None  # no LB in the sandbox yet: nobody has the VIP
    driver.open_sandbox("client", net.client_path, ("front",))
    await driver.settled()
    listing = net.nft(net.client, "list", "table", "ip", SANDBOX_TABLE).stdout
    print(listing)
    assert VIP in listing
    assert OTHER_VIP not in listing and API_VIP not in listing  # not the sandbox's networks
    assert "30080" not in listing and "masquerade" not in listing  # never published ports
    # The node's namespace has no table of ours: everything is inside the sandbox.
    assert net.nft(net.node, "list", "table", "ip", SANDBOX_TABLE).returncode != 0

    started = time.monotonic()
    answers = await asyncio.to_thread(net.hits, 10)
    print(f"10 connections in {time.monotonic() - started:.2f} s: {spread(answers)}")
    assert spread(answers) == {"t1": 5, "t2": 5}  # numgen inc: strict round robin

    # t1 turns unhealthy: new connections go to t2 only.
    driver.on_change(change(task("t1"), task("t1", Health.UNHEALTHY)))
    await driver.settled()
    answers = await asyncio.to_thread(net.hits, 6)
    print(f"t1 unhealthy: {spread(answers)}")
    assert spread(answers) == {"t2": 6}

    # t1 is back and t2 is removed.
    driver.on_change(change(task("t1", Health.UNHEALTHY), task("t1")))
    driver.on_change(change(task("t2"), dataclasses.replace(task("t2"), deleted=True)))
    await driver.settled()
    answers = await asyncio.to_thread(net.hits, 4)
    print(f"t2 removed: {spread(answers)}")
    assert spread(answers) == {"t1": 4}
    assert driver.sandboxes()["client"].errors == 0 and driver.errors == 0

    # Closing removes the table: the VIP answers no more.
    driver.close_sandbox("client")
    await driver.settled()
    assert net.nft(net.client, "list", "table", "ip", SANDBOX_TABLE).returncode != 0
    assert net.curl(f"http://{VIP}/who") is None


async def test_a_restarted_agent_reconciles_the_table_it_left(net: Net) -> None:
    first = LbDriver(LbView(NODE), NullBackend())
    first.load([WEB, task("t1"), task("t2")])
    await first.start()
    first.open_sandbox("client", net.client_path, ("front",))
    await first.settled()
    await first.close()  # a clean exit leaves the sandbox's table, as the sandbox stays
    assert net.nft(net.client, "list", "table", "ip", SANDBOX_TABLE).returncode == 0
    assert spread(await asyncio.to_thread(net.hits, 2)) == {"t1": 1, "t2": 1}

    # Meanwhile t2 went away; the next agent finds the old table and fixes it.
    second = LbDriver(LbView(NODE), NullBackend())
    second.load([WEB, API, task("t1")])
    await second.start()
    try:
        second.open_sandbox("client", net.client_path, ("front",))
        await second.settled()
        sandbox = second.sandboxes()["client"]
        assert await sandbox.read() == {FRONT_KEY: second.view.table()[FRONT_KEY]}
        assert set((await sandbox.read())[FRONT_KEY].reals) == {Real(TASKS["t1"], 8080)}
        assert spread(await asyncio.to_thread(net.hits, 3)) == {"t1": 3}
        # The sandbox's service joins "back": api's VIP is added in place (no task: reject).
        second.open_sandbox("client", net.client_path, ("front", "back"))
        await second.settled()
        api_key = VirtualKey("tcp", API_VIP, 80)
        assert set(await sandbox.read()) == {FRONT_KEY, api_key}
        started = time.monotonic()
        assert net.curl(f"http://{API_VIP}/who") is None
        refused_in = time.monotonic() - started
        print(f"api's VIP with no task refused in {refused_in:.2f} s")
        assert refused_in < TIMEOUT  # refused by the reject rule, not timed out
        assert spread(await asyncio.to_thread(net.hits, 2)) == {"t1": 2}
        assert sandbox.errors == 0
        second.close_sandbox("client")
        await second.settled()
    finally:
        await second.close()
    assert net.nft(net.client, "list", "table", "ip", SANDBOX_TABLE).returncode != 0


async def test_a_removed_real_loses_its_flows_inside_the_sandbox(net: Net) -> None:
    """A UDP 'flow' (the same client socket) reaches a removed task no more: its
    conntrack entry is flushed inside the sandbox's namespace, as lb/nft does."""
    udp = Service(
        name="web",
        id="s-web",
        ports=(PortConfig(protocol="udp", target_port=53, published_port=30053),),
        vips=(Vip(network="front", address=VIP),),
    )
    only = dataclasses.replace(task("t1"), ports={53: 5353})
    sandbox = SandboxLb("client", net.client_path, ("front",))
    view = LbView(NODE)
    view.load([udp, only])
    await sandbox.start(sandbox.initial(view.table(), view.vip_network))
    try:
        key = VirtualKey("udp", VIP, 53)
        assert set((await sandbox.read())[key].reals) == {Real(TASKS["t1"], 5353)}
        # A datagram from the client makes the conntrack entry; then the real goes.
        net.client.run([sys.executable, "-c", SEND_UDP, VIP, "53", "40053"], check=True, timeout=10)
        assert conntrack_count(net, "40053") == 1
        ops = view.on_change(change(only, dataclasses.replace(only, deleted=True)))
        await sandbox.apply(sandbox.filter(ops, view.vip_network))
        assert conntrack_count(net, "40053") == 0
    finally:
        await sandbox.close()
    assert net.nft(net.client, "list", "table", "ip", SANDBOX_TABLE).returncode != 0


SEND_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[3])))
s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
"""


def conntrack_count(net: Net, sport: str) -> int:
    """The client namespace's conntrack entries from UDP source port `sport`."""
    text = Path("/proc/net/nf_conntrack")
    script = f"import sys; print(sum('sport={sport} ' in l for l in open('{text}')))"
    done = net.client.run([sys.executable, "-c", script], check=False)
    if done.returncode != 0:
        pytest.skip(f"/proc/net/nf_conntrack unreadable: {done.stderr.strip()}")
    return int(done.stdout.strip())

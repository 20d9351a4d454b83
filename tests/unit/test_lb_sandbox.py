"""The LB inside a sandbox, without a kernel: which VIPs it holds, the ops that keep them,
the nftables it writes, and how the driver feeds it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.driver import LbDriver
from lb.nft.base import sandbox_base_commands
from lb.nft.layout import Layout
from lb.sandbox import SANDBOX_TABLE, SandboxLb
from lb.scope import SandboxScope
from lb.table import (
    DeleteReal,
    DeleteService,
    Op,
    PutReal,
    PutService,
    Real,
    Table,
    VirtualKey,
    apply_ops,
)
from lb.view import LbView, build_table
from mesh.core import model
from mesh.core.model import Health, Kind, PortConfig, Record, Task, Vip
from tests.unit.test_lb_view import (
    NODE,
    PUBLISHED,
    delete,
    kind_of,
    put,
    service,
    services,
    task,
    tasks,
)

FRONT = VirtualKey("tcp", "10.0.1.2", 80)  # web's VIP on network "front"
INGRESS = VirtualKey("tcp", "10.0.0.2", 80)  # web's VIP on "ingress"
BACK = VirtualKey("tcp", "10.0.2.2", 80)  # api's VIP on "back"
API_PORTS = (PortConfig(protocol="tcp", target_port=80, published_port=30090),)


def two_services() -> list[Record]:
    return [
        service(),  # web: front + ingress, published 30080
        service("api", ports=API_PORTS, vips=(Vip(network="back", address="10.0.2.2"),)),
        task("a", "10.0.1.5"),
        task("b", "10.0.1.6"),
        task("c", "10.0.2.5", svc="api"),
    ]


def test_a_sandbox_holds_only_the_vips_of_its_networks() -> None:
    view = LbView(NODE)
    view.load(two_services())
    assert {FRONT, INGRESS, BACK, PUBLISHED} <= view.table().keys()
    scope = SandboxScope(["front"])
    mine = scope.initial(view.table(), view.vip_network)
    assert set(mine) == {FRONT}  # not ingress's VIP, not the published port, not api's
    assert set(mine[FRONT].reals) == {Real("10.0.1.5", 80), Real("10.0.1.6", 80)}
    both = SandboxScope(["back", "front"]).initial(view.table(), view.vip_network)
    assert set(both) == {FRONT, BACK}


def test_ops_are_filtered_incrementally_and_deletes_pass_for_held_keys() -> None:
    view = LbView(NODE)
    records = two_services()
    view.load(records)
    scope = SandboxScope(["front"])
    scope.initial(view.table(), view.vip_network)
    a = records[2]
    assert isinstance(a, Task)
    sick = dataclasses.replace(a, health=Health.UNHEALTHY)
    ops = view.on_change(put(a, sick))
    assert len(ops) == 3  # front, ingress, published
    assert scope.filter(ops, view.vip_network) == [DeleteReal(FRONT, Real("10.0.1.5", 80))]
    # The service goes: its VIP's network is unknown by now, the delete still passes.
    web = records[0]
    ops = view.on_change(delete(web))
    assert view.vip_network(FRONT.address) is None
    assert scope.filter(ops, view.vip_network) == [DeleteService(FRONT)]
    assert scope.keys == set()
    # api's ops never reach a front-only sandbox.
    c = records[4]
    assert scope.filter(view.on_change(delete(c)), view.vip_network) == []


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _SandboxedTask(Task):
    """Until the sandbox model (branch i15-state) is merged: a Task with its `sandbox`."""

    sandbox: Any = None


def sandboxed_task(task_id: str, addresses: dict[str, str]) -> Task:
    first = next(iter(addresses.values()))
    if hasattr(model, "Sandbox"):
        endpoints = tuple(
            model.Endpoint(network=n, address=a, mac="02:42:00:00:00:00", interface=f"eth{i}")
            for i, (n, a) in enumerate(addresses.items())
        )
        return dataclasses.replace(
            task(task_id, first),
            sandbox=model.Sandbox(netns=f"/run/netns/mp-x-{task_id}", endpoints=endpoints),
        )
    endpoints_ns = tuple(SimpleNamespace(network=n, address=a) for n, a in addresses.items())
    return _SandboxedTask(
        **{f.name: getattr(task(task_id, first), f.name) for f in dataclasses.fields(Task)},
        sandbox=SimpleNamespace(endpoints=endpoints_ns),
    )


def test_a_sandboxed_task_is_reached_at_its_address_on_each_vips_network() -> None:
    sandboxed = sandboxed_task("s", {"front": "10.0.1.9", "ingress": "10.0.0.9"})
    table = build_table([service(), sandboxed], NODE)
    assert set(table[FRONT].reals) == {Real("10.0.1.9", 80)}
    assert set(table[INGRESS].reals) == {Real("10.0.0.9", 80)}
    assert set(table[PUBLISHED].reals) == {Real("10.0.1.9", 80)}  # its first address
    view = LbView(NODE)
    view.load([service(), sandboxed])
    assert view.table() == table


SANDBOX_NETWORKS = ("net2", "net3")  # the strategies' VIPs: 10.0.9.N on netN


def in_sandbox(table: Table) -> Table:
    return {
        key: vs
        for key, vs in table.items()
        if not key.published and key.address in ("10.0.9.2", "10.0.9.3")
    }


@settings(max_examples=200, deadline=None)
@given(
    initial=st.lists(st.one_of(services(), tasks()), max_size=6),
    steps=st.lists(st.tuples(st.booleans(), st.one_of(services(), tasks())), max_size=30),
    open_at=st.integers(0, 30),
)
def test_a_sandbox_following_the_ops_equals_the_filtered_table_from_scratch(
    initial: list[Record], steps: list[tuple[bool, Any]], open_at: int
) -> None:
    current: dict[tuple[Kind, str], Record] = {}
    for record in initial:
        current[(kind_of(record), record.key)] = record
    view = LbView(NODE)
    view.load(current.values())
    scope: SandboxScope | None = None
    programmed: Table = {}
    for index, (remove, record) in enumerate([*steps, (False, None)]):
        if index == open_at and scope is None:  # the sandbox opens at some point
            scope = SandboxScope(SANDBOX_NETWORKS)
            programmed = dict(scope.initial(view.table(), view.vip_network))
        if record is None:
            break
        slot = (kind_of(record), record.key)
        before = current.get(slot)
        if remove:
            if before is None:
                continue
            change = delete(before)
            del current[slot]
        else:
            change = put(before, record)
            current[slot] = record
        ops = view.on_change(change)
        if scope is not None:
            # apply_ops raises on a PutReal before its PutService: order is kept
            programmed = apply_ops(programmed, scope.filter(ops, view.vip_network))
            assert programmed == in_sandbox(build_table(current.values(), NODE))


def test_the_sandbox_table_hooks_only_output_and_never_masquerades() -> None:
    commands = sandbox_base_commands(SANDBOX_TABLE)
    assert commands[0] == "add table ip meshplane_sbx"
    assert "add rule ip meshplane_sbx output ip daddr . meta l4proto . th dport vmap @vips" in (
        commands
    )
    hooked = [c for c in commands if "hook" in c]
    assert hooked == [
        "add chain ip meshplane_sbx output { type nat hook output priority -100 ; policy accept ; }"
    ]
    for word in ("masquerade", "fib", "@published", "route_localnet"):
        assert not any(word in c for c in commands), word
    layout = Layout(SANDBOX_TABLE)
    commands, _ = layout.plan(PutService(FRONT))
    assert (
        "add element ip meshplane_sbx vips { 10.0.1.2 . tcp . 80 : goto svc_tcp_10_0_1_2_80 }"
        in commands
    )
    commands, _ = layout.plan(PutReal(FRONT, Real("10.0.1.5", 80)))
    assert any("numgen inc mod 1 map @slots_tcp_10_0_1_2_80" in c for c in commands)


def test_a_sandbox_runs_nft_with_nsenter_and_needs_a_path() -> None:
    sandbox = SandboxLb("t1", "/run/netns/mp-abcdef-t1", ["front"])
    assert sandbox.backend.table == SANDBOX_TABLE
    assert sandbox.backend._prefix == ["nsenter", "--net=/run/netns/mp-abcdef-t1", "--"]
    with pytest.raises(ValueError, match="must be a path"):
        SandboxLb("t1", "mp-abcdef-t1", ["front"])


# -- the driver ------------------------------------------------------------------------


class NullBackend:
    name = "null"

    async def start(self, desired: Table) -> None: ...

    async def apply(self, ops: Sequence[Op]) -> None: ...

    async def read(self) -> Table:
        return {}

    async def close(self) -> None: ...


class MemorySandbox(SandboxLb):
    """A sandbox whose 'kernel' is a dict (the real one: tests/lb/test_sandbox_lb.py)."""

    def __init__(self, key: str, netns: str, networks: Sequence[str]) -> None:
        super().__init__(key, netns, networks)
        self.table: Table | None = None
        self.batches: list[list[Op]] = []
        self.closed = False

    async def start(self, desired: Table) -> None:
        self.table = dict(desired)

    async def apply(self, ops: Sequence[Op]) -> None:
        assert self.table is not None
        self.batches.append(list(ops))
        apply_ops(self.table, ops)

    async def close(self) -> None:
        if self.vanished():
            raise RuntimeError("not reached: the driver only closes what exists")
        self.closed = True


async def test_the_driver_feeds_open_sandboxes_and_closes_them(tmp_path: Path) -> None:
    made: list[MemorySandbox] = []

    def make(key: str, netns: str, networks: Sequence[str]) -> MemorySandbox:
        made.append(MemorySandbox(key, netns, networks))
        return made[-1]

    netns = tmp_path / "ns"
    netns.touch()
    driver = LbDriver(LbView(NODE), NullBackend(), make_sandbox=make)
    records = two_services()
    driver.load(records)
    await driver.start()
    driver.open_sandbox("t1", str(netns), ("front",))
    driver.open_sandbox("t1", str(netns), ("front",))  # idempotent
    await driver.settled()
    assert len(made) == 1
    sandbox = made[0]
    assert sandbox.table is not None and set(sandbox.table) == {FRONT}
    a = records[2]
    driver.on_change(put(a, dataclasses.replace(a, health=Health.UNHEALTHY)))
    c = records[4]
    driver.on_change(delete(c))  # api: not the sandbox's
    await driver.settled()
    assert sandbox.batches == [[DeleteReal(FRONT, Real("10.0.1.5", 80))]]
    assert set(sandbox.table[FRONT].reals) == {Real("10.0.1.6", 80)}
    described = await driver.describe()
    assert described["sandboxes"] == [
        {"key": "t1", "netns": str(netns), "networks": ["front"], "errors": 0, "vips": 1}
    ]
    driver.close_sandbox("t1")
    await driver.settled()
    assert sandbox.closed and driver.sandboxes() == {}
    await driver.close()


async def test_a_vanished_namespace_is_dropped_and_counted(tmp_path: Path) -> None:
    driver = LbDriver(LbView(NODE), NullBackend())  # the real SandboxLb: nsenter fails
    driver.load(two_services())
    await driver.start()
    driver.open_sandbox("gone", str(tmp_path / "no-such-ns"), ("front",))
    await driver.settled()
    assert driver.sandboxes() == {}
    assert driver.sandboxes_vanished == 1 and driver.sandbox_errors == 0
    await driver.close()


async def test_open_from_another_thread_and_a_change_of_networks_in_place(
    tmp_path: Path,
) -> None:
    made: list[MemorySandbox] = []

    def make(key: str, netns: str, networks: Sequence[str]) -> MemorySandbox:
        made.append(MemorySandbox(key, netns, networks))
        return made[-1]

    netns = tmp_path / "ns"
    netns.touch()
    driver = LbDriver(LbView(NODE), NullBackend(), make_sandbox=make)
    records = two_services()
    driver.load(records)
    await driver.start()
    # The sandbox manager calls from its kernel worker thread: queued when it returns.
    await asyncio.to_thread(driver.open_sandbox, "t1", str(netns), ("front",))
    await driver.settled()
    assert made[0].table is not None and set(made[0].table) == {FRONT}
    # Its service joined "back": same sandbox, same table, one more VIP.
    await asyncio.to_thread(driver.open_sandbox, "t1", str(netns), ("front", "back"))
    await driver.settled()
    assert len(made) == 1 and set(made[0].table) == {FRONT, BACK}
    c = records[4]
    driver.on_change(delete(c))  # api's task: now the sandbox's business
    await driver.settled()
    assert made[0].batches[-1] == [DeleteReal(BACK, Real("10.0.2.5", 80))]
    await asyncio.to_thread(driver.close_sandbox, "t1")
    await driver.settled()
    assert made[0].closed and driver.sandboxes() == {}
    await driver.close()

"""The sandbox manager's shell (mesh/sandbox/manager.py) with a fake kernel: jobs in feed
order on one thread, DNS and LB opened after the kernel work, `ready` for the API,
reconciliation at start touching only our prefix, failures reported, not fatal."""

from __future__ import annotations

import dataclasses
import signal
import threading

import pytest

from mesh.core.model import Change, Kind, Network, Record, Task
from mesh.errors import SandboxFailed
from mesh.sandbox.driver import EndpointPlan, NetworkPlan, Owned
from mesh.sandbox.manager import SandboxManager
from mesh.sandbox.names import netns_name, netns_prefix, veth_name
from tests.unit.test_sandbox_plan import NETS, NODE, A, C, task


class FakeKernel:
    """A bridge driver and the namespaces, as sets; every call logged with its thread."""

    name = "bridge"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.threads: set[str] = set()
        self.bridges: set[str] = set()
        self.veths: set[str] = set()
        self.namespaces: set[str] = set()
        self.fail_join: set[str] = set()

    def _log(self, what: str, arg: str) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append((what, arg))

    # Driver
    def create_network(self, net: NetworkPlan) -> None:
        self._log("create_network", net.name)
        self.bridges.add(net.id[:8])

    def delete_network(self, net_id: str) -> None:
        self._log("delete_network", net_id)
        self.bridges.discard(net_id[:8])

    def join(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None:
        self._log("join", f"{ep.task_id}/{ep.interface}@{netns}")
        if ep.task_id in self.fail_join:
            raise OSError(f"cannot join {ep.task_id}")
        self.veths.add(veth_name(ep.task_id, ep.index))

    def leave(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None:
        self._log("leave", f"{ep.task_id}/{ep.interface}")
        self.veths.discard(veth_name(ep.task_id, ep.index))

    def owned(self) -> Owned:
        return Owned(networks=frozenset(self.bridges), endpoints=frozenset(self.veths))

    # Namespaces
    def create(self, name: str) -> str:
        self._log("netns_create", name)
        self.namespaces.add(name)
        return f"/run/netns/{name}"

    def adopt(self, spec: str) -> str:
        self._log("netns_adopt", spec)
        return spec

    def delete(self, name: str) -> None:
        self._log("netns_delete", name)
        self.namespaces.discard(name)

    def list(self, prefix: str) -> list[str]:
        return sorted(self.namespaces)  # unfiltered: the manager must filter

    def write_resolv_conf(self, name: str) -> None:
        self._log("resolv_conf", name)

    def delete_link(self, name: str) -> None:
        self._log("delete_link", name)
        self.veths.discard(name)


class FakeServer:
    def __init__(self, kernel: FakeKernel, what: str) -> None:
        self.kernel = kernel
        self.what = what
        self.open: dict[str, tuple[str, tuple[str, ...]]] = {}

    def open_sandbox(self, key: str, netns: str, networks: tuple[str, ...]) -> None:
        self.kernel.calls.append((f"{self.what}_open", key))
        self.open[key] = (netns, networks)

    def close_sandbox(self, key: str) -> None:
        self.kernel.calls.append((f"{self.what}_close", key))
        self.open.pop(key, None)


def manager(kernel: FakeKernel) -> tuple[SandboxManager, FakeServer, FakeServer]:
    dns, lb = FakeServer(kernel, "dns"), FakeServer(kernel, "lb")
    return (
        SandboxManager(NODE, {"bridge": kernel}, kernel, (dns, lb), kernel.delete_link),
        dns,
        lb,
    )


def change(before: Record | None, after: Record) -> Change:
    kind = Kind.TASK if isinstance(after, Task) else Kind.NETWORK
    return Change(kind, after.key, before, after)


async def test_a_task_sandbox_is_made_in_order_then_served_then_ready() -> None:
    kernel = FakeKernel()
    mgr, dns, lb = manager(kernel)
    mgr.load([A, C])
    await mgr.start()
    try:
        t = task("t1aaaaaaaaaa", "a", "c")
        mgr.on_change(change(None, t))
        await mgr.ready(t.id, 5)
        name = netns_name(NODE, t.id)
        path = f"/run/netns/{name}"
        after_reconcile = kernel.calls[kernel.calls.index(("netns_create", name)) :]
        assert after_reconcile == [
            ("netns_create", name),
            ("resolv_conf", name),
            ("join", f"{t.id}/eth0@{path}"),
            ("join", f"{t.id}/eth1@{path}"),
            ("dns_open", t.id),
            ("lb_open", t.id),
        ]
        assert dns.open[t.id] == (path, ("a", "c"))
        assert lb.open[t.id] == (path, ("a", "c"))
        # One worker thread for all the kernel work, never the loop's.
        assert len(kernel.threads) == 1
        assert kernel.threads != {threading.current_thread().name}

        # A health change is nothing to the kernel.
        kernel.calls.clear()
        mgr.on_change(change(t, dataclasses.replace(t, health_output="ok")))
        await mgr.idle()
        assert kernel.calls == []

        gone = dataclasses.replace(t, deleted=True)
        mgr.on_change(change(t, gone))
        await mgr.idle()
        assert kernel.calls == [
            ("dns_close", t.id),
            ("lb_close", t.id),
            ("leave", f"{t.id}/eth1"),
            ("leave", f"{t.id}/eth0"),
            ("netns_delete", name),
        ]
        assert kernel.namespaces == set() and kernel.veths == set()
        assert dns.open == {} and lb.open == {}
        with pytest.raises(SandboxFailed):
            await mgr.ready(t.id, 1)
    finally:
        await mgr.stop()


async def test_a_failed_join_is_the_reason_ready_raises_and_the_manager_goes_on() -> None:
    kernel = FakeKernel()
    kernel.fail_join.add("t1aaaaaaaaaa")
    mgr, dns, _ = manager(kernel)
    mgr.load([A])
    await mgr.start()
    try:
        bad = task("t1aaaaaaaaaa", "a")
        mgr.on_change(change(None, bad))
        with pytest.raises(SandboxFailed, match="cannot join t1aaaaaaaaaa"):
            await mgr.ready(bad.id, 5)
        assert bad.id not in dns.open
        good = task("t2bbbbbbbbbb", "a")
        mgr.on_change(change(None, good))
        await mgr.ready(good.id, 5)
        assert mgr.stats.failed == 1
    finally:
        await mgr.stop()


async def test_ready_times_out_with_a_reason() -> None:
    kernel = FakeKernel()
    mgr, _, _ = manager(kernel)
    mgr.load([A])
    # Not started: nothing runs the jobs.
    t = task("t1aaaaaaaaaa", "a")
    mgr.on_change(change(None, t))
    with pytest.raises(SandboxFailed, match="not up within"):
        await mgr.ready(t.id, 0.05)
    await mgr.stop()


async def test_start_reconciles_only_our_prefix_and_repairs_what_is_lacking() -> None:
    kernel = FakeKernel()
    kept = task("t1aaaaaaaaaa", "a")
    lost_veth = task("t2bbbbbbbbbb", "a")
    # As a kill -9 left it, then a veth deleted by hand and an orphan of ours added.
    kernel.bridges = {A.id[:8], "dddddddd"}
    kernel.namespaces = {
        netns_name(NODE, kept.id),
        netns_name(NODE, lost_veth.id),
        f"{netns_prefix(NODE)}orphan000000",
        "mp-ffffff-someone-elses",
        "unrelated",
    }
    kernel.veths = {veth_name(kept.id, 0), "mpvorphan0000"}
    other_node = task("t3cccccccccc", "a", node="n2")
    mgr, dns, _ = manager(kernel)
    records: list[Record] = [A, kept, lost_veth, other_node]
    mgr.load(records)
    await mgr.start()
    try:
        await mgr.ready(kept.id, 5)
        await mgr.ready(lost_veth.id, 5)
        await mgr.idle()
        assert kernel.namespaces == {
            netns_name(NODE, kept.id),
            netns_name(NODE, lost_veth.id),
            "mp-ffffff-someone-elses",
            "unrelated",
        }
        assert kernel.veths == {veth_name(kept.id, 0), veth_name(lost_veth.id, 0)}
        assert kernel.bridges == {A.id[:8]}
        assert set(dns.open) == {kept.id, lost_veth.id}
        assert mgr.stats.orphans_removed == 3  # a namespace, a veth, a bridge
        assert mgr.stats.repaired == 1
    finally:
        await mgr.stop()


async def test_networks_follow_the_feed() -> None:
    kernel = FakeKernel()
    mgr, _, _ = manager(kernel)
    mgr.load([])
    await mgr.start()
    try:
        mgr.on_change(change(None, A))
        other = Network(
            name="x", id="eeeeeeee", driver="bridge", subnet="10.9.0.0/24", gateway="10.9.0.1"
        )
        mgr.on_change(change(None, dataclasses.replace(other, node="n2")))
        await mgr.idle()
        assert kernel.bridges == {A.id[:8]}
        mgr.on_change(change(A, dataclasses.replace(A, deleted=True)))
        await mgr.idle()
        assert kernel.bridges == set()
        assert set(NETS) >= {"a"}
    finally:
        await mgr.stop()


class FakeHost:
    """The host's processes: a namespace path's inode, the pids inside, their kills."""

    def __init__(self, kernel: FakeKernel, inside: dict[str, list[int]]) -> None:
        self.kernel = kernel
        self.inside = {f"/run/netns/{name}": pids for name, pids in inside.items()}
        self.by_inode: dict[int, str] = {}

    def netns_inode(self, path: str) -> int | None:
        name = path.rsplit("/", 1)[-1]
        if name not in self.kernel.namespaces:
            return None
        self.by_inode[hash(path) & 0xFFFF] = path
        return hash(path) & 0xFFFF

    def find(self, inode: int) -> list[int]:
        return list(self.inside.get(self.by_inode[inode], []))

    def kill(self, pid: int, sig: int) -> None:
        self.kernel.calls.append(("kill", f"{pid}/{signal.Signals(sig).name}"))
        for pids in self.inside.values():
            if pid in pids:
                pids.remove(pid)


async def test_the_processes_of_a_sandbox_we_made_end_before_it_goes_never_an_adopted_ones() -> (
    None
):
    kernel = FakeKernel()
    made = task("t1aaaaaaaaaa", "a")
    adopted = task("t2bbbbbbbbbb", "a", adopted="/proc/4242/ns/net")
    orphan = f"{netns_prefix(NODE)}orphan000000"
    kernel.namespaces = {netns_name(NODE, made.id), orphan, "someone-elses"}
    host = FakeHost(
        kernel,
        {netns_name(NODE, made.id): [501, 502], orphan: [601], "someone-elses": [701]},
    )
    dns, lb = FakeServer(kernel, "dns"), FakeServer(kernel, "lb")
    mgr = SandboxManager(
        NODE,
        {"bridge": kernel},
        kernel,
        (dns, lb),
        kernel.delete_link,
        host=host,  # type: ignore[arg-type]
    )
    mgr.load([A, made, adopted])
    await mgr.start()
    try:
        await mgr.ready(made.id, 5)
        await mgr.ready(adopted.id, 5)
        # The reconcile: the orphan's process went before its namespace.
        i = kernel.calls.index(("kill", "601/SIGTERM"))
        assert kernel.calls[i + 1] == ("netns_delete", orphan)
        kernel.calls.clear()
        mgr.on_change(change(made, dataclasses.replace(made, deleted=True)))
        mgr.on_change(change(adopted, dataclasses.replace(adopted, deleted=True)))
        await mgr.idle()
        assert kernel.calls[:3] == [
            ("kill", "501/SIGTERM"),
            ("kill", "502/SIGTERM"),
            ("dns_close", made.id),
        ]
        assert ("netns_delete", netns_name(NODE, made.id)) in kernel.calls
        # Nothing sent into the adopted namespace, nor into one that is not ours.
        assert [c for c in kernel.calls if c[0] == "kill"] == [
            ("kill", "501/SIGTERM"),
            ("kill", "502/SIGTERM"),
        ]
        assert host.inside["/run/netns/someone-elses"] == [701]
        assert mgr.stats.processes_ended == 3
        assert mgr.stats.processes_killed == 0
    finally:
        await mgr.stop()

"""The sandbox manager's overlay jobs with a recording fake driver (sans kernel): every
overlay network is made on every node once it has its own address there, its peers are
programmed after it and again whenever the table changes (a remote task, a node going
down), and sandboxes on overlays route through the node's own address. Issue 16."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Collection

import pytest

from mesh.core.model import INGRESS, Change, Kind, Network, Node, Task
from mesh.liveness import Liveness
from mesh.sandbox.driver import EndpointPlan, NetworkPlan, Owned
from mesh.sandbox.manager import SandboxManager
from mesh.sandbox.names import mac_of
from mesh.sandbox.overlay import Peer
from mesh.sandbox.plan import (
    CreateNetwork,
    NetworkWant,
    SyncPeers,
    network_transition,
    network_want,
)
from mesh.state.store import Store
from tests.unit.test_overlay_state import exchange, node, overlay, service, task
from tests.unit.test_sandbox_manager import FakeKernel

VTEPS = {"n1": "192.0.2.1", "n2": "192.0.2.2", "n3": "192.0.2.3"}


class FakeOverlay(FakeKernel):
    """The overlay driver as the manager sees it: plans made, and peers set, per network."""

    name = "overlay"

    def __init__(self) -> None:
        super().__init__()
        self.plans: dict[str, NetworkPlan] = {}
        self.peers: dict[str, set[Peer]] = {}
        self.joined: dict[str, tuple[NetworkPlan, EndpointPlan]] = {}

    def create_network(self, net: NetworkPlan) -> None:
        super().create_network(net)
        self.plans[net.name] = net

    def join(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None:
        super().join(net, ep, netns)
        self.joined[f"{ep.task_id}/{ep.index}"] = (net, ep)

    def set_peers(self, net: NetworkPlan, peers: Collection[Peer]) -> None:
        self._log("set_peers", net.name)
        assert net.name in self.plans, "peers before the network was made"
        assert all(isinstance(p, Peer) for p in peers)
        self.peers[net.name] = set(peers)

    def owned(self) -> Owned:
        return Owned(networks=frozenset(self.bridges), endpoints=frozenset(self.veths))


def feed(mgr: SandboxManager, changes: list[Change], liveness: Liveness | None = None) -> None:
    for change in changes:
        mgr.on_change(change if liveness is None else liveness.transform(change))


def setup() -> tuple[list[Store], FakeOverlay, SandboxManager]:
    stores = [node(name, vtep) for name, vtep in VTEPS.items()]
    overlay(stores[0], "app", subnet="10.50.0.0/24")
    service(stores[0], "web", "app")
    exchange(*stores)
    kernel = FakeOverlay()
    mgr = SandboxManager("n1", {"overlay": kernel}, kernel, (), kernel.delete_link)
    mgr.load(stores[0].all_records())
    return stores, kernel, mgr


def peer(store: Store, name: str, network: str) -> Peer:
    record = store.node_record(name)
    assert record is not None
    address = record.addresses[network]
    return Peer(mac=mac_of(address), address=address, vtep=record.vtep)


def task_peer(t: Task) -> Peer:
    assert t.sandbox is not None
    ep = t.sandbox.endpoints[0]
    return Peer(mac=ep.mac, address=ep.address, vtep=VTEPS[t.node])


async def test_every_overlay_is_made_with_its_vni_and_own_address_then_its_peers() -> None:
    stores, kernel, mgr = setup()
    await mgr.start()
    try:
        await mgr.idle()
        n1 = stores[0]
        own = n1.node_record("n1")
        assert own is not None
        assert set(kernel.plans) == {INGRESS, "app"}
        assert kernel.plans[INGRESS].vni == 4096
        assert kernel.plans["app"].vni == n1.network("app").vni == 4097
        assert kernel.plans["app"].host_address == own.addresses["app"]
        assert kernel.peers["app"] == {peer(n1, "n2", "app"), peer(n1, "n3", "app")}
        # each network's peers come after its creation, on the one worker thread
        calls = kernel.calls
        assert calls.index(("create_network", "app")) < calls.index(("set_peers", "app"))
        assert len(kernel.threads) == 1
        assert kernel.threads != {threading.current_thread().name}
        assert mgr.describe()["overlays"] == {
            INGRESS: {"vni": 4096, "host_address": own.addresses[INGRESS], "peers": 2},
            "app": {"vni": 4097, "host_address": own.addresses["app"], "peers": 2},
        }
    finally:
        await mgr.stop()


async def test_a_remote_task_is_added_and_a_dead_nodes_entries_withdrawn() -> None:
    stores, kernel, mgr = setup()
    n1, n2, n3 = stores
    liveness = Liveness(n1)
    await mgr.start()
    try:
        await mgr.idle()
        t2 = task(n2, "web")
        n3.merge(t2)  # one after the other: no address is handed out twice here
        t3 = task(n3, "web")
        for record in (t2, t3):
            feed(mgr, n1.merge(record), liveness)
        await mgr.idle()
        assert kernel.peers["app"] == {
            peer(n1, "n2", "app"),
            peer(n1, "n3", "app"),
            task_peer(t2),
            task_peer(t3),
        }
        syncs = kernel.calls.count(("set_peers", "app"))
        # n3 is declared dead: its task and its own address go, on every overlay
        feed(mgr, liveness.node_down("n3"))
        await mgr.idle()
        assert kernel.peers["app"] == {peer(n1, "n2", "app"), task_peer(t2)}
        assert kernel.peers[INGRESS] == {peer(n1, "n2", INGRESS)}
        assert kernel.calls.count(("set_peers", "app")) == syncs + 1
        # and comes back
        feed(mgr, liveness.node_up("n3"))
        await mgr.idle()
        assert task_peer(t3) in kernel.peers["app"]
        # a change that leaves the table as it is programs nothing
        before = len(kernel.calls)
        feed(mgr, [Change(Kind.TASK, t2.id, t2, t2)])
        await mgr.idle()
        assert kernel.calls[before:] == []
    finally:
        await mgr.stop()


async def test_a_local_sandbox_on_an_overlay_routes_through_the_nodes_own_address() -> None:
    stores, kernel, mgr = setup()
    n1 = stores[0]
    await mgr.start()
    try:
        t1 = task(n1, "web")
        feed(mgr, [Change(Kind.TASK, t1.id, None, t1)])
        await mgr.ready(t1.id, 5)
        net, ep = kernel.joined[f"{t1.id}/0"]
        own = n1.node_record("n1")
        assert own is not None
        assert ep.gateway == own.addresses["app"] == net.host_address
        assert ep.address == t1.address and net.vni == 4097
        # a local task is on this node's bridge: never a peer here
        assert all(p.address != t1.address for p in kernel.peers["app"])
    finally:
        await mgr.stop()


async def test_when_the_nodes_own_address_moves_network_and_sandboxes_follow() -> None:
    stores, kernel, mgr = setup()
    n1 = stores[0]
    await mgr.start()
    try:
        t1 = task(n1, "web")
        feed(mgr, [Change(Kind.TASK, t1.id, None, t1)])
        await mgr.ready(t1.id, 5)
        own = n1.node_record("n1")
        assert own is not None
        moved = Node(
            name="n1",
            vtep=own.vtep,
            addresses={**own.addresses, "app": "10.50.0.200"},
            version=own.version,
        )
        mgr.on_change(Change(Kind.NODE, "n1", own, moved))
        await mgr.idle()
        assert kernel.plans["app"].host_address == "10.50.0.200"
        net, ep = kernel.joined[f"{t1.id}/0"]
        assert ep.gateway == "10.50.0.200" == net.host_address
        last_create = max(i for i, c in enumerate(kernel.calls) if c == ("create_network", "app"))
        assert ("set_peers", "app") in kernel.calls[last_create:]
    finally:
        await mgr.stop()


def test_an_overlay_is_wanted_only_once_the_node_has_an_address_there() -> None:
    store = node("n9")
    net = overlay(store, "app")
    assert network_want(net, "n9") is None  # no address here: nothing to make
    want = network_want(net, "n9", "10.0.1.9")
    assert want is not None and want.plan.host_address == "10.0.1.9"
    assert want.plan.vni == net.vni
    assert network_transition(None, want) == [CreateNetwork(want), SyncPeers("app")]
    bridge_like = NetworkWant("bridge", want.plan)
    assert network_transition(None, bridge_like) == [CreateNetwork(bridge_like)]


async def test_a_failed_set_peers_is_counted_and_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("mesh.sandbox.manager.PEER_RETRY", 0.05)
    stores, kernel, mgr = setup()
    failures = [1]
    real = kernel.set_peers

    def flaky(net: NetworkPlan, peers: Collection[Peer]) -> None:
        if net.name == "app" and failures:
            failures.pop()
            raise OSError("netlink busy")
        real(net, peers)

    kernel.set_peers = flaky  # type: ignore[method-assign]
    await mgr.start()
    try:
        await mgr.idle()
        assert "app" not in kernel.peers and mgr.stats.failed == 1
        await asyncio.sleep(0.2)
        await mgr.idle()
        assert kernel.peers["app"] == {peer(stores[0], "n2", "app"), peer(stores[0], "n3", "app")}
    finally:
        await mgr.stop()


def test_ingress_is_served_for_the_routing_mesh_not_for_names_nor_the_way_out() -> None:
    from lb.http.routes import RouteTable
    from lb.view import build_table
    from mesh.sandbox.plan import sandbox_want
    from mesh.state.specs import PortSpec, ServiceSpec

    stores = [node(name, vtep) for name, vtep in VTEPS.items()]
    n1, n3 = stores[0], stores[2]
    overlay(n1, "app", subnet="10.50.0.0/24")
    spec = ServiceSpec(
        name="pub",
        networks=("app",),
        ports=(PortSpec(target_port=80, published_port=8080),),
        labels={"mesh.http.hosts": "pub.test", "mesh.http.port": "80"},
    )
    n1.create_service(spec, 1_000.0)
    exchange(*stores)
    remote = task(n3, "pub")
    local = task(n1, "pub")
    exchange(*stores)
    remote, local = n1.task(remote.id), n1.task(local.id)
    records = {r.key: r for r in n1.all_records() if isinstance(r, Network)}
    own = n1.node_record("n1")
    assert own is not None
    want = sandbox_want(local, "n1", records, own.addresses)
    assert want is not None
    assert want.networks == ("app",)  # DNS and the LB inside: not ingress
    ingress_ep = [e for e in want.endpoints if e.network.name == INGRESS]
    assert len(ingress_ep) == 1 and ingress_ep[0].endpoint.gateway is None
    # the routing mesh of node 1: its own task at its first address (the client's address
    # kept), node 3's at its ingress address
    table = build_table(list(n1.all_records()), "n1")
    published = next(vs for key, vs in table.items() if key.port == 8080)
    reals = {r.address for r in published.reals}
    assert reals == {local.address, remote.address_on(INGRESS)}
    assert remote.address_on(INGRESS) != remote.address
    # the HRM reaches every task at its ingress address
    routes = RouteTable()
    routes.load(list(n1.all_records()))
    match = routes.match("pub.test", "/")
    assert match is not None
    assert {e.address for e in match.endpoints} == {
        local.address_on(INGRESS),
        remote.address_on(INGRESS),
    }


async def test_a_task_re_addressed_by_the_repair_is_left_and_joined_again() -> None:
    stores, kernel, mgr = setup()
    n1, n2 = stores[0], stores[1]
    liveness = Liveness(n1)
    await mgr.start()
    try:
        mine = task(n1, "web", now=2_000.0)  # younger
        theirs = task(n2, "web", now=1_000.0)  # older, same address, at one moment
        assert mine.address == theirs.address
        feed(mgr, [Change(Kind.TASK, mine.id, None, mine)], liveness)
        await mgr.ready(mine.id, 5)
        feed(mgr, n1.merge(theirs), liveness)  # n1 repairs its own, younger task
        await mgr.ready(mine.id, 5)
        await mgr.idle()
        moved = n1.task(mine.id)
        assert moved.address != theirs.address
        net, ep = kernel.joined[f"{mine.id}/0"]
        assert ep.address == moved.address and net.name == "app"
        leaves = [c for c in kernel.calls if c[0] == "leave"]
        assert leaves and leaves[-1][1].startswith(mine.id)
        # the peer for that address is node 2's task, and only it
        at = [p for p in kernel.peers["app"] if p.address == theirs.address]
        assert at == [task_peer(theirs)]
    finally:
        await mgr.stop()

"""Overlay networks in the replicated state: VNIs, endpoint addresses and node addresses
handed out by several nodes at one moment, and how each collision is repaired.

Issue 16. The store is sans-IO: two stores stand for two nodes; `exchange` plays
gossip between them (every record each holds, merged into the other, until neither
changes), so "at one moment" is: both write, then they meet.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random

import pytest

from mesh.core.codec import record_from_dict, record_to_dict
from mesh.core.model import (
    INGRESS,
    INGRESS_VNI,
    Kind,
    Network,
    Node,
    Service,
    Task,
    vni_of,
)
from mesh.errors import Conflict, Invalid
from mesh.ipam import Ipam, parse_pool
from mesh.liveness import Liveness
from mesh.state.specs import NetworkSpec, PortSpec, SandboxSpec, ServiceSpec, TaskSpec
from mesh.state.store import Store

NOW = 1_000.0


def node(name: str, vtep: str | None = None, seed: int = 1) -> Store:
    store = Store(name, Ipam(parse_pool("10.0.0.0/8")), random.Random(f"{name}/{seed}"))
    store.ensure_ingress()
    if vtep is not None:
        store.serve_overlays(vtep)
    return store


def overlay(store: Store, name: str, now: float = NOW, **kw: object) -> Network:
    spec = NetworkSpec(name=name, driver="overlay", **kw)  # type: ignore[arg-type]
    created = store.create_network(spec, now)[0].after
    assert isinstance(created, Network)
    return created


def service(store: Store, name: str, *networks: str) -> Service:
    created = store.create_service(ServiceSpec(name=name, networks=networks), NOW)[-1].after
    assert isinstance(created, Service)
    return created


def task(store: Store, svc: str, now: float = NOW) -> Task:
    created = store.add_task(TaskSpec(service=svc, sandbox=SandboxSpec()), now)[-1].after
    assert isinstance(created, Task)
    return created


def exchange(*stores: Store) -> int:
    """Gossip until quiet: every store merges every other's records. Returns the rounds."""
    for rounds in range(1, 20):
        changed = False
        for receiver in stores:
            for sender in stores:
                if sender is receiver:
                    continue
                for record in list(sender.all_records()):
                    changed |= bool(receiver.merge(record))
        if not changed:
            return rounds
    raise AssertionError("the stores did not converge")


def same_state(*stores: Store) -> bool:
    views = [
        sorted((r.key, r.version.clock, r.version.node) for r in s.all_records()) for s in stores
    ]
    return all(v == views[0] for v in views)


# -- VNIs ---------------------------------------------------------------------------


def test_overlays_count_vnis_up_from_4097_ingress_has_4096_other_drivers_none() -> None:
    store = node("n1")
    assert store.network(INGRESS).vni == INGRESS_VNI == 4096
    assert overlay(store, "a").vni == 4097
    assert overlay(store, "b").vni == 4098
    bridge = store.create_network(NetworkSpec(name="br", driver="bridge"), NOW)[0].after
    assert isinstance(bridge, Network) and bridge.vni == 0
    store.remove_network("a", NOW)
    assert overlay(store, "c").vni == 4097  # the lowest free one


def test_two_nodes_creating_overlays_at_one_moment_end_with_distinct_vnis() -> None:
    a, b = node("n1", "192.0.2.1"), node("n2", "192.0.2.2")
    older = overlay(a, "front", now=NOW)
    younger = overlay(b, "back", now=NOW + 1)
    assert older.vni == younger.vni == 4097
    exchange(a, b)
    for store in (a, b):
        assert store.network("front").vni == 4097  # the older keeps its VNI
        assert store.network("back").vni == 4098
        assert store.vni_conflicts() == []
    # repaired once, by the node that wrote the younger network
    assert a.network("back").version.node == "n2"
    assert same_state(a, b)


def test_the_vni_repair_happens_also_on_nodes_without_overlays_serving() -> None:
    # n3 runs no sandboxes (no vtep): it learns the repair, it does not make one
    a, b, c = node("n1", "192.0.2.1"), node("n2", "192.0.2.2"), node("n3")
    overlay(a, "x", now=NOW)
    overlay(b, "y", now=NOW + 1)
    exchange(a, b, c)
    assert {c.network("x").vni, c.network("y").vni} == {4097, 4098}
    assert c.node_record("n3") is None


def test_an_overlay_record_of_an_older_agent_loads_with_vni_0_and_is_numbered() -> None:
    old = node("n1")
    net = overlay(old, "legacy")
    raw = record_to_dict(net)
    del raw["vni"]  # as an agent before overlays wrote it
    legacy = record_from_dict(raw)
    assert isinstance(legacy, Network) and legacy.vni == 0
    assert vni_of(legacy) == 0
    fresh = node("n2")
    fresh.merge(legacy)
    assert fresh.network("legacy").vni == 0  # a node without overlays leaves it
    fresh.serve_overlays("192.0.2.2")
    assert fresh.network("legacy").vni == 4097
    # the old ingress (no vni written) is 4096 whatever its record says
    ingress = dataclasses.replace(fresh.network(INGRESS), vni=0)
    assert vni_of(ingress) == INGRESS_VNI


def test_a_vni_outside_24_bits_is_refused_by_the_codec() -> None:
    raw = record_to_dict(overlay(node("n1"), "a"))
    for bad in (-1, 1 << 24):
        with pytest.raises(ValueError, match="24-bit"):
            record_from_dict(raw | {"vni": bad})


# -- endpoints handed out by two nodes ---------------------------------------------------


def test_two_nodes_addressing_tasks_at_one_moment_repair_the_younger() -> None:
    a, b = node("n1", "192.0.2.1"), node("n2", "192.0.2.2")
    overlay(a, "app", subnet="10.50.0.0/24")
    service(a, "web", "app")
    exchange(a, b)
    first = task(a, "web", now=NOW + 10)
    second = task(b, "web", now=NOW + 11)
    assert first.address == second.address  # both picked the lowest free one
    exchange(a, b)
    for store in (a, b):
        assert store.task(first.id).address == first.address  # the older keeps it
        moved = store.task(second.id)
        assert moved.address != first.address
        assert moved.sandbox is not None and moved.sandbox.endpoints[0].address == moved.address
        ep = moved.sandbox.endpoints[0]
        assert ep.mac == "02:42:" + ":".join(
            f"{b:02x}" for b in ipaddress.IPv4Address(ep.address).packed
        )
        assert moved.version.node == "n2"  # by its own node, the only writer of it
        assert store.endpoint_conflicts() == []
    assert same_state(a, b)


def test_three_nodes_addressing_at_one_moment_converge_without_conflicts() -> None:
    stores = [node(f"n{i}", f"192.0.2.{i}") for i in (1, 2, 3)]
    overlay(stores[0], "app", subnet="10.50.0.0/24")
    service(stores[0], "web", "app")
    exchange(*stores)
    tasks = [task(s, "web", now=NOW + i) for i, s in enumerate(stores) for _ in range(3)]
    exchange(*stores)
    for store in stores:
        assert store.endpoint_conflicts() == []
        addresses = [store.task(t.id).address for t in tasks]
        assert len(set(addresses)) == len(tasks)
        nodes = [store.node_record(f"n{i}") for i in (1, 2, 3)]
        node_addresses = [n.addresses["app"] for n in nodes if n is not None]
        assert len(node_addresses) == 3 and not set(node_addresses) & set(addresses)
    assert same_state(*stores)


# -- node addresses -------------------------------------------------------------------------


def test_a_node_serving_overlays_has_an_address_on_each_and_its_vtep() -> None:
    store = node("n1", "192.0.2.1")
    overlay(store, "app", subnet="10.50.0.0/24")
    own = store.node_record("n1")
    assert own is not None and own.vtep == "192.0.2.1"
    assert set(own.addresses) == {INGRESS, "app"}
    assert own.addresses["app"] == "10.50.0.2"  # .1 is the gateway
    # neither a VIP nor a task ever gets the node's address
    assert service(store, "web", "app").vips[0].address == "10.50.0.3"
    assert task(store, "web").address == "10.50.0.4"
    store.remove_service("web", NOW)
    store.remove_network("app", NOW)
    own = store.node_record("n1")
    assert own is not None and set(own.addresses) == {INGRESS}


def test_a_node_without_sandboxes_refuses_overlay_sandboxes_and_writes_no_node() -> None:
    store = node("n1")
    overlay(store, "app")
    service(store, "web", "app")
    with pytest.raises(Invalid, match="serves no overlay"):
        task(store, "web")
    assert store.node_record("n1") is None


def test_node_addresses_given_out_at_one_moment_end_distinct() -> None:
    a, b = node("n1", "192.0.2.1"), node("n2", "192.0.2.2")
    net = overlay(a, "app", subnet="10.50.0.0/24")
    b.merge(net)  # each gives itself the lowest free address, the same one
    pre_a, pre_b = a.node_record("n1"), b.node_record("n2")
    assert pre_a is not None and pre_b is not None
    assert pre_a.addresses["app"] == pre_b.addresses["app"]
    exchange(a, b)
    for store in (a, b):
        n1, n2 = store.node_record("n1"), store.node_record("n2")
        assert n1 is not None and n2 is not None
        assert n1.addresses["app"] == pre_a.addresses["app"]  # the smaller name keeps it
        assert n2.addresses["app"] != n1.addresses["app"]
        assert store.endpoint_conflicts() == []
    assert same_state(a, b)


def test_a_node_address_gives_way_to_a_task_that_took_it_at_one_moment() -> None:
    a, b = node("n1", "192.0.2.1"), node("n2", "192.0.2.2")
    overlay(a, "app", subnet="10.50.0.0/24")
    service(a, "web", "app")
    exchange(a, b)
    a_addr = a.node_record("n1")
    assert a_addr is not None
    # n2 forgets n1's record for a moment: as if n1 wrote it while they were apart
    b_view = node("n2", "192.0.2.2")
    for record in b.all_records():
        if not (isinstance(record, Node) and record.name == "n1"):
            b_view.merge(record)
    t = task(b_view, "web", now=NOW + 5)
    assert t.address == a_addr.addresses["app"]
    exchange(a, b_view)
    for store in (a, b_view):
        assert store.task(t.id).address == t.address  # the task keeps it
        n1 = store.node_record("n1")
        assert n1 is not None and n1.addresses["app"] != t.address
        assert store.endpoint_conflicts() == []


def test_a_restarted_node_reasserts_its_record_over_an_older_copy() -> None:
    a, b = node("n1", "192.0.2.1"), node("n2", "192.0.2.2")
    overlay(a, "app", subnet="10.50.0.0/24")
    exchange(a, b)
    # n1 loses its data dir and comes back with another VTEP: its fresh record is older
    # (a low clock) than the copy the cluster holds
    again = node("n1", "192.0.2.9")
    exchange(again, b)
    for store in (again, b):
        n1 = store.node_record("n1")
        assert n1 is not None and n1.vtep == "192.0.2.9"
        assert set(n1.addresses) == {INGRESS, "app"}


def test_a_down_nodes_record_is_hidden_from_the_views_and_shown_again() -> None:
    a, b = node("n1", "192.0.2.1"), node("n2", "192.0.2.2")
    exchange(a, b)
    liveness = Liveness(a)
    n2 = a.node_record("n2")
    assert n2 is not None
    changes = liveness.node_down("n2")
    assert [(c.kind, c.key, c.after.deleted) for c in changes] == [(Kind.NODE, "n2", True)]
    assert liveness.hide(n2).deleted
    back = liveness.node_up("n2")
    assert [(c.kind, c.after.deleted) for c in back] == [(Kind.NODE, False)]


def test_node_records_round_trip_and_bad_addresses_are_refused() -> None:
    record = node("n1", "192.0.2.1").node_record("n1")
    assert record is not None
    raw = record_to_dict(record)
    assert record_from_dict(raw) == record
    for bad in ({"vtep": "nope"}, {"addresses": {"app": "10.0.0.300"}}, {"addresses": []}):
        with pytest.raises((ValueError, TypeError)):
            record_from_dict(raw | bad)


def test_a_vni_given_with_opt_is_checked_and_kept() -> None:
    store = node("n1")
    assert overlay(store, "a", options={"vni": "5000"}).vni == 5000
    assert overlay(store, "b").vni == 4097
    with pytest.raises(Conflict, match="VNI 5000 is network 'a'"):
        overlay(store, "c", options={"vni": "5000"})
    for bad in ("4096", "0", str(1 << 24), "x"):
        with pytest.raises(Invalid, match="vni="):
            overlay(store, "c", options={"vni": bad})


# -- ingress: the routing mesh's overlay ------------------------------------------------------


def test_a_task_of_a_publishing_service_joins_ingress_last_on_a_node_serving_overlays() -> None:
    store = node("n1", "192.0.2.1")
    store.create_network(NetworkSpec(name="br", driver="bridge", subnet="10.60.0.0/24"), NOW)
    spec = ServiceSpec(
        name="pub", networks=("br",), ports=(PortSpec(target_port=80, published_port=8080),)
    )
    store.create_service(spec, NOW)
    service(store, "quiet", "br")
    published = task(store, "pub")
    assert published.sandbox is not None
    assert [(e.network, e.interface) for e in published.sandbox.endpoints] == [
        ("br", "eth0"),
        (INGRESS, "eth1"),
    ]
    assert published.address == published.sandbox.endpoints[0].address  # its first network's
    own = store.node_record("n1")
    assert own is not None and published.address_on(INGRESS) != own.addresses[INGRESS]
    quiet = task(store, "quiet")
    assert quiet.sandbox is not None and [e.network for e in quiet.sandbox.endpoints] == ["br"]
    # a node without overlays keeps the bridge-only sandbox of before
    plain = node("n2")
    plain.create_network(NetworkSpec(name="br", driver="bridge", subnet="10.61.0.0/24"), NOW)
    plain.create_service(spec, NOW)
    alone = task(plain, "pub")
    assert alone.sandbox is not None and [e.network for e in alone.sandbox.endpoints] == ["br"]


def test_the_data_path_port_is_4789_unless_given_and_bounded() -> None:
    from mesh.config import ConfigError, load_config

    assert load_config([], env={}).data_path_port == 4789
    assert load_config(["--data-path-port", "4790"], env={}).data_path_port == 4790
    for bad in ("0", "65536", "vxlan"):
        with pytest.raises(ConfigError, match="data-path-port"):
            load_config(["--data-path-port", bad], env={})


def test_many_nodes_addressing_at_one_moment_leave_no_two_tasks_on_one_address() -> None:
    """Three holders of one address: the youngest moves first, and then the younger of
    the two left must move too. Its node learns that only from the first one's move (a
    record leaving the address, not arriving at it), so the repair looks at the
    addresses a merged task left as well as those it holds. Once in six seeds three
    tasks written at one moment used to end with two of them sharing an address."""
    for seed in range(1, 41):
        stores = [node(f"n{i}", f"192.0.2.{i}", seed=seed) for i in (1, 2, 3)]
        overlay(stores[0], "app", subnet="10.50.0.0/24")
        service(stores[0], "web", "app")
        exchange(*stores)
        tasks = [task(s, "web") for s in stores]
        assert len({t.address for t in tasks}) == 1  # each took the lowest free one
        exchange(*stores)
        for store in stores:
            assert store.endpoint_conflicts() == [], seed
            assert len({store.task(t.id).address for t in tasks}) == 3, seed
        assert same_state(*stores), seed


def test_many_nodes_giving_out_one_vip_at_one_moment_end_with_distinct_vips() -> None:
    """The same for VIPs: services created on three nodes at one moment all take the
    lowest free address of the network; each loser moves in turn."""
    for seed in range(1, 13):
        stores = [node(f"n{i}", f"192.0.2.{i}", seed=seed) for i in (1, 2, 3)]
        overlay(stores[0], "app", subnet="10.50.0.0/24")
        exchange(*stores)
        names = random.Random(seed).sample(["web0", "web1", "web2"], 3)  # who is youngest
        made = [service(s, name, "app") for name, s in zip(names, stores, strict=True)]
        assert len({m.vips[0].address for m in made}) == 1
        exchange(*stores)
        for store in stores:
            assert store.vip_conflicts() == [], seed
            vips = {store.service(m.name).vips[0].address for m in made}
            assert len(vips) == 3, seed
        assert same_state(*stores), seed


def test_many_nodes_numbering_overlays_at_one_moment_end_with_distinct_vnis() -> None:
    """And for VNIs: overlays created on three nodes at one moment take the lowest free
    VNI; each loser moves in turn, the second one after learning of the first's move."""
    for seed in range(1, 13):
        stores = [node(f"n{i}", f"192.0.2.{i}", seed=seed) for i in (1, 2, 3)]
        names = random.Random(seed).sample(["app0", "app1", "app2"], 3)
        made = [overlay(s, name) for name, s in zip(names, stores, strict=True)]
        assert len({vni_of(m) for m in made}) == 1
        exchange(*stores)
        for store in stores:
            assert store.vni_conflicts() == [], seed
        assert same_state(*stores), seed

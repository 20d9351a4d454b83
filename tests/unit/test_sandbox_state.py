"""Sandboxes in the state: network fields, endpoint addressing, aliases, removal rules.

Issue 15. The store is sans-IO: no kernel object is made here; the sandbox manager
makes them from these records.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from mesh.core.model import Network, Service, Task
from mesh.errors import Conflict, Invalid
from mesh.ipam import Ipam, parse_pool
from mesh.sandbox.names import netns_prefix
from mesh.state.specs import (
    NetworkSpec,
    SandboxSpec,
    ServicePatch,
    ServiceSpec,
    TaskSpec,
)
from mesh.state.store import Store

NOW = 1_000.0
A = ipaddress.IPv4Address


def make_store(node: str = "n1", seed: int = 1) -> Store:
    store = Store(node, Ipam(parse_pool("10.0.0.0/8")), random.Random(seed))
    store.ensure_ingress()
    return store


def network(store: Store, name: str, **kw: object) -> Network:
    kw.setdefault("driver", "bridge")
    changes = store.create_network(NetworkSpec(name=name, **kw), NOW)  # type: ignore[arg-type]
    assert isinstance(changes[-1].after, Network)
    return changes[-1].after


def service(store: Store, name: str, *networks: str, **kw: object) -> Service:
    spec = ServiceSpec(name=name, networks=networks, **kw)  # type: ignore[arg-type]
    changes = store.create_service(spec, NOW)
    assert isinstance(changes[-1].after, Service)
    return changes[-1].after


def sandboxed(store: Store, svc: str, netns: str | None = None, **kw: object) -> Task:
    spec = TaskSpec(service=svc, sandbox=SandboxSpec(netns=netns), **kw)  # type: ignore[arg-type]
    changes = store.add_task(spec, NOW)
    assert isinstance(changes[-1].after, Task)
    return changes[-1].after


# -- networks ------------------------------------------------------------------


def test_a_bridge_network_is_local_to_its_node_and_attachable_by_default() -> None:
    store = make_store("n1")
    net = network(store, "a", subnet="10.9.1.0/24", internal=True, options={"icc": "false"})
    assert (net.scope, net.node, net.internal, net.attachable) == ("local", "n1", True, True)
    assert net.options == {"icc": "false"} and net.gateway == "10.9.1.1"
    over = network(store, "o", driver="overlay")
    assert (over.scope, over.node, over.attachable) == ("swarm", "", False)
    closed = network(store, "c", attachable=False)
    assert closed.attachable is False


def test_gateway_ip_range_and_aux_addresses_are_checked_against_the_subnet() -> None:
    store = make_store()
    with pytest.raises(Invalid, match=r"gateway 10.9.2.1 is not a host address of subnet"):
        network(store, "a", subnet="10.9.1.0/24", gateway="10.9.2.1")
    with pytest.raises(Invalid, match="not inside subnet"):
        network(store, "a", subnet="10.9.1.0/24", ip_range="10.9.0.0/16")
    with pytest.raises(Invalid, match=r"is the gateway"):
        network(store, "a", subnet="10.9.1.0/24", aux_addresses={"r": "10.9.1.1"})
    with pytest.raises(Invalid, match="is not a host address"):
        network(store, "a", subnet="10.9.1.0/24", aux_addresses={"r": "10.9.1.255"})
    net = network(
        store,
        "a",
        subnet="10.9.1.0/24",
        gateway="10.9.1.254",
        ip_range="10.9.1.128/25",
        aux_addresses={"router": "10.9.1.129"},
    )
    assert (net.gateway, net.ip_range, net.aux_addresses) == (
        "10.9.1.254",
        "10.9.1.128/25",
        {"router": "10.9.1.129"},
    )


# -- endpoints -----------------------------------------------------------------


def test_a_sandboxed_task_gets_one_endpoint_per_network_in_the_services_order() -> None:
    store = make_store("n1")
    network(store, "a", subnet="10.9.1.0/24")
    network(store, "b", subnet="10.9.2.0/24")
    svc = service(store, "web", "b", "a", ports=())
    task = sandboxed(store, "web")
    assert task.sandbox is not None
    eps = task.sandbox.endpoints
    assert [(e.network, e.interface) for e in eps] == [("b", "eth0"), ("a", "eth1")]
    # VIPs took .2 of each network (the gateway is .1); endpoints the lowest free after
    assert {v.network: v.address for v in svc.vips} == {"a": "10.9.1.2", "b": "10.9.2.2"}
    assert [e.address for e in eps] == ["10.9.2.3", "10.9.1.3"]
    assert eps[0].mac == "02:42:0a:09:02:03"
    assert task.address == "10.9.2.3"  # the first endpoint's
    assert task.addresses == {"b": "10.9.2.3", "a": "10.9.1.3"}
    assert task.sandbox.netns == f"/run/netns/{netns_prefix('n1')}{task.id}"
    assert not task.sandbox.adopted


def test_endpoints_come_from_ip_range_and_skip_gateway_aux_and_vips() -> None:
    store = make_store()
    network(
        store,
        "a",
        subnet="10.9.1.0/24",
        gateway="10.9.1.128",
        ip_range="10.9.1.128/30",
        aux_addresses={"r": "10.9.1.129"},
    )
    service(store, "web", "a")
    first = sandboxed(store, "web")
    second = sandboxed(store, "web")
    assert (first.address, second.address) == ("10.9.1.130", "10.9.1.131")
    with pytest.raises(Conflict) as info:  # .128 gateway, .129 aux: the range is full
        sandboxed(store, "web")
    assert info.value.code == "no_free_address"


def test_a_vip_never_takes_an_endpoint_or_aux_address() -> None:
    store = make_store()
    network(store, "a", subnet="10.9.1.0/29", aux_addresses={"r": "10.9.1.3"})
    service(store, "web", "a")  # VIP .2
    task = sandboxed(store, "web")  # endpoint .4: .3 is aux
    assert task.address == "10.9.1.4"
    other = service(store, "api", "a")
    assert other.vips[0].address == "10.9.1.5"


def test_an_endpoints_address_is_released_when_its_task_is_removed() -> None:
    store = make_store()
    network(store, "a", subnet="10.9.1.0/24")
    service(store, "web", "a")
    first = sandboxed(store, "web")
    assert store.ipam.is_claimed("a", A(first.address))
    store.remove_task(first.id, NOW)
    assert not store.ipam.is_claimed("a", A(first.address))
    assert sandboxed(store, "web").address == first.address  # the lowest free again


def test_endpoints_survive_a_reload_in_any_order() -> None:
    store = make_store()
    network(store, "a", subnet="10.9.1.0/24")
    service(store, "web", "a")
    task = sandboxed(store, "web")
    records = list(store.all_records())
    again = Store("n1", Ipam(parse_pool("10.0.0.0/8")), random.Random(2))
    again.load(reversed(records))  # tasks before their network
    assert again.ipam.is_claimed("a", A(task.address))
    assert sandboxed(again, "web").address != task.address


def test_adopting_a_namespace_by_name_or_path() -> None:
    store = make_store("n1")
    network(store, "a", subnet="10.9.1.0/24")
    service(store, "web", "a")
    by_name = sandboxed(store, "web", netns="ctr1")
    by_path = sandboxed(store, "web", netns="/proc/4242/ns/net")
    assert by_name.sandbox is not None and by_path.sandbox is not None
    assert (by_name.sandbox.netns, by_name.sandbox.adopted) == ("/run/netns/ctr1", True)
    assert by_path.sandbox.netns == "/proc/4242/ns/net"
    for bad in ("..", "rel/path", "/run/netns/../etc", f"{netns_prefix('n1')}x"):
        with pytest.raises(Invalid):
            sandboxed(store, "web", netns=bad)


def test_sandbox_refusals_say_why() -> None:
    store = make_store("n1")
    network(store, "a", subnet="10.9.1.0/24")
    network(store, "o", subnet="10.9.3.0/24", driver="overlay")
    service(store, "lonely")
    with pytest.raises(Invalid, match="on no network"):
        sandboxed(store, "lonely")
    service(store, "ov", "o")
    with pytest.raises(Invalid, match="serves no overlay") as info:
        sandboxed(store, "ov")
    assert info.value.code == "invalid_value"
    service(store, "web", "a")
    with pytest.raises(Invalid, match="drop address"):
        store.add_task(TaskSpec(service="web", address="10.0.0.1", sandbox=SandboxSpec()), NOW)
    with pytest.raises(Invalid):
        store.add_task(TaskSpec(service="web"), NOW)


def test_a_bridge_network_of_another_node_refuses_sandboxes_here() -> None:
    n1, n2 = make_store("n1"), make_store("n2")
    net = network(n1, "a", subnet="10.9.1.0/24")
    n2.merge(net)
    assert n2.network("a").node == "n1"  # n2 lists it
    service(n2, "web", "a")
    with pytest.raises(Invalid, match="'a' is a bridge network of node 'n1'") as info:
        sandboxed(n2, "web")
    assert info.value.status == 422


def test_tasks_with_an_address_are_as_before() -> None:
    store = make_store()
    network(store, "a", subnet="10.9.1.0/24")
    service(store, "web", "a")
    changes = store.add_task(TaskSpec(service="web", address="127.0.0.1"), NOW)
    task = changes[-1].after
    assert isinstance(task, Task)
    assert (task.address, task.sandbox, task.addresses) == ("127.0.0.1", None, {})


# -- removal -------------------------------------------------------------------


def test_deleting_a_network_in_use_names_its_services_and_tasks() -> None:
    store = make_store()
    network(store, "a", subnet="10.9.1.0/24")
    network(store, "b", subnet="10.9.2.0/24")
    service(store, "web", "a", "b")
    task = sandboxed(store, "web")
    with pytest.raises(Conflict, match="in use by services web and tasks") as info:
        store.remove_network("a", NOW)
    assert info.value.code == "network_in_use"
    # the service leaves b; its task still has an endpoint there
    store.update_service("web", ServicePatch(networks=("a",)), NOW)
    with pytest.raises(Conflict) as info:
        store.remove_network("b", NOW)
    assert info.value.message == f"network 'b' is in use by tasks {task.name}"
    store.remove_task(task.id, NOW)
    store.remove_network("b", NOW)


# -- aliases -------------------------------------------------------------------


def test_aliases_are_unique_per_network_and_only_on_the_services_networks() -> None:
    store = make_store()
    network(store, "a", subnet="10.9.1.0/24")
    network(store, "b", subnet="10.9.2.0/24")
    web = service(store, "web", "a", "b", aliases={"a": ("www", "front")})
    assert web.aliases == {"a": ("www", "front")}
    with pytest.raises(Conflict, match="alias 'WWW' on network 'a' is taken by service 'web'"):
        service(store, "api", "a", aliases={"a": ("WWW",)})
    api = service(store, "api", "b", aliases={"b": ("www",)})  # another network: fine
    assert api.aliases == {"b": ("www",)}
    with pytest.raises(Invalid, match="not on"):
        service(store, "x", "a", aliases={"b": ("x1",)})
    with pytest.raises(Invalid, match="not a DNS label"):
        service(store, "y", "a", aliases={"a": ("no_label",)})
    # leaving a network drops its aliases; they are free again
    store.update_service("web", ServicePatch(networks=("b",)), NOW)
    assert store.service("web").aliases == {}
    service(store, "z", "a", aliases={"a": ("www",)})
    # a patch replaces them
    store.update_service("web", ServicePatch(aliases={"b": ("web2",)}), NOW)
    assert store.service("web").aliases == {"b": ("web2",)}
    store.remove_service("web", NOW)
    service(store, "w2", "b", aliases={"b": ("web2",)})


def test_a_vip_handed_out_on_an_endpoints_address_elsewhere_moves_by_its_writer() -> None:
    """n1 gives a sandbox .3 while n2, not knowing yet, gives a new service the VIP .3."""
    n1, n2 = make_store("n1"), make_store("n2")
    net = network(n1, "a", subnet="10.9.1.0/24")
    n2.merge(net)
    first = service(n1, "web", "a")  # VIP .2
    n2.merge(first)
    task = sandboxed(n1, "web")  # endpoint .3
    assert task.address == "10.9.1.3"
    api = service(n2, "api", "a")  # n2 has not heard of the task: VIP .3
    assert api.vips[0].address == "10.9.1.3"
    # n1 hears of api first: not its writer, so it only records the clash
    assert [c.key for c in n1.merge(api)] == ["api"]
    # n2 hears of the task: it wrote api, so api's VIP moves off the endpoint
    changes = n2.merge(task)
    moved = n2.service("api")
    assert [c.key for c in changes] == [task.id, "api"]
    assert moved.vips[0].address not in ("10.9.1.2", "10.9.1.3")
    assert n2.ipam.is_claimed("a", A("10.9.1.3"))  # still the endpoint's
    assert n1.merge(moved)  # and n1 takes the repair
    assert n1.service("api").vips[0].address == moved.vips[0].address

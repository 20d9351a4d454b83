"""macvlan networks in the state and the plan: options checked, addresses per node.

Issue 16. Sans-IO: the store and the plan alone, no kernel.
"""

from __future__ import annotations

import ipaddress

import pytest

from mesh.errors import Conflict, Invalid
from mesh.sandbox import macvlan_options
from mesh.sandbox.plan import DeleteVeth, Found, network_want, reconcile, sandbox_want
from tests.unit.test_sandbox_state import make_store, network, sandboxed, service

A = ipaddress.IPv4Address
LAN = {"subnet": "192.168.7.0/24", "gateway": "192.168.7.1", "driver": "macvlan"}


def test_a_macvlan_network_needs_a_parent_and_a_known_mode() -> None:
    store = make_store()
    with pytest.raises(Invalid, match=r"needs --opt parent=IFACE") as info:
        network(store, "lan", **LAN)
    assert info.value.status == 422
    with pytest.raises(Invalid, match="macvlan_mode 'hairpin' is not one of"):
        network(store, "lan", **LAN, options={"parent": "eth0", "macvlan_mode": "hairpin"})
    with pytest.raises(Invalid, match="unknown macvlan option 'mtu'"):
        network(store, "lan", **LAN, options={"parent": "eth0", "mtu": "9000"})
    with pytest.raises(Invalid, match="--internal is not supported"):
        network(store, "lan", **LAN, internal=True, options={"parent": "eth0"})
    with pytest.raises(Invalid, match="loopback"):
        network(store, "lan", **LAN, options={"parent": "lo"})
    options = {"parent": "eth0", "macvlan_mode": "passthru", "host_shim": "192.168.7.9"}
    with pytest.raises(Invalid, match="no host_shim beside it"):
        network(store, "lan", **LAN, options=options)
    net = network(store, "lan", **LAN, options={"parent": "eth0.10", "macvlan_mode": "vepa"})
    assert (net.scope, net.node, net.options["parent"]) == ("swarm", "", "eth0.10")


def test_per_node_slices_are_inside_the_subnet_and_disjoint() -> None:
    store = make_store()
    with pytest.raises(Invalid, match="not inside subnet"):
        network(store, "lan", **LAN, options={"parent": "eth0", "ip_range@n1": "10.1.0.0/28"})
    overlapping = {
        "parent": "eth0",
        "ip_range@n1": "192.168.7.0/27",
        "ip_range@n2": "192.168.7.16/28",
    }
    with pytest.raises(Invalid, match="overlaps ip_range@n1"):
        network(store, "lan", **LAN, options=overlapping)
    with pytest.raises(Invalid, match="per node: ip_range@<node>"):
        network(store, "lan", **LAN, options={"parent": "eth0", "ip_range": "192.168.7.0/27"})
    with pytest.raises(Invalid, match="not inside the ip_range"):
        network(
            store, "lan", **LAN, ip_range="192.168.7.128/25",
            options={"parent": "eth0", "ip_range@n1": "192.168.7.0/27"},
        )  # fmt: skip
    with pytest.raises(Invalid, match="only host_shim, ip_range, parent take @<node>"):
        network(store, "lan", **LAN, options={"parent": "eth0", "macvlan_mode@n1": "vepa"})


def test_each_node_hands_out_addresses_from_its_own_slice_only() -> None:
    """Two nodes allocating at once, before either hears of the other's tasks."""
    options = {
        "parent": "eth0",
        "ip_range@n1": "192.168.7.0/30",  # .0 the subnet's, .1 the gateway: n1 has .2, .3
        "ip_range@n2": "192.168.7.16/29",
        "host_shim@n2": "192.168.7.17",
    }
    n1, n2, n3 = make_store("n1"), make_store("n2"), make_store("n3")
    net = network(n1, "lan", **LAN, aux_addresses={"router2": "192.168.7.18"}, options=options)
    for store in (n2, n3):
        store.merge(net)
    for store in (n1, n2, n3):
        service(store, "web", "lan", endpoint_mode="dnsrr")  # no VIP to count around
    t1 = sandboxed(n1, "web")
    t2, t3 = sandboxed(n2, "web"), sandboxed(n2, "web")
    assert t1.sandbox is not None and t2.sandbox is not None and t3.sandbox is not None
    assert t1.sandbox.endpoints[0].address == "192.168.7.2"  # never the gateway .1
    # a slice is a set of addresses of the subnet (.16 is one); the shim's .17 and the
    # aux .18 are never handed out
    assert [t.sandbox.endpoints[0].address for t in (t2, t3)] == ["192.168.7.16", "192.168.7.19"]
    sandboxed(n1, "web")  # .3
    with pytest.raises(Conflict, match="no free address"):
        sandboxed(n1, "web")  # its slice is full, though the subnet is not
    with pytest.raises(Invalid, match="none to node 'n3'"):
        sandboxed(n3, "web")


def test_without_slices_every_node_allocates_from_the_replicated_claims() -> None:
    n1, n2 = make_store("n1"), make_store("n2")
    net = network(n1, "lan", **LAN, options={"parent": "eth0", "host_shim": "192.168.7.2"})
    n2.merge(net)
    service(n1, "web", "lan", endpoint_mode="dnsrr")
    n2.merge(n1.service("web"))
    first = sandboxed(n1, "web")
    n2.merge(first)
    second = sandboxed(n2, "web")
    assert first.sandbox is not None and second.sandbox is not None
    addresses = [first.sandbox.endpoints[0].address, second.sandbox.endpoints[0].address]
    assert addresses == ["192.168.7.3", "192.168.7.4"]  # .1 gateway, .2 the shim


def test_the_plan_serves_a_macvlan_network_on_every_node_with_its_own_options() -> None:
    store = make_store("n1")
    options = {"parent": "eth0", "parent@n2": "ens4", "host_shim@n2": "192.168.7.250"}
    net = network(store, "lan", **LAN, options=options)
    on_n1, on_n2 = network_want(net, "n1"), network_want(net, "n2")
    assert on_n1 is not None and on_n2 is not None
    assert dict(on_n1.plan.options) == {"parent": "eth0"}
    assert dict(on_n2.plan.options) == {"parent": "ens4", "host_shim": "192.168.7.250"}
    service(store, "web", "lan")
    task = sandboxed(store, "web")
    want = sandbox_want(task, "n1", {"lan": net})
    assert want is not None
    assert want.endpoints[0].endpoint.gateway == "192.168.7.1"  # the physical router
    assert want.veths == frozenset()  # no host side: nothing for owned() to list


def test_option_helpers() -> None:
    assert macvlan_options.vlan_parent("eth0.10") == ("eth0", 10)
    assert macvlan_options.vlan_parent("bond0.4094") == ("bond0", 4094)
    assert macvlan_options.vlan_parent("eth0.4095") is None
    assert macvlan_options.vlan_parent("eth0") is None
    assert macvlan_options.for_node({"a": "1", "a@x": "2", "b@y": "3"}, "x") == {"a": "2"}
    assert macvlan_options.shim_addresses({"host_shim@x": "10.0.0.2", "parent": "e"}) == [
        A("10.0.0.2")
    ]


def test_reconcile_neither_repairs_nor_removes_a_whole_macvlan_sandbox() -> None:
    store = make_store("n1")
    net = network(store, "lan", **LAN, options={"parent": "eth0"})
    service(store, "web", "lan", endpoint_mode="dnsrr")
    task = sandboxed(store, "web")
    want = sandbox_want(task, "n1", {"lan": net})
    net_want = network_want(net, "n1")
    assert want is not None and want.name is not None and net_want is not None
    # what the kernel shows after a restart: the namespace, and no host side at all
    found = Found({"macvlan": frozenset()}, {"macvlan": frozenset()}, frozenset({want.name}))
    plan = reconcile([net_want], [want], found)
    assert plan.repaired == frozenset() and plan.removed == ()
    # a macvlan left in the node by a crash before its move is an orphan of ours
    leftover = "mpv0123456780"
    found = Found({}, {"macvlan": frozenset({leftover})}, frozenset({want.name}))
    assert DeleteVeth(leftover) in reconcile([net_want], [want], found).removed

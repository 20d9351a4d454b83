"""The overlay driver's kernel side: its objects, its peers, and nodes joined by an underlay.

The contract suite runs for it in test_bridge.py (DRIVERS). Here: what it puts in
the kernel (names, VXLAN flags, MTU, ownership next to the bridge driver), what
`set_peers` programs, and traffic between sandboxes on two or three node
namespaces joined by a switched or a routed underlay, with the underlay captured
(tcpdump in the middle namespace) to show VXLAN with the network's VNI and no
flooding.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import time
from collections.abc import Iterator

import pytest

from mesh.sandbox import names
from mesh.sandbox.bridge import BridgeDriver
from mesh.sandbox.driver import DriverError
from mesh.sandbox.firewall import render_ruleset
from mesh.sandbox.overlay import OverlayDriver, Peer
from tests.netdrv.driver_suite import joined
from tests.netdrv.lab import (
    ECHO_PORT,
    NO_ANSWER_WAIT,
    NODE_UPLINK,
    Lab,
    in_netns,
    pings,
    run,
    skip_reason,
)
from tests.netdrv.test_bridge import OVERLAY_HOST, KernelHarness
from tests.netdrv.underlay import Task, Underlay, classify, inner_ipv4


def _skip() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)


def _needs_tcpdump() -> None:
    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed (.ci/run installs it)")


@pytest.fixture
def overlay_lab() -> Iterator[KernelHarness]:
    _skip()
    lab = Lab(host=OVERLAY_HOST)
    try:
        yield KernelHarness(lab, "overlay")
    finally:
        lab.close()


def node_ip(lab: Lab, *args: str) -> str:
    return run(["ip", "-n", lab.node, *args]).stdout


# -- one node: the objects --------------------------------------------------------------


def test_overlay_objects_are_as_documented(overlay_lab: KernelHarness) -> None:
    lab = overlay_lab.lab
    run(["ip", "-n", lab.node, "link", "set", "up0", "mtu", "1400"])
    driver = OverlayDriver(lab.node_path, vtep="10.99.0.1", port=4790)
    net = lab.network(3)
    driver.create_network(net)
    bridge, vxlan = names.overlay_bridge_name(net.id), names.vxlan_name(net.id)
    assert (bridge, vxlan) == (f"mpob-{net.id[:8]}", f"mpvx-{net.id[:8]}")
    shown = node_ip(lab, "-d", "link", "show", "dev", vxlan)
    print(shown)
    expected = [f"vxlan id {net.vni} ", "local 10.99.0.1 ", "dstport 4790 ", "nolearning"]
    expected += ["proxy", f"master {bridge}", "mtu 1350 ", f"alias meshplane net={net.id}"]
    for word in expected:
        assert word in shown, word
    vxlan_line = next(line for line in shown.splitlines() if "vxlan id" in line)
    assert " group " not in vxlan_line and " remote " not in vxlan_line  # no multicast
    port = node_ip(lab, "-d", "link", "show", "dev", vxlan)
    assert " learning off " in port and " flood off " in port  # as a bridge port
    assert "bcast_flood on" in port  # ARP still reaches the proxy
    shown = node_ip(lab, "-d", "addr", "show", "dev", bridge)
    assert f"inet {net.host_address}/24" in shown and f"inet {net.gateway}/" not in shown
    assert "mtu 1350 " in shown and names.mac_of(str(net.host_address)) in shown
    # no FDB entry of the VXLAN device at all: in particular no all-zero (flooding) one
    fdb = run(["bridge", "-n", lab.node, "fdb", "show", "dev", vxlan]).stdout
    assert "dst" not in fdb and "00:00:00:00:00:00" not in fdb
    path, ep = joined(overlay_lab, driver, net, 5)
    host_side = names.veth_name(ep.task_id, ep.index)
    assert "mtu 1350 " in node_ip(lab, "link", "show", "dev", host_side)
    assert "mtu 1350 " in in_netns(path, ["ip", "link", "show", "eth0"], check=True).stdout
    assert pings(path, str(net.host_address))
    # a restarted agent (a new driver) finds it all from the kernel alone
    restarted = OverlayDriver(lab.node_path, vtep="10.99.0.1", port=4790)
    assert restarted.owned().networks == {net.id}
    assert restarted.owned().endpoints == {host_side}


def test_the_mtu_follows_the_underlay(overlay_lab: KernelHarness) -> None:
    lab = overlay_lab.lab
    net = lab.network(4)
    driver = OverlayDriver(lab.node_path, vtep="10.99.0.1")
    driver.create_network(net)  # up0: 1500
    assert "mtu 1450 " in node_ip(lab, "link", "show", "dev", names.vxlan_name(net.id))
    path, ep = joined(overlay_lab, driver, net, 5)
    # a jumbo underlay: the network made again follows, the endpoint joined again too
    jumbo = OverlayDriver(lab.node_path, vtep="10.99.0.1", underlay_mtu=9000)
    jumbo.create_network(net)
    jumbo.join(net, ep, path)
    host_side = names.veth_name(ep.task_id, ep.index)
    for device in (names.vxlan_name(net.id), names.overlay_bridge_name(net.id), host_side):
        assert "mtu 8950 " in node_ip(lab, "link", "show", "dev", device)
    assert "mtu 8950 " in in_netns(path, ["ip", "link", "show", "eth0"], check=True).stdout


def test_a_plan_without_vni_or_host_address_is_refused(overlay_lab: KernelHarness) -> None:
    lab, driver = overlay_lab.lab, OverlayDriver(overlay_lab.lab.node_path)
    net = lab.network(5)
    with pytest.raises(DriverError, match="no VNI"):
        driver.create_network(dataclasses.replace(net, vni=0))
    with pytest.raises(DriverError, match="no address for this node"):
        driver.create_network(dataclasses.replace(net, host_address=None))
    with pytest.raises(DriverError, match="not in"):
        driver.create_network(dataclasses.replace(net, host_address="10.1.2.3"))
    assert driver.owned().networks == frozenset()


def test_a_changed_vni_makes_the_vxlan_device_anew(overlay_lab: KernelHarness) -> None:
    lab, driver = overlay_lab.lab, OverlayDriver(overlay_lab.lab.node_path, vtep="10.99.0.1")
    net = lab.network(6)
    driver.create_network(net)
    driver.create_network(dataclasses.replace(net, vni=net.vni + 7))
    shown = node_ip(lab, "-d", "link", "show", "dev", names.vxlan_name(net.id))
    assert f"vxlan id {net.vni + 7} " in shown and "nolearning" in shown


def test_the_two_drivers_never_claim_each_others_objects(overlay_lab: KernelHarness) -> None:
    lab = overlay_lab.lab
    bridge, overlay = BridgeDriver(lab.node_path), OverlayDriver(lab.node_path)
    plain = lab.network(7)
    ov = lab.network(8)
    bridge.create_network(plain)
    overlay.create_network(ov)
    _, ep_b = joined(overlay_lab, bridge, plain, 5)
    _, ep_o = joined(overlay_lab, overlay, ov, 5)
    assert bridge.owned().networks == {plain.id}
    assert bridge.owned().endpoints == {names.veth_name(ep_b.task_id, 0)}
    assert overlay.owned().networks == {ov.id}
    assert overlay.owned().endpoints == {names.veth_name(ep_o.task_id, 0)}
    # detached from its bridge (the bridge deleted behind our back), still its own
    run(["ip", "-n", lab.node, "link", "set", names.veth_name(ep_o.task_id, 0), "nomaster"])
    assert overlay.owned().endpoints == {names.veth_name(ep_o.task_id, 0)}
    assert bridge.owned().endpoints == {names.veth_name(ep_b.task_id, 0)}
    # one nftables table serves both: the overlay's subnet is masqueraded too
    table = in_netns(lab.node_path, ["nft", "list", "table", "inet", names.BRIDGE_TABLE])
    assert f'oifname != "{names.overlay_bridge_name(ov.id)}" masquerade' in table.stdout
    bridge.delete_network(plain.id)
    assert overlay.owned().networks == {ov.id}  # the other driver's network stays


# -- one node: peers ----------------------------------------------------------------------


def fdb_lines(lab: Lab, device: str) -> list[str]:
    shown = run(["bridge", "-n", lab.node, "fdb", "show", "dev", device]).stdout
    return sorted(line.strip() for line in shown.splitlines() if line.strip())


def neigh_lines(lab: Lab, device: str) -> list[str]:
    shown = run(["ip", "-n", lab.node, "neigh", "show", "dev", device, "nud", "permanent"])
    return sorted(line.strip() for line in shown.stdout.splitlines() if line.strip())


def test_set_peers_programs_exactly_the_peers(overlay_lab: KernelHarness) -> None:
    lab = overlay_lab.lab
    driver = OverlayDriver(lab.node_path, vtep="10.99.0.1")
    net, other = lab.network(9), lab.network(10)
    driver.create_network(net)
    driver.create_network(other)
    vxlan = names.vxlan_name(net.id)
    a = Peer(names.mac_of("10.210.9.20"), "10.210.9.20", "10.98.0.2")
    b = Peer(names.mac_of("10.210.9.21"), "10.210.9.21", "10.98.0.3")
    c = Peer(names.mac_of("10.210.10.20"), "10.210.10.20", "10.98.0.3")
    own = Peer(names.mac_of("10.210.9.22"), "10.210.9.22", "10.99.0.1")  # this node's VTEP
    driver.set_peers(other, [c])
    driver.set_peers(net, [a, b, own])
    assert driver.peers(net) == {a, b}
    fdb = fdb_lines(lab, vxlan)
    print("\n".join(fdb))
    assert f"{a.mac} dst 10.98.0.2 self permanent" in fdb
    assert f"{b.mac} dst 10.98.0.3 self permanent" in fdb
    assert f"{a.mac} master {names.overlay_bridge_name(net.id)} static" in fdb
    assert not any(own.mac in line for line in fdb)
    assert not any(line.startswith("00:00:00:00:00:00") for line in fdb)
    neigh = neigh_lines(lab, vxlan)
    assert f"{a.address} lladdr {a.mac} PERMANENT" in neigh and len(neigh) == 2
    assert len(neigh_lines(lab, names.overlay_bridge_name(net.id))) == 2
    # idempotent: the same call changes nothing
    driver.set_peers(net, [b, a])
    assert fdb_lines(lab, vxlan) == fdb and neigh_lines(lab, vxlan) == neigh
    # the network made again (a restart's reconciliation) keeps its VXLAN device, and so
    # its entries, when nothing of it changed
    index = node_ip(lab, "-o", "link", "show", "dev", vxlan).split(":")[0]
    OverlayDriver(lab.node_path, vtep="10.99.0.1").create_network(net)
    assert node_ip(lab, "-o", "link", "show", "dev", vxlan).split(":")[0] == index
    assert fdb_lines(lab, vxlan) == fdb and neigh_lines(lab, vxlan) == neigh
    # a moved peer (another VTEP), a withdrawn one, a new one
    moved = Peer(a.mac, a.address, "10.98.0.9")
    new = Peer(names.mac_of("10.210.9.30"), "10.210.9.30", "10.98.0.2")
    OverlayDriver(lab.node_path, vtep="10.99.0.1").set_peers(net, [moved, new])
    assert driver.peers(net) == {moved, new}
    fdb = fdb_lines(lab, vxlan)
    assert not any(b.mac in line for line in fdb)
    assert not any("10.98.0.2" in line and a.mac in line for line in fdb)
    assert len([line for line in fdb if "self permanent" in line]) == 2
    assert not any(b.address in line for line in neigh_lines(lab, vxlan))
    # the other network was not touched
    assert driver.peers(other) == {c}
    driver.set_peers(net, [])
    assert driver.peers(net) == set() and neigh_lines(lab, vxlan) == []
    assert not any("static" in line or "dst" in line for line in fdb_lines(lab, vxlan))
    assert driver.peers(other) == {c}


def test_bad_peers_are_refused_whole(overlay_lab: KernelHarness) -> None:
    lab = overlay_lab.lab
    driver = OverlayDriver(lab.node_path, vtep="10.99.0.1")
    net = lab.network(11)
    with pytest.raises(DriverError, match="no VXLAN device"):
        driver.set_peers(net, [])
    driver.create_network(net)
    good = Peer(names.mac_of("10.210.11.20"), "10.210.11.20", "10.98.0.2")
    driver.set_peers(net, [good])
    for bad in (
        Peer("zz:42:0a:d2:0b:15", "10.210.11.21", "10.98.0.2"),
        Peer(names.mac_of("10.210.12.21"), "10.210.12.21", "10.98.0.2"),  # other subnet
        Peer(names.mac_of("10.210.11.21"), "10.210.11.21", "not-an-ip"),
        Peer(good.mac, "10.210.11.22", "10.98.0.2"),  # one MAC, two addresses
    ):
        with pytest.raises(DriverError):
            driver.set_peers(net, [good, bad])
        assert driver.peers(net) == {good}


# -- nodes joined by an underlay ------------------------------------------------------------


@pytest.fixture
def make_underlay() -> Iterator[type[Underlay]]:
    _skip()
    made: list[Underlay] = []

    class Tracked(Underlay):
        def __post_init__(self) -> None:
            made.append(self)
            super().__post_init__()

    try:
        yield Tracked
    finally:
        for underlay in made:
            underlay.close()


@pytest.mark.parametrize("routed", [False, True], ids=["switched", "routed"])
def test_tasks_on_three_nodes_reach_each_other(make_underlay: type[Underlay], routed: bool) -> None:
    underlay = make_underlay(3, routed=routed)
    net = underlay.network(1)
    tasks = [underlay.task(node, net, 10 + node.index) for node in underlay.nodes]
    for task in tasks:
        task.node.lab.echo_server(task.path, task.ep.address)
    one, two, three = tasks
    # nothing is flooded: without peers no node reaches another's task
    assert not pings(three.path, one.ep.address)
    # the failed ARP stays pending in three for 3 s, and holds back a reply from there
    # until its next retry (up to 1 s: as long as `pings` waits): start afresh
    in_netns(three.path, ["ip", "neigh", "flush", "dev", "eth0"], check=True)
    started = time.monotonic()
    underlay.set_all_peers(net, tasks)
    assert pings(one.path, two.ep.address)
    print(f"first ping after set_peers: {time.monotonic() - started:.3f} s")
    for a, b in itertools.permutations(tasks, 2):
        assert pings(a.path, b.ep.address), (a.ep.address, b.ep.address)
        assert a.node.lab.echo(a.path, b.ep.address) == a.ep.address  # TCP, no NAT
    # the node's own address on the network reaches a task on another node (what the
    # routing mesh and the HRM use)
    host_one = underlay.nodes[0].plan(net).host_address
    assert one.node.lab.echo(one.node.lab.node_path, three.ep.address) == host_one
    # a large packet crosses whole (MTU underlay - 50 end to end, no fragments)
    done = in_netns(one.path, ["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1422",
                               three.ep.address])  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # withdrawn on node 1: node 3's task is unreachable from there, still from node 2
    node_one = underlay.nodes[0]
    left = [t for t in tasks if t is not three]
    node_one.driver.set_peers(node_one.plan(net), underlay.peers_for(node_one, net, left))
    assert not pings(one.path, three.ep.address)
    assert one.node.lab.echo(one.path, three.ep.address, ECHO_PORT, NO_ANSWER_WAIT) is None
    assert pings(one.path, two.ep.address)
    assert pings(two.path, three.ep.address)


def test_the_underlay_carries_vxlan_with_the_vni_and_nothing_flooded(
    make_underlay: type[Underlay],
) -> None:
    _needs_tcpdump()
    underlay = make_underlay(2)
    net_a, net_b = underlay.network(1), underlay.network(2)
    node_one, node_two = underlay.nodes
    tasks: dict[int, list[Task]] = {}
    for net in (net_a, net_b):
        tasks[net.vni] = [underlay.task(node, net, 10 + node.index) for node in underlay.nodes]
        underlay.set_all_peers(net, tasks[net.vni])
    a1, a2 = tasks[net_a.vni]
    b1, b2 = tasks[net_b.vni]
    with underlay.capture("p1") as frames:
        assert pings(a1.path, a2.ep.address)
        assert pings(b1.path, b2.ep.address)
    seen = classify(frames)
    print(f"{len(frames)} frames on the underlay, {len(seen.vxlan)} VXLAN")
    by_vni = {p.vni: inner_ipv4(p) for p in seen.vxlan if inner_ipv4(p)}
    assert {net_a.vni, net_b.vni} <= by_vni.keys()
    for packet in seen.vxlan:
        inner = inner_ipv4(packet)
        assert inner is not None, f"a non-IPv4 frame crossed: type {packet.inner_type:#x}"
        subnet = net_a.subnet if packet.vni == net_a.vni else net_b.subnet
        assert packet.vni in (net_a.vni, net_b.vni)
        assert inner[0].startswith(subnet.rsplit(".", 2)[0]), (packet.vni, inner)
        assert {packet.outer_src, packet.outer_dst} == {node_one.vtep, node_two.vtep}
    assert seen.other_udp_ports == []
    # no flooding: an ARP for an address nobody has does not cross, nor does a
    # broadcast, nor a frame to an unknown MAC
    unknown = "10.210.1.99"
    with underlay.capture("p1") as frames:
        assert not pings(a1.path, unknown)
        in_netns(a1.path, ["ping", "-b", "-c", "1", "-W", "1", "10.210.1.255"])
        in_netns(a1.path, ["ip", "neigh", "replace", "10.210.1.98", "lladdr",
                           "02:42:0a:d2:01:62", "dev", "eth0"])  # fmt: skip
        in_netns(a1.path, ["ping", "-c", "1", "-W", "1", "10.210.1.98"])
    seen = classify(frames)
    print(f"unknown address: {len(frames)} frames on the underlay, {len(seen.vxlan)} VXLAN")
    assert seen.vxlan == []
    assert unknown not in seen.arp_targets


def test_an_encapsulated_ping_carries_the_vni_as_sent(make_underlay: type[Underlay]) -> None:
    """The VNI field of the VXLAN header, read from the captured bytes, is the plan's
    VNI, in both directions, across a routed underlay."""
    _needs_tcpdump()
    underlay = make_underlay(2, routed=True)
    net = underlay.network(3)
    tasks = [underlay.task(node, net, 10 + node.index) for node in underlay.nodes]
    underlay.set_all_peers(net, tasks)
    one, two = tasks
    with underlay.capture("p1") as frames:
        assert pings(one.path, two.ep.address)
    seen = classify(frames)
    directions = {(p.outer_src, p.outer_dst, p.vni) for p in seen.vxlan}
    vteps = (underlay.nodes[0].vtep, underlay.nodes[1].vtep)
    assert directions == {(vteps[0], vteps[1], net.vni), (vteps[1], vteps[0], net.vni)}
    protocols = {inner_ipv4(p) for p in seen.vxlan}
    assert (one.ep.address, two.ep.address, 1) in protocols  # ICMP, inner addresses kept
    assert (two.ep.address, one.ep.address, 1) in protocols


def test_set_peers_at_scale(overlay_lab: KernelHarness) -> None:
    """1,000 peers programmed, the same again (nothing to do), then half withdrawn: the
    time each takes is printed, the bound is liveness only."""
    lab = overlay_lab.lab
    driver = OverlayDriver(lab.node_path, vtep="10.99.0.1")
    net = dataclasses.replace(lab.network(12), subnet="10.210.32.0/19", host_address="10.210.32.1")
    driver.create_network(net)
    peers = [
        Peer(names.mac_of(f"10.210.{32 + n // 200}.{10 + n % 200}"),
             f"10.210.{32 + n // 200}.{10 + n % 200}", f"10.98.{n % 50}.2")
        for n in range(1000)
    ]  # fmt: skip
    timings = []
    for wanted in (peers, peers, peers[:500]):
        started = time.monotonic()
        driver.set_peers(net, wanted)
        timings.append(time.monotonic() - started)
        assert driver.peers(net) == set(wanted)
    print(
        "set_peers: 1000 new {:.2f} s, the same again {:.2f} s, 500 withdrawn {:.2f} s".format(
            *timings
        )
    )
    assert sum(timings) < 60


def test_a_published_port_on_one_node_reaches_a_task_on_another(
    make_underlay: type[Underlay],
) -> None:
    """The routing mesh's path: a DNAT on node 1 (as its LB backend would program) to a
    task that runs only on node 3. The task sees node 1's own address on the network,
    and its answer goes back through node 1, which holds the connection's NAT."""
    underlay = make_underlay(3)
    net = underlay.network(1)
    tasks = [underlay.task(node, net, 10 + node.index) for node in underlay.nodes]
    underlay.set_all_peers(net, tasks)
    node_one, three = underlay.nodes[0], tasks[2]
    three.node.lab.echo_server(three.path, three.ep.address)
    rules = (
        "add table ip t16mesh; "
        "add chain ip t16mesh pre { type nat hook prerouting priority dstnat; }; "
        f"add rule ip t16mesh pre tcp dport 8080 dnat to {three.ep.address}:{ECHO_PORT}"
    )
    in_netns(node_one.lab.node_path, ["nft", rules], check=True)
    outside = node_one.lab
    seen = outside.echo(outside.outside_path, NODE_UPLINK, 8080)
    assert seen == node_one.plan(net).host_address


def test_the_ruleset_covers_overlay_bridges() -> None:
    script = render_ruleset([("mpbr-a", "10.1.0.0/24", False), ("mpob-b", "10.2.0.0/24", False)])
    assert 'iifname "mpbr-a" oifname "mpob-*" oifname != "mpbr-a" drop' in script
    assert 'iifname "mpob-b" oifname "mpbr-*" oifname != "mpob-b" drop' in script
    assert 'ip saddr 10.2.0.0/24 oifname != "mpob-b" masquerade' in script
    assert 'oifname "mpob-b" ip saddr != 10.2.0.0/24 masquerade' in script
    assert 'oifname "mpbr-a" ip saddr' not in script  # a bridge network keeps client addresses

"""The drivers pass the driver contract suite; the bridge driver's own kernel checks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from mesh.sandbox import names
from mesh.sandbox.bridge import BridgeDriver, endpoint_alias, render_ruleset, temp_name
from mesh.sandbox.driver import Driver, create_driver
from tests.netdrv.driver_suite import DriverSuite, eventually, joined, links
from tests.netdrv.lab import Lab, in_netns, pings, run, skip_reason

DRIVERS = ["bridge", "overlay"]  # macvlan joins here (issue 16)
#: the node's own address on each overlay network: the subnet's .254 (lab.way_out)
OVERLAY_HOST = 254


@dataclass
class KernelHarness:
    lab: Lab
    driver_name: str

    def new_driver(self) -> Driver:
        return create_driver(self.driver_name, self.lab.node_path)

    def leftovers(self) -> list[str]:
        owned = [
            f"link {name}"
            for name in self.lab.node_links()
            if name.startswith(
                (
                    names.BRIDGE_PREFIX,
                    names.OVERLAY_BRIDGE_PREFIX,
                    names.VXLAN_PREFIX,
                    names.VETH_PREFIX,
                    "mpt",
                )
            )
        ]
        tables = [line for line in self.lab.node_tables() if names.BRIDGE_TABLE in line]
        return owned + tables


def lab_for(driver_name: str) -> Iterator[KernelHarness]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    lab = Lab(host=OVERLAY_HOST if driver_name == "overlay" else None)
    try:
        yield KernelHarness(lab, driver_name)
    finally:
        lab.close()


@pytest.fixture(params=DRIVERS)
def harness(request: pytest.FixtureRequest) -> Iterator[KernelHarness]:
    """Every driver: the contract suite runs once per driver."""
    yield from lab_for(request.param)


@pytest.fixture
def bridge_lab() -> Iterator[KernelHarness]:
    """The bridge driver alone: its own kernel checks below."""
    yield from lab_for("bridge")


class TestDriverContract(DriverSuite):
    pass


def sysctl(lab: Lab, key: str) -> str:
    return in_netns(lab.node_path, ["sysctl", "-n", key], check=True).stdout.strip()


def test_bridge_objects_are_as_documented(bridge_lab: KernelHarness) -> None:
    lab = bridge_lab.lab
    in_netns(lab.node_path, ["sysctl", "-w", "net.ipv4.ip_forward=0"], check=True)
    driver = BridgeDriver(lab.node_path)
    net = lab.network(3, options={"icc": "false"})
    driver.create_network(net)
    assert sysctl(lab, "net.ipv4.ip_forward") == "1"
    bridge = names.bridge_name(net.id)
    shown = run(["ip", "-n", lab.node, "-o", "link", "show", "dev", bridge]).stdout
    shown += run(["ip", "-n", lab.node, "-o", "addr", "show", "dev", bridge]).stdout
    assert f"inet {net.gateway}/24" in shown
    gateway_mac = names.mac_of(net.gateway)
    assert gateway_mac in shown
    _, ep = joined(bridge_lab, driver, net, 9)
    port = run(["ip", "-n", lab.node, "-d", "link", "show", names.veth_name(ep.task_id, 0)])
    assert f"master {bridge}" in port.stdout and "isolated on" in port.stdout
    # the gateway's MAC does not follow the ports (sandboxes' ARP caches hold it)
    shown = run(["ip", "-n", lab.node, "-o", "link", "show", "dev", bridge]).stdout
    assert gateway_mac in shown
    table = in_netns(
        lab.node_path, ["nft", "list", "table", "inet", names.BRIDGE_TABLE], check=True
    ).stdout
    assert f'ip saddr {net.subnet} oifname != "{bridge}" masquerade' in table


def test_the_ruleset_isolates_bridges_and_keeps_internal_networks_in() -> None:
    script = render_ruleset([("mpbr-a", "10.1.0.0/24", False), ("mpbr-b", "10.2.0.0/24", True)])
    assert 'iifname "mpbr-a" oifname "mpbr-*" oifname != "mpbr-a" drop' in script
    assert 'iifname "mpbr-b" oifname != "mpbr-b" drop' in script
    assert 'oifname "mpbr-b" iifname != "mpbr-b" drop' in script
    assert 'ip saddr 10.1.0.0/24 oifname != "mpbr-a" masquerade' in script
    assert "10.2.0.0/24" not in script  # internal: never masqueraded
    assert render_ruleset([]).endswith("delete table inet meshplane_net\n")


def test_many_sandboxes_come_and_go(bridge_lab: KernelHarness) -> None:
    """20 sandboxes made, joined, left and removed one after another (the manager's
    worker does them in order): the time each takes is printed, not asserted tightly."""
    lab, driver = bridge_lab.lab, BridgeDriver(bridge_lab.lab.node_path)
    net = lab.network(4)
    driver.create_network(net)
    count = 20
    started = time.monotonic()
    plans = []
    for host in range(2, 2 + count):
        task = lab.task_id()
        path = lab.sandbox(task)
        lab.sandboxes.write_resolv_conf(f"{lab.prefix}{task}")
        ep = lab.endpoint(net, task, host)
        driver.join(net, ep, path)
        plans.append((path, ep))
    made = time.monotonic() - started
    assert len(driver.owned().endpoints) == count
    assert pings(plans[0][0], plans[-1][1].address)
    started = time.monotonic()
    for path, ep in plans:
        driver.leave(net, ep, path)
        lab.sandboxes.delete(path.rsplit("/", 1)[1])
    removed = time.monotonic() - started
    print(
        f"{count} sandboxes: create+resolv.conf+join {made / count * 1000:.1f} ms each, "
        f"leave+delete {removed / count * 1000:.1f} ms each"
    )
    assert made < count * 5 and removed < count * 5  # liveness only
    assert eventually(lambda: driver.owned().endpoints == frozenset())
    assert lab.sandboxes.list(lab.prefix) == []


@pytest.mark.parametrize("moved", [False, True], ids=["peer-on-the-node", "peer-not-renamed"])
def test_join_converges_after_a_crash_half_way(bridge_lab: KernelHarness, moved: bool) -> None:
    """kill -9 between making the veth and renaming its peer in the sandbox: the
    next join (after the restart) finishes the endpoint, with nothing left over."""
    lab = bridge_lab.lab
    net = lab.network(5)
    BridgeDriver(lab.node_path).create_network(net)
    task = lab.task_id()
    path = lab.sandbox(task)
    ep = lab.endpoint(net, task, 7)
    host, temp = names.veth_name(task, 0), temp_name(ep)
    node = ["ip", "-n", lab.node, "link"]
    run([*node, "add", host, "type", "veth", "peer", "name", temp])
    run([*node, "set", temp, "alias", endpoint_alias(net.id, ep)])
    if moved:
        run([*node, "set", temp, "netns", f"{lab.prefix}{task}"])
    restarted = BridgeDriver(lab.node_path)
    restarted.join(net, ep, path)
    assert not any(name.startswith("mpt") for name in lab.node_links())
    assert links(path) == ["lo", "eth0"]
    assert pings(path, net.gateway)
    assert restarted.owned().endpoints == {host}


def test_owned_reports_only_the_bridge_drivers_veths(bridge_lab: KernelHarness) -> None:
    """Another driver's veths share the `mpv` prefix (the overlay's, on `mpob-` bridges):
    the bridge driver does not report those another driver marks (master or alias)."""
    lab = bridge_lab.lab
    driver = BridgeDriver(lab.node_path)
    net = lab.network(6)
    driver.create_network(net)
    _, ep = joined(bridge_lab, driver, net, 7)
    node = ["ip", "-n", lab.node, "link"]
    run([*node, "add", "mpob-0badc0de", "type", "bridge"])
    run([*node, "add", "mpv0badc0de0", "type", "veth", "peer", "name", "mpt0badc0de0"])
    run([*node, "set", "mpv0badc0de0", "master", "mpob-0badc0de"])
    run([*node, "add", "mpv0badc0de1", "type", "veth", "peer", "name", "mpt0badc0de1"])
    run([*node, "set", "mpv0badc0de1", "alias", "meshplane ep=0badc0de/1 net=x driver=overlay"])
    assert driver.owned().endpoints == {names.veth_name(ep.task_id, 0)}
    assert driver.owned().networks == {net.id}
    # a veth of ours that no driver marks (a crash before its alias) is still found
    run([*node, "add", "mpv0badc0de2", "type", "veth", "peer", "name", "mpt0badc0de2"])
    assert driver.owned().endpoints == {names.veth_name(ep.task_id, 0), "mpv0badc0de2"}

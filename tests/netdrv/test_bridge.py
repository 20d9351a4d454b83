"""The bridge driver passes the driver contract suite, plus its own kernel checks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from mesh.sandbox import names
from mesh.sandbox.bridge import BridgeDriver, render_ruleset
from mesh.sandbox.driver import Driver, create_driver
from tests.netdrv.driver_suite import DriverSuite, joined
from tests.netdrv.lab import Lab, in_netns, run, skip_reason

DRIVERS = ["bridge"]  # overlay and macvlan join here (issue 16)


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
            if name.startswith((names.BRIDGE_PREFIX, names.VETH_PREFIX, "mpt"))
        ]
        tables = [line for line in self.lab.node_tables() if names.BRIDGE_TABLE in line]
        return owned + tables


@pytest.fixture(params=DRIVERS)
def harness(request: pytest.FixtureRequest) -> Iterator[KernelHarness]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    lab = Lab()
    try:
        yield KernelHarness(lab, request.param)
    finally:
        lab.close()


class TestDriverContract(DriverSuite):
    pass


def sysctl(lab: Lab, key: str) -> str:
    return in_netns(lab.node_path, ["sysctl", "-n", key], check=True).stdout.strip()


def test_bridge_objects_are_as_documented(harness: KernelHarness) -> None:
    lab = harness.lab
    in_netns(lab.node_path, ["sysctl", "-w", "net.ipv4.ip_forward=0"], check=True)
    driver = BridgeDriver(lab.node_path)
    net = lab.network(3, options={"icc": "false"})
    driver.create_network(net)
    assert sysctl(lab, "net.ipv4.ip_forward") == "1"
    bridge = names.bridge_name(net.id)
    shown = run(["ip", "-n", lab.node, "-d", "-o", "addr", "show", "dev", bridge]).stdout
    assert f"inet {net.gateway}/24" in shown
    _, ep = joined(harness, driver, net, 9)
    port = run(["ip", "-n", lab.node, "-d", "link", "show", names.veth_name(ep.task_id, 0)])
    assert f"master {bridge}" in port.stdout and "isolated on" in port.stdout
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

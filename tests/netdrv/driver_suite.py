"""The one contract test suite every network driver passes (mesh/sandbox/driver.py).

A driver's test module subclasses `DriverSuite` and provides a `harness`
fixture (a `DriverHarness`, parametrized by driver name): a fresh `Lab` per
test (a node namespace with an outside behind it, sandboxes under a unique
prefix), fresh driver instances over that node (a new instance over the same
kernel state is what an agent restart looks like), and what of the kernel the
driver leaves behind. Nothing is mocked: real namespaces, links, nftables and
real traffic (ping, curl, a TCP echo).

Where drivers differ by design, the harness says so (each optional, with the
bridge's answer as the default): `outside_source(ep)`, the address the outside
sees a sandbox's traffic come from (the node's, masqueraded; a macvlan
endpoint's own); `host_sides(*eps)`, what `owned().endpoints` lists for joined
endpoints (veths; a macvlan has no host side); `not_for_this_driver`, test name
-> the reason a test does not apply (e.g. icc=false on macvlan, whose `private`
mode is the equivalent and is tested on its own).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Protocol

import pytest

from mesh.sandbox import names
from mesh.sandbox.driver import Driver, DriverError, EndpointPlan, NetworkPlan
from tests.netdrv.lab import (
    NO_ANSWER_WAIT,
    NODE_UPLINK,
    OUTSIDE,
    Lab,
    in_netns,
    pings,
    run,
    way_out,
)

#: the drivers that take `--opt icc=false` (Docker's bridge-only `enable_icc`)
ICC_DRIVERS = frozenset({"bridge"})


class DriverHarness(Protocol):
    lab: Lab
    driver_name: str

    def new_driver(self) -> Driver:
        """A fresh driver instance working in the lab's node namespace."""

    def leftovers(self) -> list[str]:
        """The driver's kernel objects (links, tables ...) that exist in the node."""


def outside_source(harness: DriverHarness, ep: EndpointPlan) -> str:
    found = getattr(harness, "outside_source", None)
    return NODE_UPLINK if found is None else str(found(ep))


def host_sides(harness: DriverHarness, *eps: EndpointPlan) -> set[str]:
    found = getattr(harness, "host_sides", None)
    if found is None:
        return {names.veth_name(ep.task_id, ep.index) for ep in eps}
    return set(found(*eps))


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Namespaces go asynchronously: poll a little before deciding."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def inside(lab: Lab, path: str, *args: str) -> str:
    return in_netns(path, ["ip", *args], check=True).stdout


def links(path: str) -> list[str]:
    """The interface names inside a namespace."""
    shown = in_netns(path, ["ip", "-o", "link", "show"], check=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in shown.splitlines()]


def joined(
    harness: DriverHarness, driver: Driver, net: NetworkPlan, host: int, **kwargs: object
) -> tuple[str, EndpointPlan]:
    lab = harness.lab
    task = lab.task_id()
    path = lab.sandbox(task)
    ep = lab.endpoint(net, task, host, **kwargs)  # type: ignore[arg-type]
    driver.join(net, ep, path)
    return path, ep


class DriverSuite:
    @pytest.fixture(autouse=True)
    def _applies(self, request: pytest.FixtureRequest, harness: DriverHarness) -> None:
        reasons = getattr(harness, "not_for_this_driver", {})
        reason = reasons.get(request.node.originalname)
        if reason:
            pytest.skip(reason)

    # -- networks -----------------------------------------------------------------

    def test_create_network_twice_is_one_network(self, harness: DriverHarness) -> None:
        driver, net = harness.new_driver(), harness.lab.network(1)
        driver.create_network(net)
        first = harness.leftovers()
        driver.create_network(net)
        harness.new_driver().create_network(net)
        assert harness.leftovers() == first
        assert driver.owned().networks == {net.id}

    def test_delete_network_twice_leaves_nothing(self, harness: DriverHarness) -> None:
        driver, net = harness.new_driver(), harness.lab.network(1)
        driver.create_network(net)
        driver.delete_network(net.id)
        driver.delete_network(net.id)
        harness.new_driver().delete_network("0123456789abcdef")  # never made
        assert harness.leftovers() == []
        assert driver.owned().networks == frozenset()

    # -- endpoints ----------------------------------------------------------------

    def test_join_gives_the_sandbox_its_endpoint(self, harness: DriverHarness) -> None:
        driver, net = harness.new_driver(), harness.lab.network(1)
        driver.create_network(net)
        path, ep = joined(harness, driver, net, 5)
        link = inside(harness.lab, path, "-o", "link", "show", "eth0")
        assert "state UP" in link or "UP" in link.split(">")[0]
        assert ep.mac in link
        assert f"inet {ep.address}/24" in inside(harness.lab, path, "-o", "-4", "addr", "show")
        assert f"default via {way_out(net)} dev eth0" in inside(harness.lab, path, "route")
        assert pings(path, way_out(net))

    def test_join_and_leave_are_idempotent(self, harness: DriverHarness) -> None:
        driver, net = harness.new_driver(), harness.lab.network(1)
        driver.create_network(net)
        path, ep = joined(harness, driver, net, 5)
        driver.join(net, ep, path)
        harness.new_driver().join(net, ep, path)  # after a restart
        assert inside(harness.lab, path, "-o", "-4", "addr", "show").count(ep.address) == 1
        assert driver.owned().endpoints == host_sides(harness, ep)
        driver.leave(net, ep, path)
        driver.leave(net, ep, path)
        assert eventually(lambda: driver.owned().endpoints == frozenset())
        assert "eth0" not in inside(harness.lab, path, "-o", "link", "show")

    def test_join_repairs_what_was_broken(self, harness: DriverHarness) -> None:
        driver, net = harness.new_driver(), harness.lab.network(1)
        driver.create_network(net)
        path, ep = joined(harness, driver, net, 5)
        in_netns(path, ["ip", "addr", "flush", "dev", "eth0"], check=True)
        in_netns(path, ["ip", "link", "set", "eth0", "down"], check=True)
        harness.new_driver().join(net, ep, path)
        assert pings(path, way_out(net))
        assert f"default via {way_out(net)}" in inside(harness.lab, path, "route")

    def test_endpoints_of_one_network_reach_each_other(self, harness: DriverHarness) -> None:
        lab, driver, net = harness.lab, harness.new_driver(), harness.lab.network(1)
        driver.create_network(net)
        a, ep_a = joined(harness, driver, net, 5)
        b, ep_b = joined(harness, driver, net, 6)
        lab.echo_server(b, ep_b.address)
        assert pings(a, ep_b.address)
        assert lab.echo(a, ep_b.address) == ep_a.address  # no NAT inside a network

    def test_networks_are_isolated(self, harness: DriverHarness) -> None:
        lab, driver = harness.lab, harness.new_driver()
        net_a, net_b = lab.network(1), lab.network(2)
        driver.create_network(net_a)
        driver.create_network(net_b)
        a, _ = joined(harness, driver, net_a, 5)
        b, ep_b = joined(harness, driver, net_b, 5)
        lab.echo_server(b, ep_b.address)
        assert pings(b, way_out(net_b))  # b is up and routed ...
        assert not pings(a, ep_b.address)  # ... yet unreachable from a
        assert lab.echo(a, ep_b.address, timeout=NO_ANSWER_WAIT) is None

    def test_the_outside_sees_the_node_address(self, harness: DriverHarness) -> None:
        lab, driver, net = harness.lab, harness.new_driver(), harness.lab.network(1)
        driver.create_network(net)
        path, ep = joined(harness, driver, net, 5)
        lab.http_server(lab.outside_path, OUTSIDE)
        assert lab.curl(path, f"http://{OUTSIDE}:8080/") == outside_source(harness, ep)

    def test_an_internal_network_has_no_route_out(self, harness: DriverHarness) -> None:
        lab, driver = harness.lab, harness.new_driver()
        net = lab.network(1, internal=True)
        driver.create_network(net)
        path, ep = joined(harness, driver, net, 5)
        other, ep_other = joined(harness, driver, net, 6)
        lab.http_server(lab.outside_path, OUTSIDE)
        assert "default" not in inside(lab, path, "route")
        # even a sandbox that routes via the gateway itself gets nowhere
        in_netns(path, ["ip", "route", "add", "default", "via", way_out(net)], check=True)
        assert lab.curl(path, f"http://{OUTSIDE}:8080/", timeout=NO_ANSWER_WAIT) is None
        assert not pings(path, OUTSIDE)
        assert pings(path, ep_other.address)  # inside the network all is well
        assert ep.gateway is None and other

    def test_icc_false_stops_traffic_between_endpoints(self, harness: DriverHarness) -> None:
        if harness.driver_name not in ICC_DRIVERS:
            pytest.skip(f"icc is a bridge-driver option; {harness.driver_name} ignores it")
        lab, driver = harness.lab, harness.new_driver()
        net = lab.network(1, options={"icc": "false"})
        driver.create_network(net)
        a, _ = joined(harness, driver, net, 5)
        b, ep_b = joined(harness, driver, net, 6)
        lab.echo_server(b, ep_b.address)
        lab.http_server(lab.outside_path, OUTSIDE)
        assert not pings(a, ep_b.address)
        assert lab.echo(a, ep_b.address, timeout=NO_ANSWER_WAIT) is None
        assert pings(a, way_out(net)) and pings(b, way_out(net))
        assert lab.curl(a, f"http://{OUTSIDE}:8080/") == NODE_UPLINK

    def test_a_sandbox_on_two_networks(self, harness: DriverHarness) -> None:
        lab, driver = harness.lab, harness.new_driver()
        net_a, net_b = lab.network(1), lab.network(2)
        driver.create_network(net_a)
        driver.create_network(net_b)
        task = lab.task_id()
        both = lab.sandbox(task)
        ep0 = lab.endpoint(net_a, task, 5, index=0)
        ep1 = lab.endpoint(net_b, task, 5, index=1, route=False)
        driver.join(net_a, ep0, both)
        driver.join(net_b, ep1, both)
        b, ep_b = joined(harness, driver, net_b, 6)
        assert pings(both, ep_b.address)
        assert pings(b, ep1.address)
        routes = inside(lab, both, "route")
        assert f"default via {way_out(net_a)} dev eth0" in routes and routes.count("default") == 1
        driver.leave(net_b, ep1, both)
        assert not pings(b, ep1.address)
        assert pings(both, way_out(net_a))

    # -- adopted namespaces ------------------------------------------------------

    def test_leaving_an_adopted_namespace_removes_only_what_was_added(
        self, harness: DriverHarness
    ) -> None:
        lab, driver, net = harness.lab, harness.new_driver(), harness.lab.network(1)
        driver.create_network(net)
        foreign = f"{lab.node_name}-adopted"
        run(["ip", "netns", "add", foreign])
        try:
            run(
                ["ip", "-n", foreign, "link", "add", "own0", "type", "veth", "peer", "name", "own1"]
            )
            run(["ip", "-n", foreign, "addr", "add", "192.0.2.7/24", "dev", "own0"])
            path = lab.sandboxes.adopt(foreign)
            ep = lab.endpoint(net, lab.task_id(), 5)
            driver.join(net, ep, path)
            assert pings(path, way_out(net))
            driver.leave(net, ep, path)
            links = inside(lab, path, "-o", "link", "show")
            assert "own0" in links and "eth0" not in links
            assert "192.0.2.7/24" in inside(lab, path, "-o", "addr", "show")
        finally:
            run(["ip", "netns", "delete", foreign], check=False)

    def test_an_interface_that_is_not_ours_is_never_taken(self, harness: DriverHarness) -> None:
        lab, driver, net = harness.lab, harness.new_driver(), harness.lab.network(1)
        driver.create_network(net)
        task = lab.task_id()
        path = lab.sandbox(task)
        in_netns(
            path, ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "x1"], check=True
        )
        ep = lab.endpoint(net, task, 5)
        with pytest.raises(DriverError, match="eth0"):
            driver.join(net, ep, path)
        assert "x1" in inside(lab, path, "-o", "link", "show", "eth0")  # eth0@x1, untouched
        assert "inet" not in inside(lab, path, "-o", "addr", "show", "eth0")
        assert driver.owned().endpoints == frozenset()

    def test_a_failed_join_leaves_nothing_it_made(self, harness: DriverHarness) -> None:
        lab, driver, net = harness.lab, harness.new_driver(), harness.lab.network(1)
        driver.create_network(net)
        task = lab.task_id()
        path = lab.sandbox(task)
        ep = dataclasses.replace(lab.endpoint(net, task, 5), gateway="192.0.2.1")  # off-link
        with pytest.raises(DriverError):
            driver.join(net, ep, path)
        assert eventually(lambda: driver.owned().endpoints == frozenset())
        assert eventually(lambda: links(path) == ["lo"])

    # -- ownership ----------------------------------------------------------------

    def test_owned_reports_exactly_what_exists(self, harness: DriverHarness) -> None:
        lab, driver = harness.lab, harness.new_driver()
        net_a, net_b = lab.network(1), lab.network(2)
        driver.create_network(net_a)
        driver.create_network(net_b)
        _, ep1 = joined(harness, driver, net_a, 5)
        gone, ep2 = joined(harness, driver, net_b, 5)
        restarted = harness.new_driver()
        assert restarted.owned().networks == {net_a.id, net_b.id}
        assert restarted.owned().endpoints == host_sides(harness, ep1, ep2)
        # a sandbox removed behind the driver's back takes its endpoint with it
        lab.sandboxes.delete(gone.rsplit("/", 1)[1])
        assert eventually(lambda: restarted.owned().endpoints == host_sides(harness, ep1))

    def test_foreign_objects_are_left_alone(self, harness: DriverHarness) -> None:
        lab, driver, net = harness.lab, harness.new_driver(), harness.lab.network(1)
        node = ["ip", "-n", lab.node]
        run([*node, "link", "add", "br-foreign", "type", "bridge"])
        run([*node, "link", "add", "vfor0", "type", "veth", "peer", "name", "vfor1"])
        run([*node, "link", "set", "vfor0", "master", "br-foreign"])
        in_netns(lab.node_path, ["nft", "add", "table", "inet", "foreign"], check=True)
        driver.create_network(net)
        joined(harness, driver, net, 5)
        driver.delete_network(net.id)
        links = lab.node_links()
        assert {"br-foreign", "vfor0", "vfor1", "up0"} <= set(links)
        assert any("table inet foreign" in line for line in lab.node_tables())
        assert driver.owned().networks == frozenset()

    def test_removal_leaves_nothing(self, harness: DriverHarness) -> None:
        lab, driver = harness.lab, harness.new_driver()
        nets = [lab.network(1), lab.network(2, internal=True)]
        plans = []
        for net in nets:
            driver.create_network(net)
            plans += [(net, *joined(harness, driver, net, host)) for host in (5, 6)]
        assert harness.leftovers() != []
        for net, path, ep in plans:
            driver.leave(net, ep, path)
        for net in nets:
            driver.delete_network(net.id)
        assert eventually(lambda: harness.leftovers() == [])
        owned = driver.owned()
        assert owned.networks == frozenset() and owned.endpoints == frozenset()

"""The macvlan driver's 802.1q parent, on a kernel that has 8021q.

This machine's kernel (and CI's) has no 8021q: `test_macvlan_vlan_vm.py` boots
the stock-kernel VM and runs this file there, in one pytest call. Elsewhere it
skips, saying so. Two tests, whole (Python is ~30x slower in the VM); the
second checks a `passthru` endpoint on a veth parent there (the VM tool's notes
say one did not come up in the guest; on this kernel it does):

    node: lan0 ──veth── eth0 :outside      (passthru test: eth0 10.213.0.1, untagged)
          lan0.10 (made by the driver)      eth0.10 10.213.10.1 (the router, VLAN 10)
          lan0.20 (made by the test)        eth0.20 10.213.20.1 (VLAN 20)

An endpoint on the network whose parent is `lan0.10` reaches the router only
if its frames leave tagged with VLAN 10 (the router has no untagged address).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from types import MappingProxyType

import pytest

from mesh.sandbox import names
from mesh.sandbox.driver import EndpointPlan, NetworkPlan
from mesh.sandbox.macvlan import MacvlanDriver
from mesh.sandbox.netns import Sandboxes

pytestmark = [pytest.mark.root]


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.returncode} {done.stderr.strip()}")
    return done


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "ping", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"mpvlanprobe{os.getpid()}"
    run("ip", "netns", "add", probe)
    try:
        run("ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        made = run("ip", "-n", probe, "link", "add", "link", "p0", "name", "p0.5",
                   "type", "vlan", "id", "5", check=False)  # fmt: skip
    finally:
        run("ip", "netns", "delete", probe, check=False)
    if made.returncode != 0:
        return (
            "kernel without 8021q (VLAN sub-interfaces): this runs inside the stock-kernel "
            "VM through tests/kernel/test_macvlan_vlan_vm.py"
        )
    return None


@pytest.fixture
def lab() -> Iterator[dict[str, str]]:
    reason = _why_not()
    if reason is not None:
        pytest.skip(reason)
    tag = f"t16vlan-{os.getpid()}-{secrets.token_hex(2)}"
    node, outside = f"{tag}-node", f"{tag}-out"
    made: list[str] = []
    sandboxes = Sandboxes(names.netns_prefix(tag))
    try:
        for ns in (node, outside):
            run("ip", "netns", "add", ns)
            made.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", node, "link", "add", "lan0", "type", "veth",
            "peer", "name", "eth0", "netns", outside)  # fmt: skip
        run("ip", "-n", node, "link", "set", "lan0", "up")
        run("ip", "-n", outside, "link", "set", "eth0", "up")
        for vid in (10, 20):
            run("ip", "-n", outside, "link", "add", "link", "eth0", "name", f"eth0.{vid}",
                "type", "vlan", "id", str(vid))  # fmt: skip
            run("ip", "-n", outside, "addr", "add", f"10.213.{vid}.1/24", "dev", f"eth0.{vid}")
            run("ip", "-n", outside, "link", "set", f"eth0.{vid}", "up")
        # a VLAN the driver did not make: it is used, and never removed
        run("ip", "-n", node, "link", "add", "link", "lan0", "name", "lan0.20",
            "type", "vlan", "id", "20")  # fmt: skip
        run("ip", "-n", node, "link", "set", "lan0.20", "up")
        yield {"node": node, "outside": outside, "prefix": sandboxes.prefix}
    finally:
        for name in sandboxes.list(sandboxes.prefix):
            sandboxes.delete(name)
        for ns in made:
            run("ip", "netns", "delete", ns, check=False)


def network(vid: int) -> NetworkPlan:
    return NetworkPlan(
        id=f"{vid:02x}{secrets.token_hex(7)}",
        name=f"vlan{vid}",
        subnet=f"10.213.{vid}.0/24",
        gateway=f"10.213.{vid}.1",
        internal=False,
        options=MappingProxyType({"parent": f"lan0.{vid}"}),
    )


def endpoint(vid: int, host: int) -> EndpointPlan:
    address = f"10.213.{vid}.{host}"
    return EndpointPlan(
        secrets.token_hex(6), 0, address, 24, names.mac_of(address), "eth0", f"10.213.{vid}.1"
    )


def links(node: str) -> str:
    return run("ip", "-n", node, "-d", "-o", "link", "show").stdout


def pings(path: str, address: str) -> bool:
    argv = ("nsenter", f"--net={path}", "--", "ping", "-c", "1", "-W", "2", "-q", address)
    return run(*argv, check=False).returncode == 0


def test_an_802_1q_parent_is_made_when_missing_and_removed_only_if_made(
    lab: dict[str, str],
) -> None:
    node = lab["node"]
    driver = MacvlanDriver(names.netns_path(node))
    sandboxes = Sandboxes(lab["prefix"])
    ten, twenty = network(10), network(20)
    assert "lan0.10" not in links(node)
    driver.create_network(ten)
    driver.create_network(twenty)
    shown = [line for line in links(node).splitlines() if "lan0.10@lan0" in line]
    assert shown and "vlan protocol 802.1Q id 10" in shown[0] and "UP" in shown[0], shown
    restarted = MacvlanDriver(names.netns_path(node))
    assert restarted.owned().networks == {ten.id}  # only what it made carries its mark

    joined = []
    for net, vid in ((ten, 10), (twenty, 20)):
        ep = endpoint(vid, 5)
        path = sandboxes.create(f"{lab['prefix']}{ep.task_id}")
        driver.join(net, ep, path)
        joined.append((net, ep, path))
        assert pings(path, net.gateway), f"VLAN {vid}: no answer from the router"

    for net, ep, path in joined:
        restarted.leave(net, ep, path)
    restarted.delete_network(ten.id)
    restarted.delete_network(twenty.id)
    after = links(node)
    assert "lan0.10" not in after  # made by the driver: gone with its network
    assert "lan0.20@lan0" in after and "lan0@" in after  # not made by it: kept
    assert restarted.owned().networks == frozenset()


def test_a_passthru_endpoint_on_a_veth_parent(lab: dict[str, str]) -> None:
    node = lab["node"]
    run("ip", "-n", lab["outside"], "addr", "add", "10.213.0.1/24", "dev", "eth0")  # untagged
    driver = MacvlanDriver(names.netns_path(node))
    net = NetworkPlan(
        id=f"00{secrets.token_hex(7)}",
        name="pass",
        subnet="10.213.0.0/24",
        gateway="10.213.0.1",
        internal=False,
        options=MappingProxyType({"parent": "lan0", "macvlan_mode": "passthru"}),
    )
    driver.create_network(net)
    ep = endpoint(0, 5)
    path = Sandboxes(lab["prefix"]).create(f"{lab['prefix']}{ep.task_id}")
    driver.join(net, ep, path)
    assert pings(path, net.gateway)
    driver.leave(net, ep, path)
    driver.delete_network(net.id)

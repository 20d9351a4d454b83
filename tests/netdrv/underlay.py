"""Nodes joined by an underlay, for the overlay driver's tests (root only; nothing on the host).

Each node is a `Lab` (its node namespace, outside and sandboxes) with one more
link, `ul0`, into a middle namespace `<run>-mid` that is either

- a switch (`switched`): a bridge `sw0` there, all nodes on 10.98.0.0/24
  (node i at 10.98.0.<10+i>), one L2 segment; or
- a router (`routed`): node i on its own subnet 10.97.<i>.0/24 (node .2, the
  router .1), routed by the middle namespace, so VTEPs are on different
  subnets and the VXLAN packets cross a router.

Node i's underlay port in the middle namespace is `p<i>`: a capture there sees
everything node i sends and receives. `close()` removes every namespace, also
after a failure.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mesh.sandbox import names
from mesh.sandbox.driver import EndpointPlan, NetworkPlan
from mesh.sandbox.overlay import OverlayDriver, Peer
from tests.netdrv.lab import Lab, run

VXLAN_PORT = 4789
HOST_BASE = 250  # node i's own address on a network: the subnet's .<250+i>


@dataclass
class Node:
    index: int
    lab: Lab
    vtep: str
    driver: OverlayDriver

    def plan(self, net: NetworkPlan) -> NetworkPlan:
        """The network as this node gets it: its own host address."""
        subnet = ipaddress.IPv4Network(net.subnet)
        return dataclasses.replace(
            net, host_address=str(subnet.network_address + HOST_BASE + self.index)
        )


@dataclass
class Task:
    node: Node
    path: str
    ep: EndpointPlan


@dataclass
class Underlay:
    size: int
    routed: bool = False
    underlay_mtu: int | None = None
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mid = f"t16ov-{os.getpid()}-{secrets.token_hex(3)}-mid"
        self.mid_path = names.netns_path(self.mid)
        self._made_mid = False
        try:
            run(["ip", "netns", "add", self.mid])
            self._made_mid = True
            run(["ip", "-n", self.mid, "link", "set", "lo", "up"])
            if self.routed:
                run(["ip", "netns", "exec", self.mid, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            else:
                run(["ip", "-n", self.mid, "link", "add", "sw0", "type", "bridge"])
                run(["ip", "-n", self.mid, "link", "set", "sw0", "up"])
            for index in range(1, self.size + 1):
                self.nodes.append(self._node(index))
        except BaseException:
            self.close()
            raise

    def _node(self, index: int) -> Node:
        lab = Lab()
        try:
            port = f"p{index}"
            run(["ip", "-n", lab.node, "link", "add", "ul0", "type", "veth",
                 "peer", "name", port, "netns", self.mid])  # fmt: skip
            if self.routed:
                vtep = f"10.97.{index}.2"
                run(["ip", "-n", self.mid, "addr", "add", f"10.97.{index}.1/24", "dev", port])
            else:
                vtep = f"10.98.0.{10 + index}"
                run(["ip", "-n", self.mid, "link", "set", port, "master", "sw0"])
            run(["ip", "-n", self.mid, "link", "set", port, "up"])
            run(["ip", "-n", lab.node, "addr", "add", f"{vtep}/24", "dev", "ul0"])
            run(["ip", "-n", lab.node, "link", "set", "ul0", "up"])
            if self.routed:
                run(["ip", "-n", lab.node, "route", "add", "10.97.0.0/16",
                     "via", f"10.97.{index}.1"])  # fmt: skip
            driver = OverlayDriver(lab.node_path, vtep=vtep, underlay_mtu=self.underlay_mtu)
            return Node(index, lab, vtep, driver)
        except BaseException:
            lab.close()
            raise

    # -- networks and tasks -------------------------------------------------------

    def network(self, index: int) -> NetworkPlan:
        """A new overlay network (VNI 4096 + index), made on every node."""
        net = self.nodes[0].lab.network(index)
        net = dataclasses.replace(net, vni=4096 + index)
        for node in self.nodes:
            node.driver.create_network(node.plan(net))
        return net

    def task(self, node: Node, net: NetworkPlan, host: int) -> Task:
        """A sandbox on `node` joined to `net` at the subnet's .<host>, routed via the node."""
        task_id = node.lab.task_id()
        path = node.lab.sandbox(task_id)
        plan = node.plan(net)
        ep = node.lab.endpoint(plan, task_id, host)
        ep = dataclasses.replace(ep, gateway=plan.host_address)
        node.driver.join(plan, ep, path)
        return Task(node, path, ep)

    def peers_for(self, node: Node, net: NetworkPlan, tasks: Collection[Task]) -> set[Peer]:
        """What the control plane would give `node`: every other node's tasks and host
        address on the network (this node's own are on its bridge)."""
        peers = {Peer(t.ep.mac, t.ep.address, t.node.vtep) for t in tasks if t.node is not node}
        for other in self.nodes:
            if other is not node:
                address = other.plan(net).host_address
                assert address is not None
                peers.add(Peer(names.mac_of(address), address, other.vtep))
        return peers

    def set_all_peers(self, net: NetworkPlan, tasks: Collection[Task]) -> None:
        for node in self.nodes:
            node.driver.set_peers(node.plan(net), self.peers_for(node, net, tasks))

    # -- capture ------------------------------------------------------------------

    @contextmanager
    def capture(self, port: str) -> Iterator[list[bytes]]:
        """tcpdump on `port` in the middle namespace; the list fills with the frames
        (Ethernet) when the block ends."""
        frames: list[bytes] = []
        with tempfile.TemporaryDirectory() as folder:
            dump = os.path.join(folder, "underlay.pcap")
            # --immediate-mode: a frame is handed over as it comes (else it may wait in
            # the capture ring past SIGINT and never be written); -U: written at once
            argv = ["ip", "netns", "exec", self.mid, "tcpdump", "-i", port, "-n", "-U",
                    "--immediate-mode", "-s", "512", "-w", dump]  # fmt: skip
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                assert proc.stderr is not None
                line = proc.stderr.readline()  # "listening on p1, ..." once it captures
                assert b"listening" in line, line
                yield frames
                time.sleep(0.3)  # the last frames' way through the kernel
            finally:
                proc.send_signal(signal.SIGINT)  # tcpdump writes what it has and exits
                finish(proc)
            frames.extend(read_pcap(dump))

    def close(self) -> None:
        for node in self.nodes:
            node.lab.close()
        self.nodes.clear()
        if self._made_mid:
            run(["ip", "netns", "delete", self.mid], check=False)
            self._made_mid = False


def finish(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Wait for a process this test started to exit; kill it if it does not."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


# -- what a capture holds ---------------------------------------------------------


def read_pcap(path: str) -> list[bytes]:
    """The frames of a classic pcap file (Ethernet link type)."""
    with open(path, "rb") as file:
        data = file.read()
    if len(data) < 24:
        return []
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(order + "I", data[20:24])[0]
    assert linktype == 1, f"not Ethernet: link type {linktype}"
    frames, offset = [], 24
    while offset + 16 <= len(data):
        caplen = struct.unpack(order + "I", data[offset + 8 : offset + 12])[0]
        frames.append(data[offset + 16 : offset + 16 + caplen])
        offset += 16 + caplen
    return frames


@dataclass(frozen=True)
class Vxlan:
    """One VXLAN packet seen on the underlay."""

    outer_src: str
    outer_dst: str
    vni: int
    inner_type: int  # the inner frame's EtherType
    inner_dst_mac: str
    inner: bytes  # the inner frame


@dataclass
class Seen:
    vxlan: list[Vxlan] = field(default_factory=list)
    arp_targets: list[str] = field(default_factory=list)  # underlay ARP requests' targets
    other_udp_ports: list[int] = field(default_factory=list)


def classify(frames: list[bytes], port: int = VXLAN_PORT) -> Seen:
    seen = Seen()
    for frame in frames:
        ethertype = struct.unpack("!H", frame[12:14])[0]
        if ethertype == 0x0806 and len(frame) >= 42:
            seen.arp_targets.append(str(ipaddress.IPv4Address(frame[38:42])))
            continue
        if ethertype != 0x0800:
            continue  # IPv6 neighbour discovery of the underlay links
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 17:
            continue
        udp = ip[ihl:]
        dport = struct.unpack("!H", udp[2:4])[0]
        if dport != port:
            seen.other_udp_ports.append(dport)
            continue
        header = udp[8:16]
        assert header[0] & 0x08, "VXLAN header without the I flag (valid VNI)"
        inner = udp[16:]
        seen.vxlan.append(
            Vxlan(
                outer_src=str(ipaddress.IPv4Address(ip[12:16])),
                outer_dst=str(ipaddress.IPv4Address(ip[16:20])),
                vni=int.from_bytes(header[4:7], "big"),
                inner_type=struct.unpack("!H", inner[12:14])[0],
                inner_dst_mac=":".join(f"{b:02x}" for b in inner[0:6]),
                inner=inner,
            )
        )
    return seen


def inner_ipv4(packet: Vxlan) -> tuple[str, str, int] | None:
    """(source, destination, protocol) of an inner IPv4 packet."""
    if packet.inner_type != 0x0800:
        return None
    ip = packet.inner[14:]
    return (
        str(ipaddress.IPv4Address(ip[12:16])),
        str(ipaddress.IPv4Address(ip[16:20])),
        ip[9],
    )

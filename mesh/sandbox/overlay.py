"""The `overlay` driver's kernel side: a VXLAN segment per network, a bridge per node.

Kernel design (docs/networking.md, "The overlay driver", describes it for users):

* Network, on every node that serves it, in the node's namespace:
  - bridge `mpob-<net_id[:8]>`, up, with this node's own address on the
    network (`host_address/prefixlen`: its "load-balancer endpoint", as in
    Swarm; not the subnet's gateway, which no node holds) and the MAC
    `names.mac_of(host_address)`, so a remote node's static entries for it
    stay true; its alias `meshplane net=<id> internal=<0|1> vni=<vni>` is what
    `owned()` and the nftables table are rebuilt from after a restart;
  - VXLAN device `mpvx-<net_id[:8]>`, a port of that bridge: `id` = the VNI,
    `dstport` = the data-path port, `local` = this node's VTEP (its advertise
    address), `nolearning`, `proxy` (ARP from the sandboxes is answered from
    the neighbour table; no ARP crosses the underlay), no multicast group and
    no all-zero FDB entry: nothing is ever flooded to other nodes, a frame
    goes only where a static FDB entry sends it. As a bridge port it has
    learning and unknown-unicast flooding off (broadcast stays on, so ARP
    reaches the proxy); its alias `meshplane net=<id> vni=<vni>`;
  - MTU = underlay MTU - 50 (inner Ethernet 14 + outer IPv4 20 + UDP 8 +
    VXLAN 8), and `esp.ESP_OVERHEAD` (40) less on an encrypted network
    (`--opt encrypted`), on the bridge, the VXLAN device and both ends of every veth; the
    underlay MTU is given, or that of the interface holding the VTEP address.
  - `net.ipv4.ip_forward=1`, and the node's table `inet meshplane_net`
    (`mesh.sandbox.firewall`) covers `mpob-` bridges as `mpbr-` ones:
    isolation between networks, an internal network forwards nothing in or
    out, a non-internal subnet's traffic leaving the node is masqueraded, and
    traffic entering the overlay from outside its subnet (the routing mesh's
    DNAT to a task, maybe on another node) is masqueraded to the host address,
    so the answer comes back through this node.
* Endpoint: a veth pair on the bridge (`mesh.sandbox.veth`, as the bridge
  driver's), alias `meshplane ep=<task_id>/<index> net=<id> driver=overlay`;
  the default route is the plan's (`EndpointPlan.gateway`: the node's
  `host_address`, the way out through this node).
* Peers (`set_peers`): for each remote endpoint (a task's, or another node's
  host address) exactly these entries, each network's own, stale ones removed:
  - VXLAN FDB `<mac> dst <vtep> self permanent` (where to tunnel a frame);
  - bridge FDB `<mac> dev mpvx-* master static` (the bridge forwards it to
    the VXLAN port without learning or flooding);
  - neighbour `<address> lladdr <mac> nud permanent` on the VXLAN device (for
    the proxy's ARP answers) and on the bridge (the node's own traffic to it).
  Entries are written with replace, so a learned or older entry never blocks
  one (moby#52661).

`icc` is a bridge-driver option (Docker's `enable_icc`) and is ignored here.
Everything is synchronous and idempotent, and runs in the node's namespace
(`node_netns`, a path; None: the calling thread's own) by `mesh.core.netns`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from mesh.sandbox import driver, esp, firewall, names, veth
from mesh.sandbox.driver import DriverError, EndpointPlan, NetworkPlan, Owned
from mesh.sandbox.veth import ALIAS_TAG, parse_alias

NAME = "overlay"
VXLAN_OVERHEAD = 50  # inner Ethernet 14 + outer IPv4 20 + UDP 8 + VXLAN 8
DEFAULT_PORT = 4789
DEFAULT_UNDERLAY_MTU = 1500  # no VTEP given and no default route to read one from
VNI_MAX = (1 << 24) - 1

# linux/neighbour.h
NUD_REACHABLE = 0x02
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
NTF_MASTER = 0x04


@dataclass(frozen=True, slots=True)
class Peer:
    """One remote endpoint (a task's, or a node's host_address)."""

    mac: str  # its MAC (names.mac_of(address))
    address: str  # its overlay address
    vtep: str  # the underlay address of the node that has it


def overhead(net: NetworkPlan) -> int:
    """Bytes the underlay carries beyond an overlay frame: VXLAN's, and ESP's on an
    encrypted network (an unreadable `encrypted` value counts as encrypted, as
    `mesh.sandbox.encryption` does)."""
    try:
        encrypted = esp.is_encrypted(net.options)
    except esp.EspError:
        encrypted = True
    return VXLAN_OVERHEAD + (esp.ESP_OVERHEAD if encrypted else 0)


def bridge_alias(net: NetworkPlan) -> str:
    return f"{ALIAS_TAG} net={net.id} internal={int(net.internal)} vni={net.vni}"


def vxlan_alias(net: NetworkPlan) -> str:
    return f"{ALIAS_TAG} net={net.id} vni={net.vni}"


def endpoint_alias(net_id: str, ep: EndpointPlan) -> str:
    return f"{ALIAS_TAG} ep={ep.task_id}/{ep.index} net={net_id} driver={NAME}"


def is_endpoint_alias(alias: str | None) -> bool:
    return parse_alias(alias).get("driver") == NAME


class OverlayDriver:
    """The overlay driver (see the module docstring for the kernel design)."""

    name = NAME

    def __init__(
        self,
        node_netns: str | None = None,
        *,
        vtep: str | None = None,
        port: int = DEFAULT_PORT,
        underlay_mtu: int | None = None,
    ) -> None:
        if vtep is not None:
            ipaddress.IPv4Address(vtep)  # ValueError names a bad one
        if not 0 < port < 65536:
            raise ValueError(f"data-path port {port} is out of range 1-65535")
        if underlay_mtu is not None and underlay_mtu < 68 + VXLAN_OVERHEAD:
            raise ValueError(f"underlay MTU {underlay_mtu} leaves no room for VXLAN")
        self.node_netns = node_netns
        self.vtep = vtep
        self.port = port
        self.underlay_mtu = underlay_mtu

    # -- the Driver interface ------------------------------------------------------

    def create_network(self, net: NetworkPlan) -> None:
        subnet, host = _check(net)
        bridge_name, vxlan_name = names.overlay_bridge_name(net.id), names.vxlan_name(net.id)
        with veth.node(self.node_netns) as ipr:
            veth.set_ip_forward()
            mtu = self._underlay_mtu(ipr) - overhead(net)
            bridge = veth.lookup(ipr, bridge_name)
            if bridge is None:
                ipr.link("add", ifname=bridge_name, kind="bridge", mtu=mtu)
                bridge = veth.require(ipr, bridge_name)
            if veth.kind(ipr.get_links(bridge)[0]) != "bridge":
                raise DriverError(f"{bridge_name} exists and is not a bridge; remove it")
            # The bridge's MAC is fixed: remote nodes hold it in their static entries
            # (a bridge otherwise takes its lowest port's MAC, changing as ports go).
            ipr.link(
                "set",
                index=bridge,
                ifalias=bridge_alias(net),
                address=names.mac_of(str(host)),
                mtu=mtu,
            )
            veth.ensure_address(ipr, bridge, str(host), subnet.prefixlen)
            vxlan = self._ensure_vxlan(ipr, net, vxlan_name, bridge, mtu)
            # No learning (entries are static: a learned one would outlive a moved
            # task, moby#35401) and no unknown-unicast flooding into the tunnel.
            ipr.brport("set", index=vxlan, learning=0, unicast_flood=0)
            for port in veth.ports(ipr, bridge):
                ipr.link("set", index=port, mtu=mtu)
            ipr.link("set", index=vxlan, state="up")
            ipr.link("set", index=bridge, state="up")
            firewall.sync(ipr)

    def delete_network(self, net_id: str) -> None:
        with veth.node(self.node_netns) as ipr:
            bridge = veth.lookup(ipr, names.overlay_bridge_name(net_id))
            if bridge is not None:
                for port in veth.ports(ipr, bridge):
                    veth.delete_link(ipr, port)
            for name in (names.vxlan_name(net_id), names.overlay_bridge_name(net_id)):
                index = veth.lookup(ipr, name)
                if index is not None:
                    veth.delete_link(ipr, index)
            firewall.sync(ipr)

    def join(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None:
        with veth.node(self.node_netns) as ipr:
            bridge = veth.network_bridge(ipr, names.overlay_bridge_name(net.id), net.name)
            mtu = int(ipr.get_links(bridge)[0].get("IFLA_MTU"))
            alias = endpoint_alias(net.id, ep)
            veth.join(ipr, bridge, ep, netns, alias, isolated=False, mtu=mtu)

    def leave(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None:
        with veth.node(self.node_netns) as ipr:
            veth.leave(ipr, ep)

    def owned(self) -> Owned:
        networks: set[str] = set()
        bridges: set[int] = set()
        with veth.node(self.node_netns) as ipr:
            links = ipr.get_links()
        for link in links:
            name, kind = link.get("IFLA_IFNAME") or "", veth.kind(link)
            net_id = parse_alias(link.get("IFLA_IFALIAS")).get("net")
            if name.startswith(names.OVERLAY_BRIDGE_PREFIX) and kind == "bridge":
                bridges.add(link["index"])
                networks.add(net_id or name[len(names.OVERLAY_BRIDGE_PREFIX) :])
            elif name.startswith(names.VXLAN_PREFIX) and kind == "vxlan":
                # a VXLAN device without its bridge: a create that stopped half-way
                networks.add(net_id or name[len(names.VXLAN_PREFIX) :])
        # A short id (from a name without alias) and the full one are one network.
        full = {n for n in networks if len(n) > 8}
        networks -= {n for n in networks if len(n) <= 8 and any(f.startswith(n) for f in full)}
        endpoints = veth.endpoints_of(
            links, bridges, lambda link: is_endpoint_alias(link.get("IFLA_IFALIAS"))
        )
        return Owned(networks=frozenset(networks), endpoints=frozenset(endpoints))

    # -- the overlay's own -----------------------------------------------------------

    def set_peers(self, net: NetworkPlan, peers: Collection[Peer]) -> None:
        """Make the network's static FDB and neighbour entries exactly `peers` (idempotent).

        A peer whose VTEP is this node's own is skipped (its endpoints are on the
        bridge). Entries of other networks are not touched.
        """
        subnet = ipaddress.IPv4Network(net.subnet, strict=False)
        wanted = self._wanted(net, subnet, peers)
        with veth.node(self.node_netns) as ipr:
            vxlan = veth.lookup(ipr, names.vxlan_name(net.id))
            bridge = veth.lookup(ipr, names.overlay_bridge_name(net.id))
            if vxlan is None or bridge is None:
                raise DriverError(f"network {net.name} has no VXLAN device on this node yet")
            own_mac = (ipr.get_links(vxlan)[0].get("IFLA_ADDRESS") or "").lower()
            self._sync_fdb(ipr, vxlan, own_mac, wanted)
            macs = {peer.address: peer.mac for peer in wanted.values()}
            for device in (vxlan, bridge):
                _sync_neighbours(ipr, device, macs)

    def peers(self, net: NetworkPlan) -> set[Peer]:
        """The peers the kernel holds for the network (its VXLAN FDB joined with its
        neighbour entries): what `set_peers` last made, read back."""
        with veth.node(self.node_netns) as ipr:
            vxlan = veth.lookup(ipr, names.vxlan_name(net.id))
            if vxlan is None:
                return set()
            vteps = {
                _mac(entry): entry.get("NDA_DST")
                for entry in _fdb(ipr, vxlan)
                if entry["flags"] & NTF_SELF and entry.get("NDA_DST")
            }
            return {
                Peer(mac, address, vteps[mac])
                for address, mac in _neighbours(ipr, vxlan).items()
                if mac in vteps
            }

    def _wanted(
        self, net: NetworkPlan, subnet: ipaddress.IPv4Network, peers: Collection[Peer]
    ) -> dict[str, Peer]:
        """The peers to program, by MAC, checked: a bad one is refused whole, naming it."""
        wanted: dict[str, Peer] = {}
        addresses: dict[str, str] = {}
        for peer in peers:
            try:
                address = ipaddress.IPv4Address(peer.address)
                ipaddress.IPv4Address(peer.vtep)
                mac = _normal_mac(peer.mac)
            except ValueError as error:
                raise DriverError(f"bad peer {peer} of network {net.name}: {error}") from None
            if address not in subnet:
                raise DriverError(f"peer {peer.address} is not in {net.name}'s subnet {subnet}")
            if self.vtep is not None and peer.vtep == self.vtep:
                continue
            clean = Peer(mac, str(address), peer.vtep)
            if wanted.get(mac, clean) != clean or addresses.get(clean.address, mac) != mac:
                raise DriverError(f"peers of {net.name} disagree on {mac} / {clean.address}")
            wanted[mac] = clean
            addresses[clean.address] = mac
        return wanted

    def _sync_fdb(self, ipr: Any, vxlan: int, own_mac: str, wanted: dict[str, Peer]) -> None:
        have_self: dict[str, set[str]] = {}
        have_master: dict[str, int] = {}  # MAC -> NUD state
        for entry in _fdb(ipr, vxlan):
            mac, state = _mac(entry), entry["state"]
            if entry["flags"] & NTF_SELF:
                have_self.setdefault(mac, set()).add(entry.get("NDA_DST") or "")
            elif entry.get("NDA_MASTER") and mac != own_mac and not state & NUD_PERMANENT:
                # the bridge's entry on its VXLAN port (a dump marks it by NDA_MASTER,
                # not NTF_MASTER); a permanent one is the port's own MAC, not a peer
                have_master[mac] = state
        for mac, dsts in have_self.items():
            keep = wanted[mac].vtep if mac in wanted else None
            for dst in dsts - {keep}:
                # also an all-zero (flooding) entry someone added: none is ever wanted
                arguments = {"dst": dst} if dst else {}
                ipr.neigh(
                    "del", family=socket.AF_BRIDGE, ifindex=vxlan, lladdr=mac,
                    flags=NTF_SELF, **arguments,
                )  # fmt: skip
        for mac in have_master - wanted.keys():
            ipr.neigh("del", family=socket.AF_BRIDGE, ifindex=vxlan, lladdr=mac, flags=NTF_MASTER)
        for mac, peer in wanted.items():
            if have_self.get(mac) != {peer.vtep}:
                ipr.neigh(
                    "replace", family=socket.AF_BRIDGE, ifindex=vxlan, lladdr=mac,
                    dst=peer.vtep, state=NUD_NOARP | NUD_PERMANENT,
                    flags=NTF_SELF,
                )  # fmt: skip
            if not have_master.get(mac, 0) & NUD_NOARP:  # missing, or learned (dynamic)
                ipr.neigh(
                    "replace", family=socket.AF_BRIDGE, ifindex=vxlan, lladdr=mac,
                    state=NUD_NOARP, flags=NTF_MASTER,
                )  # fmt: skip

    # -- inside the node -----------------------------------------------------------

    def _underlay_mtu(self, ipr: Any) -> int:
        if self.underlay_mtu is not None:
            return self.underlay_mtu
        if self.vtep is not None:
            for entry in ipr.get_addr(family=socket.AF_INET):
                if entry.get("IFA_ADDRESS") == self.vtep:
                    return int(ipr.get_links(entry["index"])[0].get("IFLA_MTU"))
            raise DriverError(f"no interface of this node has the VTEP address {self.vtep}")
        for route in ipr.get_default_routes(family=socket.AF_INET):
            oif = route.get("RTA_OIF")
            if oif is not None:
                return int(ipr.get_links(oif)[0].get("IFLA_MTU"))
        return DEFAULT_UNDERLAY_MTU

    def _ensure_vxlan(self, ipr: Any, net: NetworkPlan, name: str, bridge: int, mtu: int) -> int:
        """The network's VXLAN device as planned, a port of `bridge`; one that differs
        (another VNI, port or VTEP) is made anew (its FDB goes with it: set_peers again)."""
        index = veth.lookup(ipr, name)
        if index is not None and not self._vxlan_as_planned(ipr.get_links(index)[0], net):
            veth.delete_link(ipr, index)
            index = None
        if index is None:
            local = {} if self.vtep is None else {"vxlan_local": self.vtep}
            ipr.link(
                "add",
                ifname=name,
                kind="vxlan",
                vxlan_id=net.vni,
                vxlan_port=self.port,
                vxlan_learning=0,
                vxlan_proxy=1,
                mtu=mtu,
                master=bridge,
                **local,
            )
            index = veth.require(ipr, name)
        ipr.link("set", index=index, ifalias=vxlan_alias(net), master=bridge, mtu=mtu)
        return index

    def _vxlan_as_planned(self, link: Any, net: NetworkPlan) -> bool:
        if veth.kind(link) != "vxlan":
            raise DriverError(f"{link.get('IFLA_IFNAME')} exists and is not VXLAN; remove it")
        data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        found = {key: value for key, value in data["attrs"]} if data else {}
        group = found.get("IFLA_VXLAN_GROUP")
        return (
            found.get("IFLA_VXLAN_ID") == net.vni
            and found.get("IFLA_VXLAN_PORT") == self.port
            and found.get("IFLA_VXLAN_LOCAL") == self.vtep
            and found.get("IFLA_VXLAN_LEARNING") == 0
            and found.get("IFLA_VXLAN_PROXY") == 1
            and group in (None, "0.0.0.0")
        )


def _check(net: NetworkPlan) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]:
    subnet = ipaddress.IPv4Network(net.subnet, strict=False)
    if not 0 < net.vni <= VNI_MAX:
        raise DriverError(f"overlay network {net.name} has no VNI (got {net.vni})")
    if net.host_address is None:
        raise DriverError(f"overlay network {net.name} has no address for this node")
    host = ipaddress.IPv4Address(net.host_address)
    if host not in subnet:
        raise DriverError(f"host address {host} of network {net.name} is not in {subnet}")
    return subnet, host


def _normal_mac(mac: str) -> str:
    parts = mac.lower().split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{mac!r} is not a MAC address")
    int("".join(parts), 16)
    return ":".join(parts)


def _mac(entry: Any) -> str:
    return str(entry.get("NDA_LLADDR") or "").lower()


def _fdb(ipr: Any, index: int) -> list[Any]:
    """The FDB entries of one device (the device's own, NTF_SELF; its bridge's, NTF_MASTER)."""
    return [e for e in ipr.neigh("dump", family=socket.AF_BRIDGE) if e["ifindex"] == index]


def _neighbours(ipr: Any, index: int) -> dict[str, str]:
    """The permanent IPv4 neighbour entries of one device: address -> MAC."""
    return {
        str(e.get("NDA_DST")): _mac(e)
        for e in ipr.neigh("dump", family=socket.AF_INET)
        if e["ifindex"] == index and e["state"] & NUD_PERMANENT
    }


def _sync_neighbours(ipr: Any, index: int, wanted: dict[str, str]) -> None:
    have = _neighbours(ipr, index)
    for address in have.keys() - wanted.keys():
        ipr.neigh("del", family=socket.AF_INET, ifindex=index, dst=address)
    for address, mac in wanted.items():
        if have.get(address) != mac:
            ipr.neigh(
                "replace", family=socket.AF_INET, ifindex=index, dst=address, lladdr=mac,
                state=NUD_PERMANENT,
            )  # fmt: skip


driver.register(NAME, OverlayDriver)

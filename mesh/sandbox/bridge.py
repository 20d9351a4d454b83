"""The `bridge` driver: a Linux bridge per network on its node, a veth per endpoint.

Kernel design (docs/networking.md, "The bridge driver", describes it for users):

* Network: bridge `mpbr-<net_id[:8]>` in the node's namespace, up, with the
  network's gateway address (`gateway/prefixlen`); its interface alias
  (IFLA_IFALIAS) records `meshplane net=<id> internal=<0|1>`, so `owned()` and
  the nftables table are rebuilt from the kernel alone after a restart.
  `net.ipv4.ip_forward=1` in the node's namespace.
* Endpoint: veth pair; the host side `mpv<task_id[:8]><index>` is a port of the
  bridge, up; the peer is made as `mpt<task_id[:8]><index>`, moved into the
  sandbox and renamed `eth<index>` there, with the endpoint's MAC and address,
  up; the endpoint that carries the default route gets `default via <gateway>`.
  Both ends carry the alias `meshplane ep=<task_id>/<index> net=<id>`: inside an
  adopted namespace an `eth<index>` without it is someone else's, and joining
  fails instead of touching it. Leaving deletes the host side (the kernel
  removes the peer with it), so exactly what was added goes.
* nftables, table `inet meshplane_net` in the node's namespace, rewritten whole
  (atomically, `nft -f`) from the bridges that exist whenever a network is made
  or removed:
  - forward: a packet from one `mpbr-*` bridge to another is dropped
    (isolation between networks); an internal network's bridge forwards
    nothing in or out (no route out; the sandbox also gets no default route
    through it, which the manager decides);
  - postrouting (nat): traffic from a non-internal network's subnet leaving by
    any other interface is masqueraded.
  Traffic between endpoints of one bridge is switched, not routed, so it
  never meets these rules.
* `icc=false` (option): every endpoint's bridge port is isolated
  (`IFLA_BRPORT_ISOLATED`, as `bridge link set dev X isolated on`): isolated
  ports cannot reach each other but do reach the bridge itself (the gateway,
  so the way out) — no br_netfilter needed. As in Docker, this also stops the
  VIP path to tasks on the same icc=false network (the sandbox LB DNATs to a
  task address, which is then another isolated port); VIPs of tasks elsewhere
  are routed through the gateway and stay reachable.
* Not done here: unsolicited inbound traffic to a non-internal subnet from the
  node's other interfaces is not dropped (the node's LB DNATs published ports
  to task addresses, whichever backend it runs).

Everything is synchronous and idempotent, and runs in the node's namespace
(`node_netns`, a path; None: the calling thread's own) by `mesh.core.netns`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from mesh.core.netns import entered
from mesh.sandbox import driver, names
from mesh.sandbox.driver import DriverError, EndpointPlan, NetworkPlan, Owned

NAME = "bridge"
TEMP_PREFIX = "mpt"  # the sandbox end of a veth until it is moved and renamed
ALIAS_TAG = "meshplane"
NFT_TIMEOUT = 30.0


def bridge_alias(net_id: str, internal: bool) -> str:
    return f"{ALIAS_TAG} net={net_id} internal={int(internal)}"


def endpoint_alias(net_id: str, ep: EndpointPlan) -> str:
    return f"{ALIAS_TAG} ep={ep.task_id}/{ep.index} net={net_id}"


def parse_alias(alias: str | None) -> dict[str, str]:
    """`meshplane k=v k=v` -> {k: v}; anything else -> {}."""
    words = (alias or "").split()
    if not words or words[0] != ALIAS_TAG:
        return {}
    return dict(word.split("=", 1) for word in words[1:] if "=" in word)


def temp_name(ep: EndpointPlan) -> str:
    return f"{TEMP_PREFIX}{ep.task_id[:8]}{ep.index:x}"


def icc_disabled(net: NetworkPlan) -> bool:
    return net.options.get("icc", "true").strip().lower() in ("false", "0", "no", "off")


def render_ruleset(bridges: list[tuple[str, str, bool]]) -> str:
    """The whole `inet meshplane_net` table for (bridge, subnet, internal) triples.

    Pure text, so the rules are unit-tested without a kernel. An empty list
    gives the script that removes the table.
    """
    table = f"inet {names.BRIDGE_TABLE}"
    lines = [f"table {table} {{}}", f"delete table {table}"]  # idempotent flush
    if not bridges:
        return "\n".join(lines) + "\n"
    lines += [
        f"table {table} {{",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
    ]
    for bridge, _subnet, internal in bridges:
        lines.append(
            f'    iifname "{bridge}" oifname "{names.BRIDGE_PREFIX}*" oifname != "{bridge}" drop'
        )
        if internal:
            lines.append(f'    iifname "{bridge}" oifname != "{bridge}" drop')
            lines.append(f'    oifname "{bridge}" iifname != "{bridge}" drop')
    lines += [
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
    ]
    for bridge, subnet, internal in bridges:
        if not internal:
            lines.append(f'    ip saddr {subnet} oifname != "{bridge}" masquerade')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


class BridgeDriver:
    """The bridge driver (see the module docstring for the kernel design)."""

    name = NAME

    def __init__(self, node_netns: str | None = None) -> None:
        self.node_netns = node_netns

    # -- the Driver interface ------------------------------------------------------

    def create_network(self, net: NetworkPlan) -> None:
        subnet = ipaddress.IPv4Network(net.subnet, strict=False)
        gateway = ipaddress.IPv4Address(net.gateway)
        if gateway not in subnet:
            raise DriverError(f"gateway {gateway} of network {net.name} is not in {subnet}")
        bridge = names.bridge_name(net.id)
        with self._node() as ipr:
            _set_ip_forward()
            index = _lookup(ipr, bridge)
            if index is None:
                ipr.link("add", ifname=bridge, kind="bridge")
                index = _require(ipr, bridge)
            link = ipr.get_links(index)[0]
            if _kind(link) != "bridge":
                raise DriverError(f"{bridge} exists and is not a bridge; remove it")
            # A bridge takes the lowest MAC of its ports unless one is set: the gateway's
            # MAC would change as endpoints come and go, behind the sandboxes' ARP caches.
            ipr.link(
                "set",
                index=index,
                ifalias=bridge_alias(net.id, net.internal),
                address=names.mac_of(str(gateway)),
            )
            _ensure_address(ipr, index, str(gateway), subnet.prefixlen)
            ipr.link("set", index=index, state="up")
            isolated = int(icc_disabled(net))
            for port in _ports(ipr, index):
                ipr.brport("set", index=port, isolated=isolated)
            self._sync_nft(ipr)

    def delete_network(self, net_id: str) -> None:
        bridge = names.bridge_name(net_id)
        with self._node() as ipr:
            index = _lookup(ipr, bridge)
            if index is not None:
                for port in _ports(ipr, index):
                    _delete_link(ipr, port)
                _delete_link(ipr, index)
            self._sync_nft(ipr)

    def join(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None:
        host, temp = names.veth_name(ep.task_id, ep.index), temp_name(ep)
        alias = endpoint_alias(net.id, ep)
        with self._node() as ipr:
            bridge = _lookup(ipr, names.bridge_name(net.id))
            if bridge is None:
                raise DriverError(f"network {net.name} has no bridge on this node yet")
            peer_inside = _peer_inside(netns, ep, temp, alias)  # also: eth<i> not someone's
            index = _lookup(ipr, host)
            if index is not None and _lookup(ipr, temp) is None and not peer_inside:
                _delete_link(ipr, index)  # its peer went elsewhere: make it anew
                index = None
            made = index is None
            try:
                if index is None:
                    stale = _lookup(ipr, temp)
                    if stale is not None:
                        _delete_link(ipr, stale)
                    ipr.link("add", ifname=host, kind="veth", peer=temp)
                    index = _require(ipr, host)
                ipr.link("set", index=index, ifalias=alias, master=bridge, state="up")
                ipr.brport("set", index=index, isolated=int(icc_disabled(net)))
                peer = _lookup(ipr, temp)
                if peer is not None:
                    ipr.link("set", index=peer, ifalias=alias)
                    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        ipr.link("set", index=peer, net_ns_fd=fd)
                    finally:
                        os.close(fd)
                with entered(netns), IPRoute() as inner:
                    _configure_inside(inner, ep, temp, alias)
            except BaseException:
                if made and index is not None:  # a failed join leaves nothing it made
                    _delete_link(ipr, index)
                raise

    def leave(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None:
        with self._node() as ipr:
            for name in (names.veth_name(ep.task_id, ep.index), temp_name(ep)):
                index = _lookup(ipr, name)
                if index is not None:
                    _delete_link(ipr, index)
        # A peer left inside under its temporary name (a crash between the move and
        # the rename) lost its host side above and went with it: nothing else to do.

    def owned(self) -> Owned:
        networks: set[str] = set()
        endpoints: set[str] = set()
        with self._node() as ipr:
            for link in ipr.get_links():
                name = link.get("IFLA_IFNAME") or ""
                kind = _kind(link)
                if name.startswith(names.BRIDGE_PREFIX) and kind == "bridge":
                    alias = parse_alias(link.get("IFLA_IFALIAS"))
                    networks.add(alias.get("net") or name[len(names.BRIDGE_PREFIX) :])
                elif name.startswith(names.VETH_PREFIX) and kind == "veth":
                    endpoints.add(name)
        return Owned(networks=frozenset(networks), endpoints=frozenset(endpoints))

    # -- inside the node -----------------------------------------------------------

    @contextlib.contextmanager
    def _node(self) -> Iterator[Any]:
        """An IPRoute of the node's namespace, this thread inside it meanwhile.

        A netlink refusal comes out as a DriverError that says what was refused.
        """
        where = entered(self.node_netns) if self.node_netns else contextlib.nullcontext()
        try:
            with where, IPRoute() as ipr:
                yield ipr
        except NetlinkError as error:
            raise DriverError(f"the kernel refused: {error}") from error

    def _sync_nft(self, ipr: Any) -> None:
        bridges: list[tuple[str, str, bool]] = []
        for link in ipr.get_links():
            name = link.get("IFLA_IFNAME") or ""
            if not name.startswith(names.BRIDGE_PREFIX) or _kind(link) != "bridge":
                continue
            internal = parse_alias(link.get("IFLA_IFALIAS")).get("internal") == "1"
            for address in ipr.get_addr(index=link["index"], family=socket.AF_INET):
                subnet = ipaddress.IPv4Network(
                    f"{address.get('IFA_ADDRESS')}/{address['prefixlen']}", strict=False
                )
                bridges.append((name, str(subnet), internal))
        script = render_ruleset(sorted(bridges))
        try:
            done = subprocess.run(
                ["nft", "-f", "-"],
                input=script,
                capture_output=True,
                text=True,
                timeout=NFT_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise DriverError(f"nft: {error}") from error
        if done.returncode != 0:
            raise DriverError(f"nft -f failed ({done.returncode}): {done.stderr.strip()}")


def _configure_inside(ipr: Any, ep: EndpointPlan, temp: str, alias: str) -> None:
    """In the sandbox: name, MAC, address, up, default route (idempotent)."""
    index = _lookup(ipr, ep.interface)
    if index is not None:
        found = ipr.get_links(index)[0].get("IFLA_IFALIAS")
        if found != alias:
            raise DriverError(
                f"{ep.interface} already exists in the sandbox and is not this endpoint's"
            )
    else:
        index = _lookup(ipr, temp)
        if index is None:
            raise DriverError(f"the sandbox end of {temp} is missing")
        ipr.link("set", index=index, state="down")
        ipr.link("set", index=index, ifname=ep.interface)
    link = ipr.get_links(index)[0]
    if (link.get("IFLA_ADDRESS") or "").lower() != ep.mac.lower():
        ipr.link("set", index=index, state="down")
        ipr.link("set", index=index, address=ep.mac)
    _ensure_address(ipr, index, ep.address, ep.prefixlen)
    ipr.link("set", index=index, state="up")
    if ep.gateway is not None:
        ipr.route("replace", dst="0.0.0.0/0", gateway=ep.gateway, oif=index)
    else:
        for route in ipr.get_default_routes(family=socket.AF_INET):
            if route.get("RTA_OIF") == index:
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", dst="0.0.0.0/0", oif=index)


def _peer_inside(netns: str, ep: EndpointPlan, temp: str, alias: str) -> bool:
    """Whether the sandbox holds this endpoint's peer (renamed or not yet).

    Raises DriverError if the sandbox has an `eth<index>` that is someone else's
    (an adopted namespace): joining must not touch it, nor make anything first.
    """
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(entered(netns))
        except OSError as error:
            raise DriverError(f"cannot enter the sandbox {netns}: {error}") from error
        inner = stack.enter_context(IPRoute())
        found = False
        for name in (ep.interface, temp):
            index = _lookup(inner, name)
            if index is None:
                continue
            if inner.get_links(index)[0].get("IFLA_IFALIAS") == alias:
                found = True
            elif name == ep.interface:
                raise DriverError(
                    f"{ep.interface} already exists in {netns} and is not this endpoint's"
                )
        return found


def _ensure_address(ipr: Any, index: int, address: str, prefixlen: int) -> None:
    """Exactly `address/prefixlen` as the interface's IPv4 address."""
    present = False
    for entry in ipr.get_addr(index=index, family=socket.AF_INET):
        found, length = entry.get("IFA_ADDRESS"), entry["prefixlen"]
        if found == address and length == prefixlen:
            present = True
        else:
            ipr.addr("del", index=index, address=found, prefixlen=length)
    if not present:
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen)


def _set_ip_forward() -> None:
    # /proc/sys/net is the opening thread's network namespace: the node's here
    with open("/proc/sys/net/ipv4/ip_forward", "w") as knob:
        knob.write("1")


def _lookup(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _require(ipr: Any, name: str) -> int:
    index = _lookup(ipr, name)
    if index is None:
        raise DriverError(f"{name} vanished right after it was made")
    return index


def _kind(link: Any) -> str | None:
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return str(kind) if kind is not None else None


def _ports(ipr: Any, bridge: int) -> list[int]:
    return [
        int(link["index"])
        for link in ipr.get_links()
        if link.get("IFLA_MASTER") == bridge
        and (link.get("IFLA_IFNAME") or "").startswith(names.VETH_PREFIX)
    ]


def _delete_link(ipr: Any, index: int) -> None:
    try:
        ipr.link("del", index=index)
    except NetlinkError as error:
        if error.code != 19:  # ENODEV: gone already (a peer deleted with its pair)
            raise


driver.register(NAME, BridgeDriver)

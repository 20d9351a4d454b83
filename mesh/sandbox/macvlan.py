"""The `macvlan` driver: endpoints on the physical network, each with its own MAC.

Kernel design (docs/networking.md, "The macvlan driver", describes it for users):

* Network: nothing of its own on a node unless it has to be made:
  - the parent (`--opt parent=IFACE`) must exist, except a name `link.vid`
    (e.g. `eth0.10`) whose `link` exists: then it is made as the 802.1q
    sub-interface of `link` with VLAN id `vid`, up, with the alias
    `meshplane net=<id> made=vlan`. Only a parent with that alias is ever
    removed (when its network goes); one the driver did not make is never
    touched, not even set up;
  - on request (`--opt host_shim=ADDRESS`, per node `host_shim@<node>=`), the
    host shim `mpms-<net_id[:8]>`: a macvlan on the parent in the node's
    namespace (mode bridge, vepa on a vepa network), up, with `ADDRESS/32`,
    alias `meshplane net=<id> shim=1`; every endpoint joined on this node gets a
    /32 route through it, so the node reaches its own endpoints, which the
    kernel otherwise keeps from their parent.
  `owned().networks` is what carries such an alias; a network on a parent that
  exists and without a shim leaves nothing in the node and is not reported.
* Endpoint: a macvlan on the parent (the network's mode), made in the node's
  namespace as `mpv<task_id[:8]><index>` (what `owned().endpoints` reports
  while it is still there: a crash between make and move), with the alias
  `meshplane ep=<task_id>/<index> net=<id>`, moved into the sandbox, renamed
  `eth<index>`, given the endpoint's MAC (names.mac_of) and address, up, and
  `default via <gateway>` (the physical router) on the routed endpoint.
  Leaving deletes it inside the sandbox; a sandbox namespace that goes takes
  its macvlans with it. Inside an adopted namespace an `eth<index>` without our
  alias is someone else's, and joining fails instead of touching it.
* No nftables, no NAT, no forwarding in the node: endpoints are hosts of the
  physical segment; what isolates one macvlan network from another is the
  segment (another parent, another VLAN) and its router.

Everything is synchronous and idempotent, and runs in the node's namespace
(`node_netns`, a path; None: the calling thread's own) by `mesh.core.netns`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterator
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from mesh.core.netns import entered
from mesh.sandbox import driver, names
from mesh.sandbox.bridge import endpoint_alias
from mesh.sandbox.driver import DriverError, EndpointPlan, NetworkPlan, Owned
from mesh.sandbox.macvlan_options import HOST_SHIM, MODES, PARENT, mode_of, vlan_parent
from mesh.sandbox.veth import (
    ALIAS_TAG,
    _configure_inside,
    _peer_inside,
    parse_alias,
)
from mesh.sandbox.veth import delete_link as _delete_link
from mesh.sandbox.veth import ensure_address as _ensure_address
from mesh.sandbox.veth import kind as _kind
from mesh.sandbox.veth import lookup as _lookup
from mesh.sandbox.veth import require as _require

NAME = "macvlan"


def vlan_alias(net_id: str) -> str:
    return f"{ALIAS_TAG} net={net_id} made=vlan"


def shim_alias(net_id: str) -> str:
    return f"{ALIAS_TAG} net={net_id} shim=1"


class MacvlanDriver:
    """The macvlan driver (see the module docstring for the kernel design)."""

    name = NAME

    def __init__(self, node_netns: str | None = None) -> None:
        self.node_netns = node_netns

    # -- the Driver interface ------------------------------------------------------

    def create_network(self, net: NetworkPlan) -> None:
        subnet = ipaddress.IPv4Network(net.subnet, strict=False)
        if ipaddress.IPv4Address(net.gateway) not in subnet:
            raise DriverError(f"gateway {net.gateway} of network {net.name} is not in {subnet}")
        parent_name, mode = _parent_of(net), _mode_of(net)
        with self._node() as ipr:
            parent = _lookup(ipr, parent_name)
            if parent is None:
                parent = self._make_vlan(ipr, net, parent_name)
            else:
                made = parse_alias(ipr.get_links(parent)[0].get("IFLA_IFALIAS"))
                if made.get("made") == "vlan":
                    if made.get("net") != net.id:
                        raise DriverError(
                            f"parent {parent_name} was made for network {made.get('net')}; "
                            f"network {net.name} cannot share it"
                        )
                    ipr.link("set", index=parent, state="up")  # ours: repair
            self._sync_shim(ipr, net, parent, mode)

    def delete_network(self, net_id: str) -> None:
        with self._node() as ipr:
            mine = [link for link in ipr.get_links() if _alias(link).get("net") == net_id]
            # the shim first: it sits on the parent that may go next
            for link in sorted(mine, key=lambda link: _alias(link).get("shim") != "1"):
                alias = _alias(link)
                if alias.get("shim") == "1" or alias.get("made") == "vlan":
                    _delete_link(ipr, int(link["index"]))

    def join(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None:
        temp, alias = names.veth_name(ep.task_id, ep.index), endpoint_alias(net.id, ep)
        parent_name, mode = _parent_of(net), _mode_of(net)
        with self._node() as ipr:
            parent = _lookup(ipr, parent_name)
            if parent is None:
                raise DriverError(f"network {net.name}: parent {parent_name} is not on this node")
            inside = _peer_inside(netns, ep, temp, alias)  # also: eth<i> not someone's
            stale = _lookup(ipr, temp)  # left in the node by a crash before the move
            if stale is not None:
                _delete_link(ipr, stale)
            if not inside:
                try:
                    ipr.link("add", ifname=temp, kind="macvlan", link=parent, macvlan_mode=mode)
                except NetlinkError as error:
                    hint = " (passthru: one endpoint per parent)" if mode == "passthru" else ""
                    raise DriverError(
                        f"network {net.name}: cannot make a {mode} macvlan on "
                        f"{parent_name}{hint}: {error}"
                    ) from error
                index = _require(ipr, temp)
                try:
                    ipr.link("set", index=index, ifalias=alias)
                    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        ipr.link("set", index=index, net_ns_fd=fd)
                    finally:
                        os.close(fd)
                except BaseException:
                    _delete_link(ipr, index)
                    raise
            try:
                with entered(netns), IPRoute() as inner:
                    _configure_inside(inner, ep, temp, alias, None)
            except BaseException:
                if not inside:  # a failed join leaves nothing it made
                    _remove_inside(netns, ep, temp, alias)
                raise
            shim = _lookup(ipr, names.shim_name(net.id))
            if shim is not None:
                ipr.route("replace", dst=f"{ep.address}/32", oif=shim)

    def leave(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None:
        temp, alias = names.veth_name(ep.task_id, ep.index), endpoint_alias(net.id, ep)
        with self._node() as ipr:
            stale = _lookup(ipr, temp)
            if stale is not None and _kind(ipr.get_links(stale)[0]) == "macvlan":
                _delete_link(ipr, stale)
            shim = _lookup(ipr, names.shim_name(net.id))
            if shim is not None:
                with contextlib.suppress(NetlinkError):  # absent: nothing to do
                    ipr.route("del", dst=f"{ep.address}/32", oif=shim)
            _remove_inside(netns, ep, temp, alias)

    def owned(self) -> Owned:
        networks: set[str] = set()
        endpoints: set[str] = set()
        with self._node() as ipr:
            for link in ipr.get_links():
                name = link.get("IFLA_IFNAME") or ""
                alias = _alias(link)
                if alias.get("net") and (alias.get("shim") == "1" or alias.get("made") == "vlan"):
                    networks.add(alias["net"])
                elif name.startswith(names.VETH_PREFIX) and _kind(link) == "macvlan":
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

    def _make_vlan(self, ipr: Any, net: NetworkPlan, parent_name: str) -> int:
        vlan = vlan_parent(parent_name)
        if vlan is None:
            raise DriverError(f"network {net.name}: parent {parent_name} is not on this node")
        link_name, vid = vlan
        link = _lookup(ipr, link_name)
        if link is None:
            raise DriverError(
                f"network {net.name}: {link_name}, the link of VLAN {parent_name}, "
                "is not on this node"
            )
        try:
            ipr.link("add", ifname=parent_name, kind="vlan", link=link, vlan_id=vid)
        except NetlinkError as error:
            raise DriverError(
                f"cannot make the 802.1q sub-interface {parent_name} (is the 8021q "
                f"module there?): {error}"
            ) from error
        index = _require(ipr, parent_name)
        try:
            ipr.link("set", index=index, ifalias=vlan_alias(net.id), state="up")
        except BaseException:
            _delete_link(ipr, index)
            raise
        return index

    def _sync_shim(self, ipr: Any, net: NetworkPlan, parent: int, mode: str) -> None:
        shim_name, address = names.shim_name(net.id), net.options.get(HOST_SHIM)
        index = _lookup(ipr, shim_name)
        if index is not None:
            link = ipr.get_links(index)[0]
            if address is None or _kind(link) != "macvlan" or link.get("IFLA_LINK") != parent:
                _delete_link(ipr, index)  # not asked for, or on another parent: anew
                index = None
        if address is None:
            return
        if mode == "passthru":
            raise DriverError("passthru gives the parent to one endpoint: no host_shim beside it")
        if index is None:
            shim_mode = "vepa" if mode == "vepa" else "bridge"
            ipr.link("add", ifname=shim_name, kind="macvlan", link=parent, macvlan_mode=shim_mode)
            index = _require(ipr, shim_name)
        ipr.link(
            "set",
            index=index,
            ifalias=shim_alias(net.id),
            address=names.mac_of(address),
            state="up",
        )
        _ensure_address(ipr, index, address, 32)


def _parent_of(net: NetworkPlan) -> str:
    parent = net.options.get(PARENT)
    if not parent:
        raise DriverError(f"macvlan network {net.name} has no parent on this node (--opt parent=)")
    return parent


def _mode_of(net: NetworkPlan) -> str:
    mode = mode_of(net.options)
    if mode not in MODES:
        raise DriverError(f"network {net.name}: macvlan_mode {mode!r} is not one of {MODES}")
    return mode


def _alias(link: Any) -> dict[str, str]:
    return parse_alias(link.get("IFLA_IFALIAS"))


def _remove_inside(netns: str, ep: EndpointPlan, temp: str, alias: str) -> None:
    """Delete this endpoint's macvlan in the sandbox (renamed or not); only ours."""
    try:
        with entered(netns), IPRoute() as inner:
            for name in (ep.interface, temp):
                index = _lookup(inner, name)
                if index is not None and inner.get_links(index)[0].get("IFLA_IFALIAS") == alias:
                    _delete_link(inner, index)
    except OSError:  # the sandbox is gone, and its macvlans with it
        return


driver.register(NAME, MacvlanDriver)

"""Endpoints as veth pairs on a Linux bridge: what the bridge and overlay drivers share.

An endpoint is a veth pair: the host side `mpv<task_id[:8]><index>` a port of
the network's bridge, up; the peer made as `mpt<task_id[:8]><index>`, moved
into the sandbox and renamed `eth<index>` there, with the endpoint's MAC and
address, up; the endpoint that carries the default route gets `default via
<gateway>` (the plan's). Both ends carry the driver's endpoint alias: inside
an adopted namespace an `eth<index>` without it is someone else's, and joining
fails instead of touching it. The host side is made a port of its bridge in
the same netlink request that makes it, so from its first moment the kernel
says whose it is (`owned()` of each driver goes by the master or the alias).
Leaving deletes the host side (the kernel removes the peer with it), so
exactly what was added goes.

Also here: the netlink helpers both drivers use, and `node()`, an IPRoute of
the node's namespace whose refusals come out as DriverError.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from mesh.core.netns import entered
from mesh.sandbox import names
from mesh.sandbox.driver import DriverError, EndpointPlan

TEMP_PREFIX = "mpt"  # the sandbox end of a veth until it is moved and renamed
ALIAS_TAG = "meshplane"


# pyroute2 is imported on first use: it costs ~10 MB, and an agent without sandboxes
# never needs it (nothing here runs then).
def _iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _netlink_error() -> type[Exception]:
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError  # type: ignore[no-any-return]


def parse_alias(alias: str | None) -> dict[str, str]:
    """`meshplane k=v k=v` -> {k: v}; anything else -> {}."""
    words = (alias or "").split()
    if not words or words[0] != ALIAS_TAG:
        return {}
    return dict(word.split("=", 1) for word in words[1:] if "=" in word)


def temp_name(ep: EndpointPlan) -> str:
    return f"{TEMP_PREFIX}{ep.task_id[:8]}{ep.index:x}"


@contextlib.contextmanager
def node(node_netns: str | None) -> Iterator[Any]:
    """An IPRoute of the node's namespace (a path; None: the calling thread's own),
    this thread inside it meanwhile. A netlink refusal comes out as a DriverError
    that says what was refused."""
    where = entered(node_netns) if node_netns else contextlib.nullcontext()
    try:
        with where, _iproute() as ipr:
            yield ipr
    except _netlink_error() as error:
        raise DriverError(f"the kernel refused: {error}") from error


def join(
    ipr: Any,
    bridge: int,
    ep: EndpointPlan,
    netns: str,
    alias: str,
    *,
    isolated: bool,
    mtu: int | None = None,
) -> None:
    """Make (or repair) the endpoint's veth on `bridge` (an index in `ipr`'s namespace)
    and its end inside the sandbox at path `netns`. A failed join leaves nothing it made."""
    host, temp = names.veth_name(ep.task_id, ep.index), temp_name(ep)
    peer_inside = _peer_inside(netns, ep, temp, alias)  # also: eth<i> not someone's
    index = lookup(ipr, host)
    if index is not None and lookup(ipr, temp) is None and not peer_inside:
        delete_link(ipr, index)  # its peer went elsewhere: make it anew
        index = None
    made = index is None
    sizes = {} if mtu is None else {"mtu": mtu}
    try:
        if index is None:
            stale = lookup(ipr, temp)
            if stale is not None:
                delete_link(ipr, stale)
            ipr.link(
                "add",
                ifname=host,
                kind="veth",
                peer={"ifname": temp, **sizes},
                master=bridge,
                **sizes,
            )
            index = require(ipr, host)
        ipr.link("set", index=index, ifalias=alias, master=bridge, state="up", **sizes)
        ipr.brport("set", index=index, isolated=int(isolated))
        peer = lookup(ipr, temp)
        if peer is not None:
            ipr.link("set", index=peer, ifalias=alias)
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ipr.link("set", index=peer, net_ns_fd=fd)
            finally:
                os.close(fd)
        with entered(netns), _iproute() as inner:
            _configure_inside(inner, ep, temp, alias, mtu)
    except BaseException:
        if made and index is not None:
            delete_link(ipr, index)
        raise


def leave(ipr: Any, ep: EndpointPlan) -> None:
    """Delete the endpoint's host side (the kernel takes the peer with it)."""
    for name in (names.veth_name(ep.task_id, ep.index), temp_name(ep)):
        index = lookup(ipr, name)
        if index is not None:
            delete_link(ipr, index)
    # A peer left inside under its temporary name (a crash between the move and
    # the rename) lost its host side above and went with it: nothing else to do.


def _configure_inside(ipr: Any, ep: EndpointPlan, temp: str, alias: str, mtu: int | None) -> None:
    """In the sandbox: name, MAC, MTU, address, up, default route (idempotent)."""
    index = lookup(ipr, ep.interface)
    if index is not None:
        found = ipr.get_links(index)[0].get("IFLA_IFALIAS")
        if found != alias:
            raise DriverError(
                f"{ep.interface} already exists in the sandbox and is not this endpoint's"
            )
    else:
        index = lookup(ipr, temp)
        if index is None:
            raise DriverError(f"the sandbox end of {temp} is missing")
        ipr.link("set", index=index, state="down")
        ipr.link("set", index=index, ifname=ep.interface)
    link = ipr.get_links(index)[0]
    if (link.get("IFLA_ADDRESS") or "").lower() != ep.mac.lower():
        ipr.link("set", index=index, state="down")
        ipr.link("set", index=index, address=ep.mac)
    if mtu is not None and link.get("IFLA_MTU") != mtu:
        ipr.link("set", index=index, mtu=mtu)
    ensure_address(ipr, index, ep.address, ep.prefixlen)
    ipr.link("set", index=index, state="up")
    if ep.gateway is not None:
        ipr.route("replace", dst="0.0.0.0/0", gateway=ep.gateway, oif=index)
    else:
        for route in ipr.get_default_routes(family=socket.AF_INET):
            if route.get("RTA_OIF") == index:
                with contextlib.suppress(_netlink_error()):
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
        inner = stack.enter_context(_iproute())
        found = False
        for name in (ep.interface, temp):
            index = lookup(inner, name)
            if index is None:
                continue
            if inner.get_links(index)[0].get("IFLA_IFALIAS") == alias:
                found = True
            elif name == ep.interface:
                raise DriverError(
                    f"{ep.interface} already exists in {netns} and is not this endpoint's"
                )
        return found


# -- netlink helpers ------------------------------------------------------------------


def ensure_address(ipr: Any, index: int, address: str, prefixlen: int) -> None:
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


def set_ip_forward() -> None:
    # /proc/sys/net is the opening thread's network namespace: the node's here
    with open("/proc/sys/net/ipv4/ip_forward", "w") as knob:
        knob.write("1")


def lookup(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def network_bridge(ipr: Any, name: str, network: str) -> int:
    """The index of a network's bridge `name`, which a join needs made first."""
    index = lookup(ipr, name)
    if index is None:
        raise DriverError(f"network {network} has no bridge on this node yet")
    return index


def require(ipr: Any, name: str) -> int:
    index = lookup(ipr, name)
    if index is None:
        raise DriverError(f"{name} vanished right after it was made")
    return index


def kind(link: Any) -> str | None:
    found = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return str(found) if found is not None else None


def ports(ipr: Any, bridge: int) -> list[int]:
    """The endpoints' veths on `bridge` (not any other port it has)."""
    return [
        int(link["index"])
        for link in ipr.get_links()
        if link.get("IFLA_MASTER") == bridge
        and (link.get("IFLA_IFNAME") or "").startswith(names.VETH_PREFIX)
    ]


def endpoints_of(
    links: Iterable[Any], bridges: Collection[int], claims: Callable[[Any], bool]
) -> set[str]:
    """A driver's host-side veths among `links`: those on one of its `bridges` (indexes),
    and those off them that it `claims` (by alias: one detached from its bridge)."""
    return {
        link.get("IFLA_IFNAME")
        for link in links
        if (link.get("IFLA_IFNAME") or "").startswith(names.VETH_PREFIX)
        and kind(link) == "veth"
        and (link.get("IFLA_MASTER") in bridges or claims(link))
    }


def delete_link(ipr: Any, index: int) -> None:
    try:
        ipr.link("del", index=index)
    except _netlink_error() as error:
        if (
            getattr(error, "code", None) != 19
        ):  # ENODEV: gone already (a peer deleted with its pair)
            raise

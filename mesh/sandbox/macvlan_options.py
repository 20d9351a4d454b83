"""The macvlan driver's network options: checked once, read per node (sans-IO).

A macvlan network is served by every node (scope swarm), but some of what it
needs differs from node to node: the parent interface may be named otherwise,
each node hands out endpoint addresses from its own slice of the subnet (so two
nodes never give out one address, whatever gossip has or has not brought in
yet), and the host shim needs an address per node. Such an option is given per
node as `key@<node>`; on that node it stands for `key` (and wins over a plain
`key`), on the others it is ignored:

    parent=IFACE             the parent interface (required, here or per node);
                             `name.vid` (e.g. eth0.10) is an 802.1q sub-interface
                             of `name`, made when missing
    macvlan_mode=MODE        bridge (default) | private | vepa | passthru
    ip_range@NODE=CIDR       the addresses that node's endpoints get (disjoint slices)
    host_shim=ADDRESS        a macvlan shim on the parent in the node's namespace, with
                             this address, through which the node reaches its own
                             endpoints (the kernel keeps a parent from reaching its
                             macvlan children); per node when several nodes want one

Errors are `ValueError`s whose text is meant for the API caller.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network

PARENT, MODE, IP_RANGE, HOST_SHIM = "parent", "macvlan_mode", "ip_range", "host_shim"
MODES = ("bridge", "private", "vepa", "passthru")
DEFAULT_MODE = "bridge"
#: keys that may be given for one node as key@node
PER_NODE = frozenset({PARENT, IP_RANGE, HOST_SHIM})
KNOWN = frozenset({PARENT, MODE, HOST_SHIM})  # plain keys; ip_range only per node
IFNAME_MAX = 15
_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_VLAN = re.compile(r"^(?P<link>[A-Za-z0-9_:-][A-Za-z0-9_.:-]*)\.(?P<vid>[0-9]{1,4})$")


def split_key(key: str) -> tuple[str, str | None]:
    """`key@node` -> (key, node); `key` -> (key, None)."""
    base, at, node = key.partition("@")
    return (base, node) if at else (base, None)


def for_node(options: Mapping[str, str], node: str) -> dict[str, str]:
    """The options as `node` reads them: `key@node` stands for `key` there and wins."""
    plain = {k: v for k, v in options.items() if "@" not in k}
    mine = {split_key(k)[0]: v for k, v in options.items() if split_key(k)[1] == node}
    return {**plain, **mine}


def vlan_parent(name: str) -> tuple[str, int] | None:
    """`eth0.10` -> ("eth0", 10): an 802.1q sub-interface name; anything else -> None."""
    found = _VLAN.match(name)
    if found is None:
        return None
    vid = int(found["vid"])
    return (found["link"], vid) if 1 <= vid <= 4094 else None


def mode_of(options: Mapping[str, str]) -> str:
    return options.get(MODE, DEFAULT_MODE)


def node_range(options: Mapping[str, str], node: str) -> IPv4Network | None:
    """This node's slice of the addresses, if the network gives per-node slices."""
    text = options.get(f"{IP_RANGE}@{node}")
    return None if text is None else IPv4Network(text)


def has_node_ranges(options: Mapping[str, str]) -> bool:
    return any(split_key(k)[0] == IP_RANGE for k in options)


def shim_addresses(options: Mapping[str, str]) -> list[IPv4Address]:
    """Every node's host-shim address: reserved, never an endpoint's."""
    return [IPv4Address(v) for k, v in options.items() if split_key(k)[0] == HOST_SHIM]


def check(
    options: Mapping[str, str],
    subnet: IPv4Network,
    gateway: IPv4Address,
    *,
    internal: bool,
    ip_range: IPv4Network | None,
    reserved: Iterable[IPv4Address] = (),
) -> None:
    """Refuse options a macvlan network cannot work with (ValueError says which)."""
    if internal:
        raise ValueError(
            "a macvlan network is on the physical network: --internal is not supported"
        )
    for key in options:
        base, node = split_key(key)
        if node == "" or (node is not None and base not in PER_NODE):
            raise ValueError(f"option {key!r}: only {', '.join(sorted(PER_NODE))} take @<node>")
        if node is None and base not in KNOWN:
            hint = " (per node: ip_range@<node>=CIDR)" if base == IP_RANGE else ""
            raise ValueError(
                f"unknown macvlan option {key!r}{hint}; known: parent, macvlan_mode, host_shim"
            )
    parents = {k: v for k, v in options.items() if split_key(k)[0] == PARENT}
    if not parents:
        raise ValueError("a macvlan network needs --opt parent=IFACE (e.g. eth0 or eth0.10)")
    for key, name in parents.items():
        if not _IFNAME.match(name) or name in (".", ".."):
            raise ValueError(f"option {key}: {name!r} is not an interface name")
        if name == "lo":
            raise ValueError(f"option {key}: the loopback cannot be a macvlan parent")
    mode = mode_of(options)
    if mode not in MODES:
        raise ValueError(f"macvlan_mode {mode!r} is not one of {', '.join(MODES)}")
    slices: list[tuple[str, IPv4Network]] = []
    for key, text in options.items():
        if split_key(key)[0] != IP_RANGE:
            continue
        try:
            part = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise ValueError(f"option {key}: {text!r} is not a CIDR: {exc}") from None
        if not isinstance(part, IPv4Network) or not part.subnet_of(subnet):
            raise ValueError(f"option {key}: {text} is not inside subnet {subnet}")
        if ip_range is not None and not part.subnet_of(ip_range):
            raise ValueError(f"option {key}: {text} is not inside the ip_range {ip_range}")
        for other_key, other in slices:
            if part.overlaps(other):
                raise ValueError(f"option {key}: {part} overlaps {other_key} ({other})")
        slices.append((key, part))
    taken = {gateway, *reserved}
    for key, text in options.items():
        if split_key(key)[0] != HOST_SHIM:
            continue
        if mode == "passthru":
            raise ValueError("passthru gives the parent to one endpoint: no host_shim beside it")
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"option {key}: {text!r} is not an IPv4 address") from None
        if (
            not isinstance(address, IPv4Address)
            or address not in subnet
            or address in (subnet.network_address, subnet.broadcast_address)
        ):
            raise ValueError(f"option {key}: {text} is not a host address of {subnet}")
        if address in taken:
            raise ValueError(f"option {key}: {address} is the gateway, an aux or another shim")
        taken.add(address)

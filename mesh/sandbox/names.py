"""The names of the kernel objects the agent owns (docs/networking.md, "Names").

Every object the agent makes carries one of these names, so reconciliation and
cleanup touch nothing else: a sandbox namespace is `mp-<node_id>-<task_id>`
(the node id keeps two agents on one host, or two tests, apart), a bridge is
`mpbr-<net_id[:8]>`, an overlay network's bridge `mpob-<net_id[:8]>` and its VXLAN
device `mpvx-<net_id[:8]>`, a host-side veth is `mpv<task_id[:8]><index>` (a macvlan
endpoint has that name in the node's namespace until it is moved into its
sandbox), a macvlan network's host shim `mpms-<net_id[:8]>`. Linux
limits interface names to 15 characters (IFNAMSIZ - 1); these stay within it.
"""

from __future__ import annotations

import hashlib
import ipaddress

NETNS_DIR = "/run/netns"
BRIDGE_PREFIX = "mpbr-"
OVERLAY_BRIDGE_PREFIX = "mpob-"
VXLAN_PREFIX = "mpvx-"
VETH_PREFIX = "mpv"
SHIM_PREFIX = "mpms-"  # a macvlan network's host shim
IFNAME_MAX = 15
BRIDGE_TABLE = "meshplane_net"  # family inet, in the node's namespace
SANDBOX_LB_TABLE = "meshplane_sbx"  # family ip, inside a sandbox
ESP_TABLE = "meshplane_esp"  # family inet, in the node's namespace: encrypted overlays
MAX_ENDPOINTS = 16  # the endpoint index is one hex digit


def node_id(node_name: str) -> str:
    """6 lower-case hex characters of sha256(node name)."""
    return hashlib.sha256(node_name.encode()).hexdigest()[:6]


def netns_prefix(node_name: str) -> str:
    """The prefix of every sandbox namespace this node's agent owns."""
    return f"mp-{node_id(node_name)}-"


def netns_name(node_name: str, task_id: str) -> str:
    """The name (under /run/netns) of a task's own sandbox namespace."""
    return f"{netns_prefix(node_name)}{task_id}"


def netns_path(name: str) -> str:
    """The file of a named namespace: what setns and `nsenter --net=` take."""
    return f"{NETNS_DIR}/{name}"


def bridge_name(net_id: str) -> str:
    """The Linux bridge of a network on this node."""
    return f"{BRIDGE_PREFIX}{net_id[:8]}"


def shim_name(net_id: str) -> str:
    """The macvlan host shim of a network on this node (made on request)."""
    return f"{SHIM_PREFIX}{net_id[:8]}"


def overlay_bridge_name(net_id: str) -> str:
    """The Linux bridge of an overlay network on this node (its endpoints and VXLAN)."""
    return f"{OVERLAY_BRIDGE_PREFIX}{net_id[:8]}"


def vxlan_name(net_id: str) -> str:
    """The VXLAN device of an overlay network on this node (a port of its bridge)."""
    return f"{VXLAN_PREFIX}{net_id[:8]}"


def veth_name(task_id: str, index: int) -> str:
    """The host-side veth of a task's endpoint number `index` (0-15)."""
    if not 0 <= index < MAX_ENDPOINTS:
        raise ValueError(f"endpoint index {index} is out of range 0-{MAX_ENDPOINTS - 1}")
    return f"{VETH_PREFIX}{task_id[:8]}{index:x}"


def sandbox_interface(index: int) -> str:
    """The endpoint's interface inside the sandbox."""
    return f"eth{index}"


def mac_of(address: str) -> str:
    """An endpoint's MAC: 02:42 then the 4 bytes of its IPv4 address (as Docker)."""
    packed = ipaddress.IPv4Address(address).packed
    return "02:42:" + ":".join(f"{byte:02x}" for byte in packed)

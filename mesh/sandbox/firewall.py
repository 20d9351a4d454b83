"""The node's nftables table for its networks' bridges (`inet meshplane_net`).

One table serves every bridge the agent makes, of the `bridge` driver
(`mpbr-*`) and of the `overlay` driver (`mpob-*`) alike. It is rewritten whole
(atomically, `nft -f`) from the bridges that exist in the kernel whenever a
network is made or removed, so whichever driver writes it, it comes out the
same, and nothing but the kernel is its memory:

- forward: a packet from one of our bridges to another is dropped (isolation
  between networks); an internal network's bridge forwards nothing in or out;
- postrouting (nat): traffic from a non-internal network's subnet leaving by
  any other interface is masqueraded; traffic entering an overlay network
  from outside its subnet (the routing mesh's DNAT of a published port or a
  VIP to a task, maybe on another node) is masqueraded to this node's own
  address on it, so the task's answer comes back through this node, which
  holds the connection's NAT, and not out of the task's own node.

Traffic between endpoints of one bridge (on an overlay, also to and from its
VXLAN port) is switched, not routed, so it never meets these rules.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
from typing import Any

from mesh.sandbox import names
from mesh.sandbox.driver import DriverError
from mesh.sandbox.veth import kind, parse_alias

NFT_TIMEOUT = 30.0
BRIDGE_PREFIXES = (names.BRIDGE_PREFIX, names.OVERLAY_BRIDGE_PREFIX)


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
        for prefix in BRIDGE_PREFIXES:
            lines.append(f'    iifname "{bridge}" oifname "{prefix}*" oifname != "{bridge}" drop')
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
        if bridge.startswith(names.OVERLAY_BRIDGE_PREFIX):
            lines.append(f'    oifname "{bridge}" ip saddr != {subnet} masquerade')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def sync(ipr: Any) -> None:
    """Rewrite the table from the bridges in `ipr`'s namespace (this thread's, for nft)."""
    bridges: list[tuple[str, str, bool]] = []
    for link in ipr.get_links():
        name = link.get("IFLA_IFNAME") or ""
        if not name.startswith(BRIDGE_PREFIXES) or kind(link) != "bridge":
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

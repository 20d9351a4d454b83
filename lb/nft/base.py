"""The fixed part of the backend's table: dispatch maps and the hooked chains.

- `prerouting` (nat, dstnat) and `output` (nat, -100): a packet to a VIP:port
  in `vips`, or to any local address (`fib daddr type local`) on a port in
  `published`, jumps to its service chain, which DNATs it to a real. Only the
  first packet of a connection sees a nat chain; conntrack carries the rest,
  which is why a change to the maps never moves an established flow.
  A packet to an address:port that is itself a real of some service (the set
  `endpoints`) is left alone: a task on its node's address whose port equals
  the published port would otherwise be balanced a second time at its own
  node, bouncing flows between nodes.
- The masquerade rule. A service chain sets one packet-mark bit on the first
  packet of each flow it DNATs ("ours"), so the rules below never touch flows
  that other software DNATed. Postrouting (nat, srcnat) masquerades a marked
  packet leaving by any interface but `lo`, and clears the bit; before that,
  `forward` (filter) clears the bit of a forwarded flow whose real is NOT
  routed out of the interface the client came in on
  (`fib daddr . iif oif missing`).
  So: a flow from outside to a real routed out of the client's own interface
  is masqueraded — the real would answer the client directly, bypassing this
  node's un-DNAT: the routing mesh's cross-node case (client and the other
  node's task on one network) and the hairpin (a task calling its own service).
  A flow to a real routed elsewhere (a task behind this node, whose gateway is
  this node) keeps the client's address: Swarm's most common complaint is that
  ingress loses it. A flow this node's own processes make to a real elsewhere
  is masqueraded (their source may be an address the real cannot route back
  to, such as a VIP route's, or 127.0.0.1). A flow to a local real is never
  masqueraded (it does not leave by postrouting, or leaves by `lo`).
- `guard` (filter, raw priority), only with `localhost`: a published port
  reached at 127.0.0.1 from the node itself DNATs to a real elsewhere, which the
  kernel allows only with `route_localnet=1` (the masqueraded reply comes back
  un-NATed to 127.0.0.1 on a real interface). That setting also lets packets
  from outside address the node's loopback services (CVE-2020-8558, which hit
  kube-proxy), so the guard drops any packet that arrives on another interface
  than `lo` with a 127.0.0.0/8 source or destination, before conntrack sees it.
  Its rule's comment keeps the `route_localnet` value found before the first
  start, so that `close()` can put it back even after a crash and restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lb.nft.marks import DEFAULT_FWMARK

#: The packet-mark bit the forward chain uses to tell postrouting "masquerade
#: this one". Set on a flow's first packet only and cleared before it leaves.
#: `--fwmark` chooses another (lb/nft/marks.py: why this one, and the clash check).
DEFAULT_MASQUERADE_MARK = DEFAULT_FWMARK


LOCALNET_COMMENT = "meshplane route_localnet was"


def base_commands(
    table: str, mark: int = DEFAULT_MASQUERADE_MARK, *, localnet_was: str | None = None
) -> list[str]:
    """Create the fixed objects if missing and (re)write their rules, as one transaction.

    `add` of an object that exists is a no-op, so this is safe over a leftover
    table; the hooked chains are flushed and refilled in the same transaction,
    so no packet sees them empty, and no service object is touched.
    """
    t = table
    dispatch = [
        "ip daddr . meta l4proto . th dport vmap @vips",
        "ip daddr . meta l4proto . th dport @endpoints return",
        "fib daddr type local meta l4proto . th dport vmap @published",
    ]
    keep = 0xFFFFFFFF ^ mark
    commands = [
        f"add table ip {t}",
        f"add map ip {t} vips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}",
        f"add map ip {t} published {{ type inet_proto . inet_service : verdict ; }}",
        f"add set ip {t} endpoints {{ type ipv4_addr . inet_proto . inet_service ; }}",
        f"add chain ip {t} prerouting {{ type nat hook prerouting priority dstnat ; "
        "policy accept ; }",
        f"add chain ip {t} output {{ type nat hook output priority -100 ; policy accept ; }}",
        f"add chain ip {t} forward {{ type filter hook forward priority filter ; "
        "policy accept ; }",
        f"add chain ip {t} postrouting {{ type nat hook postrouting priority srcnat ; "
        "policy accept ; }",
        f"add chain ip {t} guard {{ type filter hook prerouting priority raw ; policy accept ; }}",
        f"flush chain ip {t} guard",
    ]
    if localnet_was is not None:
        commands += [
            f'add rule ip {t} guard iif != "lo" ip daddr 127.0.0.0/8 drop '
            f'comment "{LOCALNET_COMMENT} {int(localnet_was)}"',
            f'add rule ip {t} guard iif != "lo" ip saddr 127.0.0.0/8 drop',
        ]
    for chain in ("prerouting", "output"):
        commands.append(f"flush chain ip {t} {chain}")
        commands += [f"add rule ip {t} {chain} {rule}" for rule in dispatch]
    ours = f"meta mark & {mark:#x} == {mark:#x}"
    commands += [
        f"flush chain ip {t} forward",
        f"add rule ip {t} forward {ours} fib daddr . iif oif missing "
        f"meta mark set meta mark & {keep:#x}",
        f"flush chain ip {t} postrouting",
        f'add rule ip {t} postrouting {ours} oif != "lo" '
        f"meta mark set meta mark & {keep:#x} masquerade",
    ]
    return commands


def localnet_was(table: str, listing: Mapping[str, Any] | None) -> str | None:
    """The `route_localnet` value a leftover table recorded before it changed it."""
    for item in (listing or {}).get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if isinstance(rule, dict) and rule.get("table") == table and rule.get("chain") == "guard":
            comment = str(rule.get("comment", ""))
            if comment.startswith(LOCALNET_COMMENT):
                value = comment[len(LOCALNET_COMMENT) :].strip()
                return value if value.isascii() and value.isdigit() else None
    return None


def sandbox_base_commands(table: str) -> list[str]:
    """The fixed objects of a sandbox's table (`lb/sandbox.py`), as one transaction.

    Inside a sandbox only the connections its own processes make are balanced,
    so the one hooked chain is nat `output`. No masquerade: the client's source
    is already its endpoint's address on the VIP's network (a VIP is on-link
    there), and the real answers it directly, un-DNATed by the client's own
    conntrack. No guard and no published ports (those are the node's). The maps
    and the set the per-service objects (`lb/nft/layout.py`) write to exist as
    in the node's table, so the same layout and listing code serve both.
    """
    t = table
    return [
        f"add table ip {t}",
        f"add map ip {t} vips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}",
        f"add map ip {t} published {{ type inet_proto . inet_service : verdict ; }}",
        f"add set ip {t} endpoints {{ type ipv4_addr . inet_proto . inet_service ; }}",
        f"add chain ip {t} output {{ type nat hook output priority -100 ; policy accept ; }}",
        f"flush chain ip {t} output",
        f"add rule ip {t} output ip daddr . meta l4proto . th dport vmap @vips",
    ]

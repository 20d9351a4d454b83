"""The `bridge` driver: a Linux bridge per network on its node, a veth per endpoint.

Kernel design (docs/networking.md, "The bridge driver", describes it for users):

* Network: bridge `mpbr-<net_id[:8]>` in the node's namespace, up, with the
  network's gateway address (`gateway/prefixlen`); its interface alias
  (IFLA_IFALIAS) records `meshplane net=<id> internal=<0|1>`, so `owned()` and
  the nftables table are rebuilt from the kernel alone after a restart.
  `net.ipv4.ip_forward=1` in the node's namespace.
* Endpoint: a veth pair on the bridge (`mesh.sandbox.veth`, shared with the
  overlay driver); the host side `mpv<task_id[:8]><index>`, the sandbox side
  `eth<index>`. Both ends carry the alias `meshplane ep=<task_id>/<index>
  net=<id>`. `owned()` reports the veths on an `mpbr-` bridge, and off them
  those another driver does not mark: the overlay driver's veths (same
  prefix, made on an `mpob-` bridge, alias `... driver=overlay`) are never
  this driver's; an unmarked one (a crash before its alias) still is.
* nftables, table `inet meshplane_net` in the node's namespace
  (`mesh.sandbox.firewall`, shared with the overlay driver's bridges), rewritten
  whole from the bridges that exist whenever a network is made or removed:
  isolation between networks, an internal network's bridge forwards nothing
  in or out (no route out; the sandbox also gets no default route through it,
  which the manager decides), masquerade of a non-internal subnet's traffic
  leaving by any other interface.
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

import ipaddress

from mesh.sandbox import driver, firewall, names, veth
from mesh.sandbox.driver import DriverError, EndpointPlan, NetworkPlan, Owned
from mesh.sandbox.firewall import render_ruleset
from mesh.sandbox.veth import ALIAS_TAG, parse_alias, temp_name

__all__ = ["BridgeDriver", "bridge_alias", "endpoint_alias", "render_ruleset", "temp_name"]

NAME = "bridge"


def bridge_alias(net_id: str, internal: bool) -> str:
    return f"{ALIAS_TAG} net={net_id} internal={int(internal)}"


def endpoint_alias(net_id: str, ep: EndpointPlan) -> str:
    return f"{ALIAS_TAG} ep={ep.task_id}/{ep.index} net={net_id}"


def unmarked_or_ours(alias: str | None) -> bool:
    """A veth's alias is `endpoint_alias`'s, or no driver's at all (another driver's
    names itself with `driver=`)."""
    return parse_alias(alias).get("driver", NAME) == NAME


def icc_disabled(net: NetworkPlan) -> bool:
    return net.options.get("icc", "true").strip().lower() in ("false", "0", "no", "off")


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
        with veth.node(self.node_netns) as ipr:
            veth.set_ip_forward()
            index = veth.lookup(ipr, bridge)
            if index is None:
                ipr.link("add", ifname=bridge, kind="bridge")
                index = veth.require(ipr, bridge)
            link = ipr.get_links(index)[0]
            if veth.kind(link) != "bridge":
                raise DriverError(f"{bridge} exists and is not a bridge; remove it")
            # A bridge takes the lowest MAC of its ports unless one is set: the gateway's
            # MAC would change as endpoints come and go, behind the sandboxes' ARP caches.
            ipr.link(
                "set",
                index=index,
                ifalias=bridge_alias(net.id, net.internal),
                address=names.mac_of(str(gateway)),
            )
            veth.ensure_address(ipr, index, str(gateway), subnet.prefixlen)
            ipr.link("set", index=index, state="up")
            isolated = int(icc_disabled(net))
            for port in veth.ports(ipr, index):
                ipr.brport("set", index=port, isolated=isolated)
            firewall.sync(ipr)

    def delete_network(self, net_id: str) -> None:
        bridge = names.bridge_name(net_id)
        with veth.node(self.node_netns) as ipr:
            index = veth.lookup(ipr, bridge)
            if index is not None:
                for port in veth.ports(ipr, index):
                    veth.delete_link(ipr, port)
                veth.delete_link(ipr, index)
            firewall.sync(ipr)

    def join(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None:
        with veth.node(self.node_netns) as ipr:
            bridge = veth.network_bridge(ipr, names.bridge_name(net.id), net.name)
            alias = endpoint_alias(net.id, ep)
            veth.join(ipr, bridge, ep, netns, alias, isolated=icc_disabled(net))

    def leave(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None:
        with veth.node(self.node_netns) as ipr:
            veth.leave(ipr, ep)

    def owned(self) -> Owned:
        with veth.node(self.node_netns) as ipr:
            links = ipr.get_links()
        bridges = {
            link["index"]: link
            for link in links
            if (link.get("IFLA_IFNAME") or "").startswith(names.BRIDGE_PREFIX)
            and veth.kind(link) == "bridge"
        }
        networks = {
            parse_alias(link.get("IFLA_IFALIAS")).get("net")
            or link.get("IFLA_IFNAME")[len(names.BRIDGE_PREFIX) :]
            for link in bridges.values()
        }
        # Off our bridges, a veth with our prefix is ours unless another driver marks
        # it (on its bridge, or by alias): an orphan of a crash before the alias, or
        # one made by hand, is still found, as before the overlay came.
        others = {
            link["index"]
            for link in links
            if (link.get("IFLA_IFNAME") or "").startswith(names.OVERLAY_BRIDGE_PREFIX)
        }
        endpoints = veth.endpoints_of(
            links,
            bridges.keys(),
            lambda link: (
                link.get("IFLA_MASTER") not in others and unmarked_or_ours(link.get("IFLA_IFALIAS"))
            ),
        )
        return Owned(networks=frozenset(networks), endpoints=frozenset(endpoints))


driver.register(NAME, BridgeDriver)

"""What the sandbox manager does, decided from records alone (sans-IO).

The manager's shell (`mesh.sandbox.manager`) keeps the kernel in step with the
state; every decision it takes is made here, from plain values:

- `network_want` / `sandbox_want`: what the state asks of this node's kernel
  (its bridge networks, every macvlan network, and every overlay network once
  this node has its own address there; its tasks' sandboxes with their endpoints
  in order, the default route on the first non-internal network's endpoint: via
  the gateway on a bridge or macvlan network, via this node's own address on an
  overlay);
- `transition`: the jobs one change of a network or a task needs, in order;
- `reconcile`: at start, given what the kernel holds under our prefixes (left by
  an agent killed with -9, or by a reboot that emptied /run/netns): remove what
  the state does not own, create what it owns and the kernel lacks.

Nothing here touches the kernel: the shell runs the jobs, in order, on one thread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mesh.core.model import INGRESS, Network, Task, vni_of
from mesh.sandbox import macvlan_options
from mesh.sandbox.driver import EndpointPlan, NetworkPlan
from mesh.sandbox.names import bridge_name, netns_name, netns_path, veth_name

#: The network drivers that make kernel objects on one node, and so a sandbox's endpoints.
SANDBOX_DRIVERS = frozenset({"bridge", "macvlan", "overlay"})
#: Drivers whose endpoints have no host side in the node: a macvlan lives in its
#: sandbox alone (and goes with it), so `Driver.owned` never lists it there.
NO_HOST_SIDE = frozenset({"macvlan"})
#: Drivers whose networks every node serves (scope swarm) without an address of
#: its own there (an overlay needs one: see `network_want`); a bridge is its node's.
EVERY_NODE = frozenset({"macvlan"})


@dataclass(frozen=True, slots=True)
class NetworkWant:
    """One of this node's driver-backed networks, as its driver needs it."""

    driver: str
    plan: NetworkPlan


@dataclass(frozen=True, slots=True)
class EndpointWant:
    driver: str
    network: NetworkPlan
    endpoint: EndpointPlan

    @property
    def veth(self) -> str:
        """The host side of the endpoint: what `Driver.owned` reports."""
        return veth_name(self.endpoint.task_id, self.endpoint.index)


@dataclass(frozen=True, slots=True)
class SandboxWant:
    """One task's sandbox as the state has it."""

    task_id: str
    #: the path setns opens: /run/netns/<name>, or the adopted namespace's path
    netns: str
    #: our namespace's name under /run/netns; None when adopted (it is not ours)
    name: str | None
    endpoints: tuple[EndpointWant, ...]

    @property
    def adopted(self) -> bool:
        return self.name is None

    @property
    def networks(self) -> tuple[str, ...]:
        """The sandbox's networks in endpoint order: what its DNS and LB serve (not
        ingress: its endpoint there is for the routing mesh, and names no service)."""
        return tuple(e.network.name for e in self.endpoints if e.network.name != INGRESS)

    @property
    def veths(self) -> frozenset[str]:
        """The host sides that `Driver.owned` reports while the sandbox is whole."""
        return frozenset(e.veth for e in self.endpoints if e.driver not in NO_HOST_SIDE)


# -- jobs: what the shell runs, in order -----------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateNetwork:
    want: NetworkWant


@dataclass(frozen=True, slots=True)
class DeleteNetwork:
    driver: str
    net_id: str


@dataclass(frozen=True, slots=True)
class SyncPeers:
    """Make an overlay network's static FDB and neighbour entries this node's peer
    table for it, as it is when the job runs (queued once however many changes)."""

    network: str


@dataclass(frozen=True, slots=True)
class EnsureSandbox:
    """Namespace (made or adopted), resolv.conf, every endpoint joined, DNS and LB
    inside opened; each step idempotent, so it also repairs what is partly there."""

    want: SandboxWant


@dataclass(frozen=True, slots=True)
class Leave:
    """Take one endpoint out of a sandbox that stays (a changed or adopted one)."""

    sandbox: SandboxWant
    endpoint: EndpointWant


@dataclass(frozen=True, slots=True)
class RemoveSandbox:
    """The processes inside our namespace ended (SIGTERM, then SIGKILL), DNS and LB
    inside closed, every endpoint left, our namespace deleted (an adopted one keeps
    everything that was not ours, its processes too)."""

    want: SandboxWant


@dataclass(frozen=True, slots=True)
class DeleteNamespace:
    """An orphan: a namespace with our prefix that no task of the state owns (the
    processes still inside are ended first)."""

    name: str


@dataclass(frozen=True, slots=True)
class DeleteVeth:
    """An orphan: a host-side veth with our prefix that no endpoint of the state owns."""

    name: str


Job = (
    CreateNetwork
    | DeleteNetwork
    | SyncPeers
    | EnsureSandbox
    | Leave
    | RemoveSandbox
    | DeleteNamespace
    | DeleteVeth
)


# -- what the state asks ------------------------------------------------------------------


def network_plan(network: Network, node: str, host_address: str | None = None) -> NetworkPlan:
    """What the network's driver on `node` works from. A macvlan network's per-node
    options (`key@node`) are resolved here: the driver sees `key`; an overlay's VNI
    and this node's own address on it are added."""
    options = dict(network.options)
    if network.driver == "macvlan":
        options = macvlan_options.for_node(options, node)
    overlay = network.driver == "overlay"
    return NetworkPlan(
        id=network.id,
        name=network.name,
        subnet=network.subnet,
        gateway=network.gateway,
        internal=network.internal,
        options=options,
        vni=vni_of(network) if overlay else 0,
        host_address=host_address if overlay else None,
    )


def network_want(
    network: Network, node: str, host_address: str | None = None
) -> NetworkWant | None:
    """The network's driver work on `node`, or None when it has none there (a removed
    network, a bridge network of another node, an overlay this node has no address on
    yet, or whose VNI is not known yet). Every node serves every overlay network (the
    routing mesh and the HRM of any node reach the tasks of every other through it)
    and every macvlan network (scope swarm)."""
    if network.deleted or network.driver not in SANDBOX_DRIVERS:
        return None
    if network.driver == "overlay":
        if host_address is None or vni_of(network) == 0:
            return None
    elif network.driver not in EVERY_NODE and network.node != node:
        return None
    return NetworkWant(network.driver, network_plan(network, node, host_address))


def sandbox_want(
    task: Task,
    node: str,
    networks: Mapping[str, Network],
    host_addresses: Mapping[str, str] | None = None,
) -> SandboxWant | None:
    """The task's sandbox on `node`, or None when it has none here. An endpoint on a
    network this node does not know (cannot happen through the store) is skipped.
    `host_addresses`: this node's own address on each overlay network (its way out
    there: no node holds an overlay's gateway address)."""
    host_addresses = host_addresses or {}
    sandbox = task.sandbox
    if task.deleted or sandbox is None or task.node != node:
        return None
    endpoints: list[EndpointWant] = []
    routed = False
    for index, endpoint in enumerate(sandbox.endpoints):
        network = networks.get(endpoint.network)
        if network is None or network.deleted:
            continue
        host_address = host_addresses.get(network.name)
        way_out = host_address if network.driver == "overlay" else network.gateway
        # The default route leaves by the first network that has a way out (never
        # ingress: it carries the routing mesh's connections in, nothing out).
        gateway = None if routed or network.internal or network.name == INGRESS else way_out
        routed = routed or gateway is not None
        endpoints.append(
            EndpointWant(
                network.driver,
                network_plan(network, node, host_address),
                EndpointPlan(
                    task_id=task.id,
                    index=index,
                    address=endpoint.address,
                    prefixlen=ipaddress.ip_network(network.subnet, strict=False).prefixlen,
                    mac=endpoint.mac,
                    interface=endpoint.interface,
                    gateway=gateway,
                ),
            )
        )
    name = None if sandbox.adopted else netns_name(node, task.id)
    netns = sandbox.netns if name is None else netns_path(name)
    return SandboxWant(task.id, netns, name, tuple(endpoints))


# -- one change ---------------------------------------------------------------------------


def network_transition(before: NetworkWant | None, after: NetworkWant | None) -> list[Job]:
    if before == after:
        return []
    if after is None:
        assert before is not None
        return [DeleteNetwork(before.driver, before.plan.id)]
    # A new network, or one whose plan changed: create is idempotent and brings the
    # bridge to the plan; an overlay's peers are then programmed on it.
    if after.driver == "overlay":
        return [CreateNetwork(after), SyncPeers(after.plan.name)]
    return [CreateNetwork(after)]


def sandbox_transition(before: SandboxWant | None, after: SandboxWant | None) -> list[Job]:
    if before == after:
        return []
    if after is None:
        assert before is not None
        return [RemoveSandbox(before)]
    if before is None:
        return [EnsureSandbox(after)]
    if before.netns != after.netns:
        return [RemoveSandbox(before), EnsureSandbox(after)]
    # Same namespace, other endpoints: leave those that went, then ensure the rest.
    kept = {e.endpoint for e in after.endpoints}
    gone = [Leave(before, e) for e in before.endpoints if e.endpoint not in kept]
    return [*gone, EnsureSandbox(after)]


# -- at start -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    """What the kernel holds under our prefixes."""

    #: network id as each driver reports it (its bridge's id8), by driver
    networks: Mapping[str, frozenset[str]]
    #: host-side veth names, by driver
    veths: Mapping[str, frozenset[str]]
    #: namespace names under /run/netns with this node's prefix
    namespaces: frozenset[str]


@dataclass(frozen=True, slots=True)
class Plan:
    """The start's work, in the order the shell runs it: orphans out first (their
    veths hold on to their bridges), then what the state owns, made or repaired."""

    jobs: tuple[Job, ...]
    #: task ids whose namespace or an endpoint the kernel lacked
    repaired: frozenset[str]
    #: networks the kernel lacked
    created: frozenset[str]

    @property
    def removed(self) -> tuple[DeleteNamespace | DeleteVeth | DeleteNetwork, ...]:
        return tuple(
            j for j in self.jobs if isinstance(j, DeleteNamespace | DeleteVeth | DeleteNetwork)
        )


def _same_network(found_id: str, net_id: str) -> bool:
    """A driver may report a network by the short id its bridge is named with."""
    return bridge_name(found_id) == bridge_name(net_id)


def reconcile(
    networks: Iterable[NetworkWant], sandboxes: Iterable[SandboxWant], found: Found
) -> Plan:
    networks = list(networks)
    sandboxes = list(sandboxes)
    ours_ns = {s.name for s in sandboxes if s.name is not None}
    ours_veths = {e.veth for s in sandboxes for e in s.endpoints}
    jobs: list[Job] = []
    jobs += [DeleteNamespace(n) for n in sorted(found.namespaces - ours_ns)]
    for driver in sorted(found.veths):
        jobs += [DeleteVeth(v) for v in sorted(found.veths[driver] - ours_veths)]
    for driver in sorted(found.networks):
        wanted = [n.plan.id for n in networks if n.driver == driver]
        jobs += [
            DeleteNetwork(driver, found_id)
            for found_id in sorted(found.networks[driver])
            if not any(_same_network(found_id, w) for w in wanted)
        ]
    created = set()
    for net in networks:
        have = found.networks.get(net.driver, frozenset())
        if not any(_same_network(f, net.plan.id) for f in have):
            created.add(net.plan.name)
        # Every network: create is idempotent and puts back what is partly gone.
        jobs.append(CreateNetwork(net))
        if net.driver == "overlay":
            jobs.append(SyncPeers(net.plan.name))
    repaired = set()
    all_veths = frozenset().union(*found.veths.values()) if found.veths else frozenset()
    for sandbox in sandboxes:
        lacking_ns = sandbox.name is not None and sandbox.name not in found.namespaces
        if lacking_ns or not sandbox.veths <= all_veths:
            repaired.add(sandbox.task_id)
        # Every sandbox, repaired or not: its DNS and LB inside are this process's.
        jobs.append(EnsureSandbox(sandbox))
    return Plan(tuple(jobs), frozenset(repaired), frozenset(created))

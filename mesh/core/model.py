"""Typed records of the replicated state: networks, services and tasks.

Every record is a frozen dataclass carrying a `Version`: a Lamport clock plus
the name of the node that wrote it. Two versions of one record are ordered by
(clock, node), so any two nodes that saw the same writes agree on the winner
(last writer wins) without coordination; the gossip layer merges by that rule.
A deleted record stays behind as a tombstone (`deleted=True`) so that a late
copy of the old record cannot resurrect it.

Records are keyed by kind and key: networks and services by name (the name is
what the API, DNS and the CLI address), tasks by id.
"""

from __future__ import annotations

import enum
from _blake2 import blake2b  # hashlib's own, without its load of OpenSSL's libcrypto
from dataclasses import dataclass, field
from typing import Literal, TypeAlias


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """A Lamport timestamp: `clock` first, the writer's node name breaks ties."""

    clock: int
    node: str


class Kind(enum.StrEnum):
    NETWORK = "network"
    SERVICE = "service"
    TASK = "task"
    NODE = "node"


class Health(enum.StrEnum):
    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class TaskState(enum.StrEnum):
    RUNNING = "running"
    #: deregistered: no new traffic; removed once `drain_until` has passed.
    DRAINING = "draining"


Protocol: TypeAlias = Literal["tcp", "udp"]
PublishMode: TypeAlias = Literal["ingress", "host"]
#: A published port's traffic policy (docs/load-balancing.md): `cluster` spreads over every
#: node's tasks (masqueraded where the return path needs it); `local` sends only to this
#: node's own healthy tasks, never masqueraded, so they see the client's address.
TrafficPolicy: TypeAlias = Literal["cluster", "local"]
EndpointMode: TypeAlias = Literal["vip", "dnsrr"]
CheckType: TypeAlias = Literal["http", "tcp", "ttl"]
NetworkDriver: TypeAlias = Literal["overlay", "bridge", "macvlan"]
NetworkScope: TypeAlias = Literal["swarm", "local"]

INGRESS = "ingress"
#: The largest weight a task may have (`mesh task add --weight`, the service's `weights`).
MAX_TASK_WEIGHT = 1000
#: The ingress network's VXLAN id (fixed, as its id is); other overlays count up from
#: the next one (Swarm's range starts at 4096).
INGRESS_VNI = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class Network:
    name: str
    id: str
    driver: str
    subnet: str  # "10.0.1.0/24"
    gateway: str  # first host address of the subnet unless given; never a VIP or endpoint
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    #: "local": only `node` serves it (bridge); "swarm": every node (overlay)
    scope: NetworkScope = "swarm"
    node: str = ""  # bridge: the node that created it, the only one serving it
    internal: bool = False  # no route out of the network
    attachable: bool = False  # ad-hoc sandboxes (`mesh run`) may join it
    ip_range: str | None = None  # sandbox addresses come from here (inside subnet)
    aux_addresses: dict[str, str] = field(default_factory=dict)  # name -> reserved address
    options: dict[str, str] = field(default_factory=dict)  # driver options, e.g. icc=false
    #: overlay: the network's VXLAN id, unique in the cluster (0: none, other drivers,
    #: or a record written before overlays had one; `vni_of` reads it)
    vni: int = 0
    version: Version = Version(0, "")
    deleted: bool = False

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, kw_only=True)
class PortConfig:
    protocol: Protocol
    target_port: int
    published_port: int
    publish_mode: PublishMode = "ingress"
    traffic_policy: TrafficPolicy = "cluster"


@dataclass(frozen=True, slots=True, kw_only=True)
class Vip:
    network: str
    address: str  # no prefix length


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheck:
    """How the owning node checks a task. Durations are in seconds.

    http: GET `path` on the task's `port` (a service target port, mapped to the
    task's actual port) and expect a status in [status_min, status_max].
    tcp: connect to that port. ttl: the task must report in through
    `PUT /v1/tasks/{id}/health` at least every `ttl` seconds.
    A task turns unhealthy after `retries` consecutive failures; failures
    inside `start_period` after registration do not count (as Docker).
    """

    type: CheckType
    port: int | None = None
    path: str = "/"
    status_min: int = 200
    status_max: int = 399
    interval: float = 5.0
    timeout: float = 2.0
    retries: int = 3
    start_period: float = 0.0
    ttl: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    name: str
    id: str
    networks: tuple[str, ...] = ()
    endpoint_mode: EndpointMode = "vip"
    ports: tuple[PortConfig, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    vips: tuple[Vip, ...] = ()
    health_check: HealthCheck | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    version: Version = Version(0, "")
    deleted: bool = False
    #: network -> DNS names the service also answers to, on that network only
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: task id -> weight set through the service (`mesh service update --weight TASK=N`),
    #: which overrides the task's own: a task is written only by its node, a service by any
    weights: dict[str, int] = field(default_factory=dict)

    def weight_of(self, task: Task) -> int:
        """The weight `task` takes new connections with: the service's override, else its own."""
        return self.weights.get(task.id, task.weight)

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """A sandbox's attachment to one network."""

    network: str
    address: str  # no prefix length
    mac: str
    interface: str  # inside the sandbox: eth0, eth1, ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Sandbox:
    """A task's network namespace and its endpoints, one per network of its service."""

    netns: str  # path: /run/netns/mp-<node_id>-<task_id>, or the adopted path
    adopted: bool = False  # the namespace is not ours: only our endpoints are removed
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    id: str
    name: str  # "<service>.<slot>.<id>" unless given
    service: str
    slot: int
    node: str  # the node that registered it, and the only one that changes it
    address: str
    ports: dict[int, int] = field(default_factory=dict)  # target port -> actual port
    state: TaskState = TaskState.RUNNING
    health: Health = Health.STARTING
    health_output: str = ""
    drain_until: float | None = None  # wall clock; set while draining
    created_at: float = 0.0
    updated_at: float = 0.0
    version: Version = Version(0, "")
    deleted: bool = False
    #: a sandboxed task's namespace and endpoints; `address` is its first endpoint's
    sandbox: Sandbox | None = None
    #: its share of new connections under weighted schedulers (0..MAX_TASK_WEIGHT;
    #: 0 drains it); a service's `weights` may override it (`effective_weight`)
    weight: int = 1

    @property
    def key(self) -> str:
        return self.id

    @property
    def addresses(self) -> dict[str, str]:
        """network -> this task's address there (a sandboxed task's endpoints; else empty)."""
        if self.sandbox is None:
            return {}
        return {e.network: e.address for e in self.sandbox.endpoints}

    def address_on(self, network: str) -> str:
        """The address to reach this task on `network`: its sandbox endpoint there, else
        `address` (a task registered with `--address` has one address everywhere)."""
        if self.sandbox is not None:
            for endpoint in self.sandbox.endpoints:
                if endpoint.network == network:
                    return endpoint.address
        return self.address

    def endpoint(self) -> tuple[str, tuple[tuple[int, int], ...]]:
        """What two tasks of one service may not share: address and port map."""
        return endpoint_of(self.address, self.ports)

    def actual_port(self, target_port: int) -> int:
        """The port the task really listens on for a service target port."""
        return self.ports.get(target_port, target_port)


def endpoint_of(address: str, ports: dict[int, int]) -> tuple[str, tuple[tuple[int, int], ...]]:
    """An address and its port map, with `80: 80` dropped: an unmapped port is served as is."""
    return address, tuple(sorted((t, a) for t, a in ports.items() if t != a))


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    """A node's own part of the overlays: its underlay address (the VTEP every other
    node sends its VXLAN packets to) and its address on each overlay network it serves
    (its "load-balancer endpoint", as Swarm's). Written only by that node, so two
    nodes never race on one record; hidden from the views while the node is down."""

    name: str
    vtep: str = ""  # the node's --advertise address
    addresses: dict[str, str] = field(default_factory=dict)  # overlay network -> address
    version: Version = Version(0, "")
    deleted: bool = False

    @property
    def key(self) -> str:
        return self.name


Record: TypeAlias = Network | Service | Task | Node

KIND_OF: dict[type[Record], Kind] = {
    Network: Kind.NETWORK,
    Service: Kind.SERVICE,
    Task: Kind.TASK,
    Node: Kind.NODE,
}


def version_hash(record: Record) -> int:
    """A 128-bit BLAKE2b hash of a record's identity and version (kind, key, Lamport clock,
    writer): the term of the state digest (mesh.digest) that the store keeps up to date."""
    identity = (
        f"{KIND_OF[type(record)].value}\0{record.key}\0"
        f"{record.version.clock}\0{record.version.node}"
    ).encode()
    return int.from_bytes(blake2b(identity, digest_size=16).digest(), "big")


def vni_of(network: Network) -> int:
    """The network's VXLAN id: ingress has its fixed one whatever its record says."""
    return INGRESS_VNI if network.name == INGRESS else network.vni


@dataclass(frozen=True, slots=True)
class Change:
    """One record's transition, as the change feed delivers it.

    `before` is None for a new record; `after.deleted` is True for a removal.
    Views (DNS, LB, HRM) apply changes one by one: they never need a rebuild.
    """

    kind: Kind
    key: str
    before: Record | None
    after: Record

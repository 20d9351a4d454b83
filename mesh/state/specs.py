"""What a caller asks the store for, before the store fills in ids, VIPs and ports.

The API validates the shape of a request into one of these; the store checks
everything that depends on the rest of the state (names in use, unknown
networks, ports taken) and turns it into records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.core.model import (
    EndpointMode,
    HealthCheck,
    NetworkDriver,
    Protocol,
    PublishMode,
    TrafficPolicy,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkSpec:
    name: str
    subnet: str | None = None
    driver: NetworkDriver = "overlay"
    labels: dict[str, str] = field(default_factory=dict)
    gateway: str | None = None  # None: the first host address of the subnet
    ip_range: str | None = None
    aux_addresses: dict[str, str] = field(default_factory=dict)
    internal: bool = False
    attachable: bool | None = None  # None: bridge networks are, others are not
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class PortSpec:
    target_port: int
    published_port: int | None = None  # None: the next free port of 30000-32767
    protocol: Protocol = "tcp"
    publish_mode: PublishMode = "ingress"
    traffic_policy: TrafficPolicy = "cluster"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    name: str
    networks: tuple[str, ...] = ()
    endpoint_mode: EndpointMode = "vip"
    ports: tuple[PortSpec, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    health_check: HealthCheck | None = None
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePatch:
    """Fields to replace; None leaves a field as it is."""

    networks: tuple[str, ...] | None = None
    endpoint_mode: EndpointMode | None = None
    ports: tuple[PortSpec, ...] | None = None
    labels: dict[str, str] | None = None
    health_check: HealthCheck | None = None
    clear_health_check: bool = False
    aliases: dict[str, tuple[str, ...]] | None = None
    #: task id or name -> weight, merged into the service's overrides (None: a task's
    #: override removed, it takes its own weight again)
    weights: dict[str, int | None] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxSpec:
    """A sandboxed task's namespace: None, a new one; a netns name or path, adopt it."""

    netns: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSpec:
    service: str
    address: str | None = None  # None with a sandbox: its first endpoint's address
    ports: dict[int, int] = field(default_factory=dict)
    name: str | None = None
    sandbox: SandboxSpec | None = None
    weight: int = 1

"""The network-driver interface: what every driver (bridge now; overlay and
macvlan next) does to the kernel, and the registry that finds one by name.

A driver is synchronous kernel work, run by the sandbox manager on its one
worker thread, in order. Every method is idempotent (calling it again, or
after a crash half-way, converges on the same kernel state) and touches only
objects named as in `mesh.sandbox.names` (the agent's prefix). `owned()`
reads the kernel, never a memory of its own: after a restart it is how
reconciliation learns what an earlier run left behind.

The one shared contract test suite is tests/netdrv/driver_suite.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


class DriverError(RuntimeError):
    """Kernel work that failed; the message says which object and why."""


@dataclass(frozen=True, slots=True)
class NetworkPlan:
    """What a driver needs of a network (from the state's `Network`)."""

    id: str
    name: str
    subnet: str  # CIDR, e.g. 10.0.1.0/24
    gateway: str  # an address in `subnet`, no prefix length
    internal: bool
    options: Mapping[str, str] = field(default_factory=dict)  # driver options: icc=false
    vni: int = 0  # overlay: the network's VXLAN id
    #: overlay: this node's own address on the network (its "load-balancer endpoint", as in
    #: Swarm); None for other drivers
    host_address: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointPlan:
    """One endpoint of a task on one network (from the task's `Endpoint`)."""

    task_id: str
    index: int  # position among the task's endpoints: eth<index>, veth suffix
    address: str  # no prefix length
    prefixlen: int  # the network's
    mac: str
    interface: str  # inside the sandbox: eth<index>
    gateway: str | None  # set on the endpoint that carries the default route


@dataclass(frozen=True, slots=True)
class Owned:
    """The kernel objects with our prefix that a driver finds on this node."""

    networks: frozenset[str] = frozenset()  # network ids
    endpoints: frozenset[str] = frozenset()  # host-side interface names (names.veth_name)


class Driver(Protocol):
    """One per kind of network. Each method is idempotent."""

    name: str

    def create_network(self, net: NetworkPlan) -> None:
        """Make (or repair) the network's objects on this node."""

    def delete_network(self, net_id: str) -> None:
        """Remove the network's objects on this node (absent: nothing to do)."""

    def join(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None:
        """Put the endpoint into the sandbox at path `netns` (made or repaired)."""

    def leave(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None:
        """Remove the endpoint (and only it) from the sandbox and the node."""

    def owned(self) -> Owned:
        """What exists in the kernel under our names, for reconciliation."""


#: A driver factory takes the node's network namespace: None for the agent's
#: own (production), a path for tests that run each node in a namespace.
DriverFactory = Callable[[str | None], Driver]

_REGISTRY: dict[str, DriverFactory] = {}
#: each registers itself on import
_BUILTIN_MODULES = ("mesh.sandbox.bridge", "mesh.sandbox.overlay")


def register(name: str, factory: DriverFactory) -> None:
    """Make a driver available by name (a driver module calls this on import)."""
    _REGISTRY[name] = factory


def available() -> frozenset[str]:
    """The names of the drivers this agent can make kernel objects with."""
    _load_builtins()
    return frozenset(_REGISTRY)


def create_driver(name: str, node_netns: str | None = None) -> Driver:
    """A driver by its network's `driver` name; KeyError names the unknown one."""
    _load_builtins()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no kernel driver for networks of driver {name!r}") from None
    return factory(node_netns)


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)

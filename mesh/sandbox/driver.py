"""The network driver interface (stand-in of i15-drv's, per spec15)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class NetworkPlan:
    id: str
    name: str
    subnet: str
    gateway: str
    internal: bool
    options: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class EndpointPlan:
    task_id: str
    index: int
    address: str
    prefixlen: int
    mac: str
    interface: str
    gateway: str | None


@dataclass(frozen=True, slots=True)
class Owned:
    networks: frozenset[str] = field(default_factory=frozenset)
    endpoints: frozenset[str] = field(default_factory=frozenset)


class Driver(Protocol):
    name: str

    def create_network(self, net: NetworkPlan) -> None: ...
    def delete_network(self, net_id: str) -> None: ...
    def join(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None: ...
    def leave(self, net: NetworkPlan, ep: EndpointPlan, netns: str) -> None: ...
    def owned(self) -> Owned: ...

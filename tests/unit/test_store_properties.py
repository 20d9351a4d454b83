"""Property tests: any sequence of API-level operations keeps the store's invariants.

Invariants: no VIP is held by two services; IPAM claims exactly the live
VIPs; published ports are unique; every live task's service is live; a
refused operation changes nothing; reloading the records gives the same store.
"""

from __future__ import annotations

import ipaddress
import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mesh.core.model import Task
from mesh.digest import digest_from, digest_of
from mesh.errors import MeshError
from mesh.ipam import Ipam, parse_pool
from mesh.state.specs import NetworkSpec, PortSpec, ServicePatch, ServiceSpec, TaskSpec
from mesh.state.store import Store

NAMES = st.sampled_from(["a", "b", "c", "d"])
NETWORKS = st.lists(st.sampled_from(["n1", "n2", "n3"]), max_size=3, unique=True)
PORTS = st.lists(
    st.builds(
        PortSpec,
        target_port=st.integers(1, 3),
        published_port=st.one_of(st.none(), st.integers(8000, 8003)),
        protocol=st.sampled_from(["tcp", "udp"]),
    ),
    max_size=2,
)
POOL = "127.64.0.0/12"


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = Store("n", Ipam(parse_pool(POOL)), random.Random(0))
        self.store.ensure_ingress()
        self.now = 0.0

    def attempt(self, op) -> None:  # type: ignore[no-untyped-def]
        before = (self.store.clock, list(self.store.all_records()))
        self.now += 1
        try:
            op()
        except MeshError:
            assert (self.store.clock, list(self.store.all_records())) == before

    @rule(
        name=st.sampled_from(["n1", "n2", "n3"]),
        subnet=st.one_of(
            st.none(), st.sampled_from(["127.65.0.0/29", "127.65.0.0/24", "127.64.1.0/24"])
        ),
    )
    def create_network(self, name: str, subnet: str | None) -> None:
        self.attempt(
            lambda: self.store.create_network(NetworkSpec(name=name, subnet=subnet), self.now)
        )

    @rule(name=st.sampled_from(["n1", "n2", "n3"]))
    def remove_network(self, name: str) -> None:
        self.attempt(lambda: self.store.remove_network(name, self.now))

    @rule(name=NAMES, networks=NETWORKS, ports=PORTS, dnsrr=st.booleans())
    def create_service(
        self, name: str, networks: list[str], ports: list[PortSpec], dnsrr: bool
    ) -> None:
        spec = ServiceSpec(
            name=name,
            networks=tuple(networks),
            ports=tuple(ports),
            endpoint_mode="dnsrr" if dnsrr else "vip",
        )
        self.attempt(lambda: self.store.create_service(spec, self.now))

    @rule(name=NAMES, networks=st.one_of(st.none(), NETWORKS), ports=st.one_of(st.none(), PORTS))
    def update_service(
        self, name: str, networks: list[str] | None, ports: list[PortSpec] | None
    ) -> None:
        patch = ServicePatch(
            networks=None if networks is None else tuple(networks),
            ports=None if ports is None else tuple(ports),
        )
        self.attempt(lambda: self.store.update_service(name, patch, self.now))

    @rule(name=NAMES)
    def remove_service(self, name: str) -> None:
        self.attempt(lambda: self.store.remove_service(name, self.now))

    @rule(service=NAMES, last=st.integers(1, 3), port=st.integers(1, 2))
    def add_task(self, service: str, last: int, port: int) -> None:
        spec = TaskSpec(service=service, address=f"127.0.0.{last}", ports={80: port})
        self.attempt(lambda: self.store.add_task(spec, self.now))

    @rule(index=st.integers(0, 10))
    def drain_or_remove_task(self, index: int) -> None:
        tasks = self.store.tasks()
        if tasks:
            chosen = tasks[index % len(tasks)]
            self.attempt(lambda: self.store.drain_task(chosen.id, self.now, 1.0))
            self.attempt(lambda: self.store.remove_task(chosen.id, self.now))

    @invariant()
    def vips_unique_and_claimed(self) -> None:
        seen: set[tuple[str, str]] = set()
        for service in self.store.services():
            for vip in service.vips:
                key = (vip.network, vip.address)
                assert key not in seen
                seen.add(key)
                network = self.store.network(vip.network)
                address = ipaddress.IPv4Address(vip.address)
                assert address in ipaddress.IPv4Network(network.subnet)
                assert str(address) != network.gateway
                assert self.store.ipam.is_claimed(vip.network, address)
        for network in self.store.networks():
            assert self.store.ipam.claimed_count(network.name) == sum(
                1 for n, _ in seen if n == network.name
            )

    @invariant()
    def published_ports_unique(self) -> None:
        published = [(p.protocol, p.published_port) for s in self.store.services() for p in s.ports]
        assert len(published) == len(set(published))

    @invariant()
    def tasks_belong_to_live_services(self) -> None:
        live = {s.name for s in self.store.services()}
        assert all(t.service in live for t in self.store.tasks())

    @invariant()
    def kept_indexes_agree_with_a_scan(self) -> None:
        """What the store keeps with each write is what a scan finds: the digest's XOR,
        the tasks' sorted order, each service's lowest free slot."""
        assert digest_from(self.store.digest_terms()) == digest_of(self.store.all_records())
        tasks = self.store.tasks()
        assert tasks == sorted(tasks, key=lambda t: (t.service, t.slot, t.id))
        assert len(tasks) == sum(
            1 for r in self.store.all_records() if isinstance(r, Task) and not r.deleted
        )
        for service in self.store.services():
            held = {t.slot for t in tasks if t.service == service.name}
            lowest = next(slot for slot in range(1, len(held) + 2) if slot not in held)
            slots = self.store._slots.get(service.name)
            assert (1 if slots is None else slots.lowest_free()) == lowest

    @invariant()
    def reload_is_identical(self) -> None:
        copy = Store("n", Ipam(parse_pool(POOL)))
        copy.load(self.store.all_records(), self.store.clock)
        assert copy.services() == self.store.services()
        assert copy.tasks() == self.store.tasks()
        assert repr(copy.ipam) == repr(self.store.ipam)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)

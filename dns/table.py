"""The names the mesh answers, kept in step with the state: a sans-IO index.

`NameTable` is fed the state's `Change`s one by one (the change feed) and keeps
lower-cased indexes of networks, services and tasks, so a lookup never scans
the state. Every change reports the *owners* it touched (a service name, a
task name, an address, or `ALL` when a network changed): the responder drops
exactly the cached answers filed under those owners, nothing else.

Resolution rules (docs/design.md, "DNS names"; Swarm's in reference §1.2-1.3):

- An asker's view is the network whose subnet holds its source address; any
  other asker (loopback, the host's own addresses) is on the host and sees
  every network. The ingress network carries no names at all.
- A sandbox's listener (127.0.0.11 inside its namespace) has a fixed view:
  the tuple of the sandbox's networks, in its order (`sandbox_view`). A
  service on several of them answers with its VIP on the first one.
- `<service>`: the VIP on the first of the service's networks in the view
  (vip mode), or every healthy task address (dnsrr). `tasks.<service>`: every
  healthy, running task address. `<task name>`: that task's address. A task
  in a sandbox has one address per network: the one on the first network of
  the view that it is on.
- `<alias>` (Service.aliases, per network): a name on that network only: the
  service's VIP there (vip) or its tasks' addresses there (dnsrr).
  `_<port>._<proto>.<service>` SRV: one record per healthy task, its real port.
- `<name>.<network>` restricts the lookup to that network (if in the view).
- PTR: a VIP names its service, a task address its tasks.
- Mesh space (never forwarded, NXDOMAIN on a miss): `tasks.*`, `*.<network>`,
  reverse names inside network subnets, names under the cluster domain.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from mesh.core import net
from mesh.core.ids import IdIndex
from mesh.core.model import (
    INGRESS,
    Change,
    Health,
    Network,
    Record,
    Service,
    Task,
    TaskState,
)

ALL = "*"  # the owner that every cached answer depends on (a network changed)
HOST_VIEW = ""  # the view of an asker outside every network: it sees them all

#: What an asker sees: HOST_VIEW (every network), one network's name (an asker
#: on its subnet), or a sandbox's networks in its order (`sandbox_view`). A view
#: is part of the reply cache's key, so it is hashable and compares by value.
View = str | tuple[str, ...]


def sandbox_view(networks: Iterable[str]) -> tuple[str, ...]:
    """The fixed view of a sandbox on `networks`: lower case, each once, no ingress."""
    return tuple(dict.fromkeys(n.lower() for n in networks if n.lower() != INGRESS))


def scope_of(view: View) -> tuple[str, ...] | None:
    """The networks a view sees, in its order; None: every one (the host)."""
    if isinstance(view, tuple):
        return view
    return None if view == HOST_VIEW else (view,)


@dataclass(frozen=True, slots=True)
class SrvTarget:
    target: str  # a task name
    port: int
    address: str


@dataclass(slots=True)
class Answer:
    """What the table says of a name; the responder turns it into a reply."""

    found: bool  # the name exists (NOERROR, maybe with no record of the asked type)
    owners: set[str] = field(default_factory=set)  # what a cached reply depends on
    addresses: list[str] = field(default_factory=list)  # A records
    shuffle: bool = False  # several peers of equal rank: rotate per query
    ptr: list[str] = field(default_factory=list)  # PTR targets (no trailing dot)
    srv: list[SrvTarget] = field(default_factory=list)
    mesh_space: bool = False  # a miss is NXDOMAIN, never forwarded


class NameTable:
    """Lower-cased indexes of the state, fed changes, answering lookups."""

    def __init__(self, domain: str | None = None) -> None:
        self.domain = domain.lower().strip(".") if domain else None
        self._networks: dict[str, Network] = {}
        self._subnets: list[tuple[ipaddress.IPv4Network, str]] = []
        self._services: dict[str, Service] = {}
        self._tasks: dict[str, Task] = {}  # by id
        self._tasks_by_service: dict[str, set[str]] = {}
        self._tasks_by_name: dict[str, str] = {}
        self._tasks_by_address: IdIndex[str] = IdIndex()
        self._vips: dict[str, tuple[str, str]] = {}  # address -> (service, network)
        self._aliases: dict[str, dict[str, str]] = {}  # alias -> {network: service}

    def __repr__(self) -> str:
        return (
            f"<NameTable networks={len(self._networks)} services={len(self._services)} "
            f"tasks={len(self._tasks)}>"
        )

    # -- feeding --------------------------------------------------------------

    def load(self, records: Iterable[Record]) -> None:
        for record in records:
            self._add(record)

    def apply(self, change: Change) -> set[str]:
        """Take one change; return the owners whose cached answers are now stale."""
        owners: set[str] = set()
        if change.before is not None and not change.before.deleted:
            owners |= self._remove(change.before)
        if not change.after.deleted:
            owners |= self._add(change.after)
        return owners

    def _add(self, record: Record) -> set[str]:
        if record.deleted:
            return set()
        match record:
            case Network():
                self._networks[record.name.lower()] = record
                self._rebuild_subnets()
                return {ALL}
            case Service():
                name = record.name.lower()
                self._services[name] = record
                for vip in record.vips:
                    self._vips[vip.address] = (name, vip.network.lower())
                for network, alias in _aliases_of(record):
                    self._aliases.setdefault(alias, {})[network] = name
                return _service_owners(record)
            case Task():
                self._tasks[record.id] = record
                self._tasks_by_service.setdefault(record.service.lower(), set()).add(record.id)
                self._tasks_by_name[record.name.lower()] = record.id
                for address in _addresses_of(record):
                    self._tasks_by_address.add(address, record.id)
                return {record.service.lower(), record.name.lower(), *_addresses_of(record)}
        return set()

    def _remove(self, record: Record) -> set[str]:
        match record:
            case Network():
                self._networks.pop(record.name.lower(), None)
                self._rebuild_subnets()
                return {ALL}
            case Service():
                name = record.name.lower()
                self._services.pop(name, None)
                for vip in record.vips:
                    self._vips.pop(vip.address, None)
                for network, alias in _aliases_of(record):
                    holders = self._aliases.get(alias, {})
                    if holders.get(network) == name:
                        del holders[network]
                    if not holders:
                        self._aliases.pop(alias, None)
                return _service_owners(record)
            case Task():
                self._tasks.pop(record.id, None)
                self._tasks_by_service.get(record.service.lower(), set()).discard(record.id)
                if self._tasks_by_name.get(record.name.lower()) == record.id:
                    del self._tasks_by_name[record.name.lower()]
                for address in _addresses_of(record):
                    self._tasks_by_address.discard(address, record.id)
                return {record.service.lower(), record.name.lower(), *_addresses_of(record)}
        return set()

    def _rebuild_subnets(self) -> None:
        # Networks change rarely; a rebuild of this short list is the simple way.
        self._subnets = sorted(
            ((ipaddress.IPv4Network(n.subnet), name) for name, n in self._networks.items()),
            key=lambda pair: pair[0].prefixlen,
            reverse=True,
        )

    # -- views ----------------------------------------------------------------

    def view_of(self, source: str) -> str:
        """The network an asker at `source` is on, or HOST_VIEW."""
        try:
            address = ipaddress.IPv4Address(source)
        except ValueError:
            return HOST_VIEW
        if address.is_loopback:
            return HOST_VIEW
        for subnet, name in self._subnets:
            if address in subnet:
                return name
        return HOST_VIEW

    def zone_of(self, qname: str, address: str | None = None) -> str:
        """The mesh zone a name belongs to, lower case without the final dot: the SOA's owner.

        The names the mesh answers have no zone of their own in Swarm, so one
        is chosen per kind, always the name itself or one of its ancestors (a
        resolver files an SOA only there, RFC 2308 §3): the `--dns-domain`
        for names under it; for a reverse name (`address` given), the
        reverse zone of the subnet that holds the address, cut at an octet
        boundary (10.1.0.0/24 -> `0.1.10.in-addr.arpa`); for every other
        name its last label (`tasks.web` -> `web`, `web.front` -> `front`).
        """
        if address is not None:
            ip = ipaddress.IPv4Address(address)
            subnet = next((s for s, _ in self._subnets if ip in s), None)
            if subnet is None:
                return "in-addr.arpa"
            octets = str(subnet.network_address).split(".")[: subnet.prefixlen // 8]
            return ".".join([*reversed(octets), "in-addr", "arpa"])
        name = qname.lower().rstrip(".")
        if self.domain and (name == self.domain or name.endswith(f".{self.domain}")):
            return self.domain
        return name.rsplit(".", 1)[-1]

    def _visible_networks(self, service: Service, view: View) -> list[str]:
        """The service's networks an asker in `view` sees: in the view's order if it has one."""
        nets = [n.lower() for n in service.networks]
        scope = scope_of(view)
        return nets if scope is None else [n for n in scope if n in nets]

    def _sees(self, service: Service, view: View) -> bool:
        scope = scope_of(view)
        return scope is None or any(n.lower() in scope for n in service.networks)

    def _address(self, task: Task, nets: list[str]) -> str:
        """The task's address on the first of `nets` it has one on (a sandbox has several)."""
        if task.sandbox is not None:
            by_network = {e.network.lower(): e.address for e in task.sandbox.endpoints}
            for network in nets:
                if network in by_network:
                    return by_network[network]
        return task.address

    def _addresses(self, tasks: Iterable[Task], nets: list[str]) -> list[str]:
        return _unique(self._address(t, nets) for t in tasks)

    def _healthy_tasks(self, service: str) -> list[Task]:
        found = (self._tasks[i] for i in self._tasks_by_service.get(service, ()))
        return sorted(
            (t for t in found if t.health is Health.HEALTHY and t.state is TaskState.RUNNING),
            key=lambda t: (t.slot, t.id),
        )

    # -- lookups ----------------------------------------------------------------

    def lookup(self, qname: str, view: View) -> Answer:
        """Resolve a forward name (A and SRV data) as an asker in `view` sees it."""
        labels = qname.lower().rstrip(".").split(".")
        mesh_space = False
        if self.domain:
            suffix = self.domain.split(".")
            if labels[-len(suffix) :] == suffix and len(labels) > len(suffix):
                labels = labels[: -len(suffix)]
                mesh_space = True
        answer = self._lookup_labels(labels, view)
        answer.mesh_space = answer.mesh_space or mesh_space
        return answer

    def _lookup_labels(self, labels: list[str], view: View) -> Answer:
        answer = self._lookup_in(labels, view, network=None)
        if answer.found or len(labels) < 2:
            return answer
        network = labels[-1]
        if network in self._networks and network != INGRESS:
            scope = scope_of(view)
            if scope is not None and network not in scope:
                return Answer(found=False, owners={ALL}, mesh_space=True)
            qualified = self._lookup_in(labels[:-1], view, network=network)
            qualified.mesh_space = True
            return qualified
        return answer

    def _lookup_in(self, labels: list[str], view: View, network: str | None) -> Answer:
        if len(labels) == 2 and labels[0] == "tasks":
            return self._tasks_of(labels[1], view, network)
        if len(labels) == 3 and labels[0].startswith("_") and labels[1] in ("_tcp", "_udp"):
            return self._srv(labels[0][1:], labels[1][1:], labels[2], view, network)
        if len(labels) == 1:
            answer = self._service(labels[0], view, network)
            if answer.found:
                return answer
            answer = self._alias(labels[0], view, network)
            if answer.found:
                return answer
        return self._task_name(".".join(labels), view, network)

    def _alias(self, alias: str, view: View, network: str | None) -> Answer:
        """A network alias: a name on its own network only, for askers who see that network.

        The host sees every network; an alias held on several (by different
        services) is answered for the first network by name there.
        """
        holders = self._aliases.get(alias, {})
        scope = scope_of(view)
        if network is not None:
            nets = [network] if scope is None or network in scope else []
        else:
            nets = sorted(holders) if scope is None else list(scope)
        for net_name in nets:
            service = self._services.get(holders.get(net_name, ""))
            if service is None or net_name not in (n.lower() for n in service.networks):
                continue
            name = service.name.lower()
            if service.endpoint_mode == "dnsrr":
                return Answer(
                    found=True,
                    owners={alias, name},
                    shuffle=True,
                    addresses=self._addresses(self._healthy_tasks(name), [net_name]),
                )
            vips = [v.address for v in service.vips if v.network.lower() == net_name]
            return Answer(found=True, owners={alias, name}, addresses=vips[:1])
        return Answer(found=False, owners={alias})

    def _visible_service(self, name: str, view: View, network: str | None) -> Service | None:
        service = self._services.get(name)
        if service is None or not self._sees(service, view):
            return None
        if network is not None and network not in (n.lower() for n in service.networks):
            return None
        return service

    def _service(self, name: str, view: View, network: str | None) -> Answer:
        service = self._visible_service(name, view, network)
        if service is None:
            return Answer(found=False, owners={name})
        nets = [network] if network is not None else self._visible_networks(service, view)
        if service.endpoint_mode == "dnsrr":
            return Answer(
                found=True,
                owners={name},
                shuffle=True,
                addresses=self._addresses(self._healthy_tasks(name), nets),
            )
        by_network = {v.network.lower(): v.address for v in service.vips}
        addresses = [by_network[n] for n in nets if n in by_network][:1]
        return Answer(found=True, owners={name}, addresses=addresses)

    def _tasks_of(self, name: str, view: View, network: str | None) -> Answer:
        service = self._visible_service(name, view, network)
        if service is None:
            return Answer(found=False, owners={name}, mesh_space=True)
        nets = [network] if network is not None else self._visible_networks(service, view)
        return Answer(
            found=True,
            owners={name},
            shuffle=True,
            mesh_space=True,
            addresses=self._addresses(self._healthy_tasks(name), nets),
        )

    def _srv(
        self, port_text: str, protocol: str, name: str, view: View, network: str | None
    ) -> Answer:
        """`_<port>._<proto>.<service>`: one target per healthy task, at its real port.

        `<port>` is a target or published port of the service; a port the
        service does not publish still answers if its tasks map it.
        """
        service = self._visible_service(name, view, network)
        port = net.port_or_none(port_text)
        if service is None or port is None:
            return Answer(found=False, owners={name})
        target = next(
            (
                p.target_port
                for p in service.ports
                if p.protocol == protocol and port in (p.target_port, p.published_port)
            ),
            None,
        )
        tasks = self._healthy_tasks(name)
        if target is None and any(port in t.ports for t in tasks):
            target = port
        if target is None:  # a known service without that port: no such name
            return Answer(found=False, owners={name}, mesh_space=True)
        nets = [network] if network is not None else self._visible_networks(service, view)
        srv = [SrvTarget(t.name, t.actual_port(target), self._address(t, nets)) for t in tasks]
        return Answer(found=True, owners={name}, srv=srv, shuffle=True)

    def _task_name(self, name: str, view: View, network: str | None) -> Answer:
        task_id = self._tasks_by_name.get(name)
        task = self._tasks.get(task_id) if task_id else None
        service = (
            None if task is None else self._visible_service(task.service.lower(), view, network)
        )
        if task is None or service is None:
            return Answer(found=False, owners={name})
        nets = [network] if network is not None else self._visible_networks(service, view)
        return Answer(
            found=True, owners={name, task.service.lower()}, addresses=[self._address(task, nets)]
        )

    def records(self, view: View) -> list[tuple[str, str, str]]:
        """Every (name, type, value) an asker in `view` gets, for `mesh inspect dns`.

        Built from the lookups themselves, so it shows exactly what is answered.
        """
        found: list[tuple[str, str, str]] = []
        for name in sorted(self._services):
            service = self._services[name]
            if not self._sees(service, view):
                continue
            names = [name, f"tasks.{name}"]
            names += sorted(
                self._tasks[i].name.lower() for i in self._tasks_by_service.get(name, ())
            )
            scope = scope_of(view)
            names += sorted(
                alias
                for network, alias in _aliases_of(service)
                if scope is None or network in scope
            )
            for qname in dict.fromkeys(names):
                found += [(qname, "A", a) for a in self.lookup(qname, view).addresses]
            for port in service.ports:
                qname = f"_{port.published_port or port.target_port}._{port.protocol}.{name}"
                found += [
                    (qname, "SRV", f"{t.port} {t.target}") for t in self.lookup(qname, view).srv
                ]
            for vip in service.vips:
                found += [(vip.address, "PTR", p) for p in self.reverse(vip.address, view).ptr]
        return found

    def reverse(self, address: str, view: View) -> Answer:
        """PTR for an address: a VIP names its service, a task address its tasks.

        A sandbox's view answers only for VIPs and endpoints on its networks.
        """
        owners = {address}
        in_subnet = any(ipaddress.IPv4Address(address) in s for s, _ in self._subnets)
        scope = scope_of(view)
        names: list[str] = []
        vip = self._vips.get(address)
        if vip is not None and vip[1] != INGRESS and (scope is None or vip[1] in scope):
            service = self._services.get(vip[0])
            if service is not None and self._sees(service, view):
                names.append(f"{service.name}.{vip[1]}")
        for task_id in sorted(self._tasks_by_address.get(address)):
            task = self._tasks[task_id]
            service = self._services.get(task.service.lower())
            if service is None or not self._sees(service, view):
                continue
            nets = self._visible_networks(service, view)
            if task.sandbox is not None:
                on = [e.network.lower() for e in task.sandbox.endpoints if e.address == address]
                nets = [n for n in nets if n in on] if on else nets
                if not nets:
                    continue
            names.append(f"{task.name}.{nets[0]}" if nets else task.name)
        return Answer(found=bool(names), owners=owners, ptr=names, mesh_space=in_subnet)


def _aliases_of(service: Service) -> list[tuple[str, str]]:
    """(network, alias) pairs of a service, lower case."""
    return [
        (network.lower(), alias.lower())
        for network, aliases in service.aliases.items()
        for alias in aliases
    ]


def _service_owners(service: Service) -> set[str]:
    return {
        service.name.lower(),
        *(v.address for v in service.vips),
        *(alias for _, alias in _aliases_of(service)),
    }


def _addresses_of(task: Task) -> list[str]:
    """Every address of a task: its first, and one per endpoint of its sandbox."""
    if task.sandbox is None:
        return [task.address]
    return _unique([task.address, *(e.address for e in task.sandbox.endpoints)])


def _unique(addresses: Iterable[str]) -> list[str]:
    """Addresses in order, each once (two tasks may share a host address)."""
    return list(dict.fromkeys(addresses))

"""The replicated state of one node: a sans-IO store of versioned records.

Theory of operation. Every mutation is a method that checks the request
against the whole state, then writes new record versions stamped with the next
Lamport clock and this node's name, and returns the list of `Change`s it made.
A method either raises a `MeshError` before writing anything or writes all of
its records: there is no half-applied change. The caller (the agent) makes the
changes durable and publishes them on the change feed; the store itself does
no I/O and reads no clock: `now` (wall-clock seconds) is an argument, and new
ids come from the `random.Random` it is given.

`merge` takes a record written elsewhere (gossip) and keeps it only if its
version is newer: last writer wins, ties broken by node name.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import ipaddress
import random
from collections.abc import Iterable, Iterator

from mesh.core.ids import IdIndex
from mesh.core.model import (
    INGRESS,
    INGRESS_VNI,
    KIND_OF,
    MAX_TASK_WEIGHT,
    Change,
    Endpoint,
    Health,
    HealthCheck,
    Kind,
    Network,
    Node,
    PortConfig,
    Record,
    Sandbox,
    Service,
    Task,
    TaskState,
    Version,
    Vip,
    endpoint_of,
    version_hash,
    vni_of,
)
from mesh.errors import Conflict, Invalid, NotFound
from mesh.ipam import (
    Ipam,
    gateway_of,
    ingress_prefix,
    parse_address_in,
    parse_ip_range,
    parse_subnet,
)
from mesh.names import check_label
from mesh.sandbox import esp, macvlan_options
from mesh.sandbox.names import (
    MAX_ENDPOINTS,
    NETNS_DIR,
    mac_of,
    netns_name,
    netns_path,
    netns_prefix,
    sandbox_interface,
)
from mesh.state.slots import SlotIndex
from mesh.state.specs import (
    NetworkSpec,
    PortSpec,
    SandboxSpec,
    ServicePatch,
    ServiceSpec,
    TaskSpec,
)

ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
ID_LENGTH = 25  # as Swarm's object ids
#: Swarm's range for published ports that the caller leaves out.
AUTO_PORTS = range(30000, 32768)
#: Drivers that make kernel objects on a node: creating their networks needs privileges.
KERNEL_DRIVERS = frozenset({"bridge", "macvlan"})
#: Drivers that can attach a sandbox.
SANDBOX_DRIVERS = frozenset({"bridge", "macvlan", "overlay"})
#: The VXLAN ids a VNI is allocated from (24 bits; ingress has INGRESS_VNI).
VNI_RANGE = range(INGRESS_VNI + 1, 1 << 24)
#: What two tasks of one service may not share: address and port map (`Task.endpoint`).
TaskEndpoint = tuple[str, tuple[tuple[int, int], ...]]
#: Where a task sorts in the task lists, and what a page's cursor holds.
TaskKey = tuple[str, int, str]


def task_key(task: Task) -> TaskKey:
    return (task.service, task.slot, task.id)


def new_id(rng: random.Random) -> str:
    # One draw of the whole number, written in base 36: a draw per character (25 calls
    # of rng.choice) was ~5% of a task registration's CPU.
    return _base36(rng.randrange(len(ID_ALPHABET) ** ID_LENGTH))


def ingress_id() -> str:
    """The same id on every node, so every node's built-in ingress is one record."""
    return _base36(int.from_bytes(hashlib.sha256(b"meshplane/ingress").digest()[:16], "big"))


def _base36(number: int) -> str:
    """The last ID_LENGTH base-36 digits of `number`, least significant first."""
    chars = []
    for _ in range(ID_LENGTH):
        number, index = divmod(number, len(ID_ALPHABET))
        chars.append(ID_ALPHABET[index])
    return "".join(chars)


def _vip_keys(record: Record | None) -> set[tuple[str, str]]:
    """The (network, address) of each VIP a live service holds."""
    if not isinstance(record, Service) or record.deleted:
        return set()
    return {(vip.network, vip.address) for vip in record.vips}


def _overlay_vni(record: Record | None) -> int | None:
    """The VNI a live overlay network (not ingress) holds; None for anything else."""
    if (
        not isinstance(record, Network)
        or record.deleted
        or record.driver != "overlay"
        or record.name == INGRESS
        or record.vni == 0
    ):
        return None
    return record.vni


def _endpoint_keys(record: Record | None) -> set[tuple[str, str]]:
    """The (network, address) of each sandbox endpoint a live task holds."""
    if not isinstance(record, Task) or record.deleted or record.sandbox is None:
        return set()
    return {(ep.network, ep.address) for ep in record.sandbox.endpoints}


class Store:
    """Networks, services and tasks (tombstones included) of the cluster as this node sees it."""

    def __init__(self, node: str, ipam: Ipam, rng: random.Random | None = None) -> None:
        self.node = node
        self.ipam = ipam
        self.clock = 0
        self._rng = rng or random.Random()
        self._records: dict[Kind, dict[str, Record]] = {kind: {} for kind in Kind}
        # Indexes kept in step with every write, so no request scans the state.
        self._tasks_by_service: dict[str, set[str]] = {}
        # Per service: its tasks' slots, and (address, port map) -> the tasks there, so a
        # registration finds its slot and its endpoint conflicts without a scan.
        self._slots: dict[str, SlotIndex] = {}
        self._endpoints: IdIndex[tuple[str, TaskEndpoint]] = IdIndex()
        # Every live task's (service, slot, id), sorted: the order of the task lists, kept
        # by bisection (a memmove in C per change), so a list or a page of it needs no sort.
        self._task_order: list[TaskKey] = []
        # The state digest's XOR of live records' version hashes, and their count, kept
        # with every write (mesh.digest): announcing it no longer rehashes every record.
        self._digest_acc = 0
        self._digest_count = 0
        self._task_names: dict[str, str] = {}
        # Live networks and services by lower-cased name (names compare as DNS names):
        # usually one key each, two when nodes created `Web` and `web` at one moment.
        self._folded: dict[Kind, dict[str, set[str]]] = {Kind.NETWORK: {}, Kind.SERVICE: {}}
        self._published: dict[tuple[str, int], str] = {}
        # Who holds each VIP. Two nodes may hand out one address at the same
        # moment (no central allocator); until that is repaired both hold it,
        # and the address stays claimed while either does.
        self._vip_holders: dict[tuple[str, str], set[str]] = {}
        # Which tasks' sandbox endpoints hold each (network, address); an address is
        # released only when neither a VIP nor an endpoint holds it.
        self._endpoint_holders: dict[tuple[str, str], set[str]] = {}
        # (network, lower-cased alias) -> the service answering to it there
        self._aliases: dict[tuple[str, str], str] = {}
        # Which nodes have each (network, address) as their own overlay address.
        self._node_holders: dict[tuple[str, str], set[str]] = {}
        #: This node's underlay address when it serves overlay networks (its sandboxes
        #: are enabled): it then keeps a `Node` record with an address on each overlay.
        self.vtep: str | None = None

    def __repr__(self) -> str:
        counts = " ".join(f"{kind}s={sum(1 for _ in self.live(kind))}" for kind in Kind)
        return f"<Store node={self.node!r} clock={self.clock} {counts}>"

    # -- reading ---------------------------------------------------------

    def get(self, kind: Kind, key: str) -> Record | None:
        """A live record, or None (tombstones are not returned)."""
        record = self._records[kind].get(key)
        return None if record is None or record.deleted else record

    def all_records(self) -> Iterator[Record]:
        """Every record, tombstones included: what persistence and push-pull carry."""
        for records in self._records.values():
            yield from records.values()

    def live(self, kind: Kind) -> Iterator[Record]:
        return (r for r in self._records[kind].values() if not r.deleted)

    def networks(self) -> list[Network]:
        return sorted(
            (r for r in self.live(Kind.NETWORK) if isinstance(r, Network)), key=lambda n: n.name
        )

    def services(self) -> list[Service]:
        return sorted(
            (r for r in self.live(Kind.SERVICE) if isinstance(r, Service)), key=lambda s: s.name
        )

    def tasks(self, service: str | None = None, node: str | None = None) -> list[Task]:
        """Live tasks by (service, slot, id), of `service` and on `node` when given."""
        return list(self.iter_tasks(service=service, node=node))

    def iter_tasks(
        self, service: str | None = None, node: str | None = None, after: TaskKey | None = None
    ) -> Iterator[Task]:
        """Live tasks in the order of `tasks`, from just after `after` (a `task_key`): a
        page is a slice of this, found by bisection. Not to be held across a change."""
        order = self._task_order
        start = 0
        if after is not None:
            start = bisect.bisect_right(order, after)
        if service is not None:
            start = max(start, bisect.bisect_left(order, service, key=lambda k: k[0]))
        records = self._records[Kind.TASK]
        for index in range(start, len(order)):
            key = order[index]
            if service is not None and key[0] != service:
                return
            task = records[key[2]]
            if isinstance(task, Task) and (node is None or task.node == node):
                yield task

    def digest_terms(self) -> tuple[int, int]:
        """(XOR of the live records' `version_hash`, how many): `mesh.digest.digest_from`."""
        return self._digest_acc, self._digest_count

    def get_task(self, task_id: str) -> Task | None:
        record = self.get(Kind.TASK, task_id)
        return record if isinstance(record, Task) else None

    def network(self, name: str) -> Network:
        record = self.get(Kind.NETWORK, name)
        if not isinstance(record, Network):
            raise NotFound(f"network {name!r} not found")
        return record

    def service(self, name: str) -> Service:
        record = self.get(Kind.SERVICE, name)
        if not isinstance(record, Service):
            raise NotFound(f"service {name!r} not found")
        return record

    def task(self, task_id: str) -> Task:
        record = self.get(Kind.TASK, task_id)
        if not isinstance(record, Task):
            raise NotFound(f"task {task_id!r} not found")
        return record

    # -- loading and merging -----------------------------------------------

    def load(self, records: Iterable[Record], clock: int = 0) -> None:
        """Restore persisted records (no changes are emitted: nothing changed)."""
        for record in records:
            self._put(record)
            self.clock = max(self.clock, record.version.clock)
        self.clock = max(self.clock, clock)

    def ensure_ingress(self, subnet: str | None = None) -> list[Change]:
        """Create the built-in `ingress` network unless it exists (or was removed).

        Its subnet is `subnet`, else the first free /16 of the pool (`ingress_prefix`).
        An ingress that exists keeps its subnet: renumbering it would move the VIPs
        of every service that publishes a port (`ingress_mismatch` says so).
        """
        if self._records[Kind.NETWORK].get(INGRESS) is not None:
            return []
        if subnet:
            chosen = parse_subnet(subnet)
            other = self.ipam.overlapping(chosen)
            if other is not None:
                raise Conflict(
                    f"ingress subnet {chosen} overlaps network {other!r}", code="subnet_overlaps"
                )
        else:
            chosen = self.ipam.next_subnet(ingress_prefix(self.ipam.pool))
        record = Network(
            name=INGRESS,
            id=ingress_id(),
            driver="overlay",
            subnet=str(chosen),
            gateway=str(gateway_of(chosen)),
            labels={"mesh.internal": "true"},
            vni=INGRESS_VNI,
            version=Version(0, ""),  # older than any write, so a real one always wins
        )
        return [self._write(record), *self._ensure_node()]

    def ingress_mismatch(self, subnet: str | None) -> str | None:
        """Why the ingress network cannot have `subnet` (it has another), or None."""
        ingress = self.get(Kind.NETWORK, INGRESS)
        if not subnet or not isinstance(ingress, Network):
            return None
        if ingress.subnet == str(parse_subnet(subnet)):
            return None
        return (
            f"the ingress network already has subnet {ingress.subnet}, not {subnet}: "
            "an existing ingress is never renumbered (its VIPs would move); drop "
            f"--ingress-subnet or set it to {ingress.subnet}"
        )

    def merge(self, record: Record) -> list[Change]:
        """Last-writer-wins merge of a record written elsewhere."""
        self.clock = max(self.clock, record.version.clock)
        current = self._records[KIND_OF[type(record)]].get(record.key)
        if current is not None and current.version >= record.version:
            if isinstance(record, Node) and record.name == self.node and record != current:
                # Another copy of this node's own record with a version it wrote too (it
                # lost its data dir and counted from 0 again): its own is written anew,
                # above both, so the cluster ends with this one.
                return [self._write(dataclasses.replace(current, version=self._tick()))]
            return []
        changes = [self._write(record)]
        # A collision is looked at where the merged version holds an address and also
        # where the version it replaces held one: with three holders of an address, the
        # youngest's move (or removal) leaves two, and the younger of them learns that it
        # must move now only from the record that left.
        if isinstance(record, Service):
            changes += self._repair_vip_conflicts(_vip_keys(record) | _vip_keys(current))
            if not record.deleted:
                changes += self._repair_vips_on_endpoints({record.name})
        if isinstance(record, Task):
            held = _endpoint_keys(record)
            changes += self._repair_vips_on_endpoints(
                {name for key in held for name in self._vip_holders.get(key, ())}
            )
            changes += self._repair_endpoints(held | _endpoint_keys(current))
        if isinstance(record, Network):
            left = _overlay_vni(current)
            if left is not None and left != _overlay_vni(record):
                changes += self._repair_vni_at(left)
            if not record.deleted:
                changes += self._repair_vni(record)
        if isinstance(record, Network | Service | Task | Node):
            # A network came or went, or an address this node holds on an overlay
            # may now be someone else's: this node's own record follows.
            changes += self._ensure_node()
        return changes

    # -- overlays: VXLAN ids, endpoints and node addresses across nodes -------------

    def serve_overlays(self, vtep: str) -> list[Change]:
        """This node makes overlay networks from now on, with `vtep` as its underlay
        address: it keeps a `Node` record (its VTEP and an address on every overlay),
        numbers overlay networks that an older agent left without a VNI, and repairs
        VNI collisions it is the one to repair."""
        self.vtep = vtep
        changes: list[Change] = []
        for network in self.networks():
            changes += self._repair_vni(network)
        return changes + self._ensure_node()

    def _vni_for(self, spec: NetworkSpec) -> int:
        """`--opt vni=N` when free (as the design's CLI contract has it), else the lowest
        free one. A VNI given by hand is repaired like any other if another node handed
        it out at the same moment (the younger network moves)."""
        text = spec.options.get("vni")
        if text is None:
            return self._free_vni()
        try:
            vni = int(text)
        except ValueError:
            raise Invalid(f"--opt vni={text}: not a number") from None
        if vni not in VNI_RANGE:
            raise Invalid(
                f"--opt vni={vni}: a VNI is {VNI_RANGE.start}-{VNI_RANGE.stop - 1} "
                f"({INGRESS_VNI} is the ingress network's)"
            )
        for network in self.networks():
            if network.driver == "overlay" and vni_of(network) == vni:
                raise Conflict(f"VNI {vni} is network {network.name!r}'s", code="vni_in_use")
        return vni

    def _free_vni(self) -> int:
        used = {vni_of(n) for n in self.networks() if n.driver == "overlay"}
        return next(v for v in VNI_RANGE if v not in used)

    def _repair_vni(self, network: Network) -> list[Change]:
        """Two overlay networks with one VNI (two nodes created one at the same moment):
        the younger (later created, then greater name) takes the lowest free one, by
        the hand of the node that wrote its current version, as VIP conflicts are
        repaired. An overlay without a VNI (written by an older agent) is numbered by
        any node that serves overlays: two doing it at once write one record, and the
        last writer's number stands."""
        if network.driver != "overlay" or network.name == INGRESS:
            return []
        current = self.get(Kind.NETWORK, network.name)
        if not isinstance(current, Network) or current.version != network.version:
            return []  # a repair already replaced it
        if network.vni == 0:
            if self.vtep is None:
                return []
            fresh = dataclasses.replace(network, vni=self._free_vni(), version=self._tick())
            return [self._write(fresh)]
        if network.vni != INGRESS_VNI:
            return self._repair_vni_at(network.vni)
        if network.version.node != self.node:
            return []
        return [
            self._write(dataclasses.replace(network, vni=self._free_vni(), version=self._tick()))
        ]

    def _repair_vni_at(self, vni: int) -> list[Change]:
        """The younger of the overlays sharing `vni` moves, if this node wrote it."""
        same = [
            n
            for n in self.networks()
            if n.driver == "overlay" and n.name != INGRESS and vni_of(n) == vni
        ]
        if len(same) < 2:
            return []
        loser = max(same, key=lambda n: (n.created_at, n.name))
        if loser.version.node != self.node:
            return []
        fresh = dataclasses.replace(loser, vni=self._free_vni(), version=self._tick())
        return [self._write(fresh)]

    def vni_conflicts(self) -> list[tuple[int, list[str]]]:
        """(vni, networks) for every VXLAN id held by more than one overlay network."""
        by_vni: dict[int, list[str]] = {}
        for network in self.networks():
            if network.driver == "overlay":
                by_vni.setdefault(vni_of(network), []).append(network.name)
        return sorted((vni, names) for vni, names in by_vni.items() if len(names) > 1)

    def _repair_endpoints(self, keys: Iterable[tuple[str, str]]) -> list[Change]:
        """Two tasks with one address on a network (two nodes handed it out at one
        moment): the younger task (later created, then greater id) takes another, by
        the hand of its own node, the only one that writes it; the older keeps its
        address and never notices. The younger's sandbox is re-addressed (its
        endpoint there is left and joined again by the sandbox manager)."""
        changes: list[Change] = []
        for network, address in sorted(set(keys)):
            holders = [
                t
                for task_id in sorted(self._endpoint_holders.get((network, address), ()))
                if (t := self.get_task(task_id)) is not None
            ]
            if len(holders) < 2:
                continue
            loser = max(holders, key=lambda t: (t.created_at, t.id))
            if loser.node != self.node or loser.sandbox is None:
                continue
            try:
                fresh = str(self.ipam.allocate_endpoint(network))
            except Conflict:
                continue  # the network is full: both keep it (`endpoint_conflicts` shows it)
            self.ipam.release(network, [ipaddress.IPv4Address(fresh)])  # _put claims it
            endpoints = tuple(
                dataclasses.replace(e, address=fresh, mac=mac_of(fresh))
                if e.network == network
                else e
                for e in loser.sandbox.endpoints
            )
            moved = dataclasses.replace(
                loser,
                address=endpoints[0].address,
                sandbox=dataclasses.replace(loser.sandbox, endpoints=endpoints),
                version=self._tick(),
            )
            changes.append(self._write(moved))
        return changes

    def endpoint_conflicts(self) -> list[tuple[str, str, list[str]]]:
        """(network, address, holders) for every address two holders claim as their own:
        task ids, and `node:<name>` for a node's overlay address."""
        keys = set(self._endpoint_holders) | set(self._node_holders)
        found = []
        for key in sorted(keys):
            holders = sorted(self._endpoint_holders.get(key, ())) + sorted(
                f"node:{n}" for n in self._node_holders.get(key, ())
            )
            if len(holders) > 1:
                found.append((key[0], key[1], holders))
        return found

    def _ensure_node(self) -> list[Change]:
        """This node's `Node` record as it should be: its VTEP, and one address on every
        live overlay network, kept while it is still its own. A node address gives way
        to anything else on it (a task's endpoint, a VIP, the address of a node with a
        smaller name): it is the cheapest thing to move (one address on this node's
        bridge), so a conflict always has exactly one side that moves."""
        if self.vtep is None:
            return []
        current = self._records[Kind.NODE].get(self.node)
        have = current.addresses if isinstance(current, Node) and not current.deleted else {}
        addresses: dict[str, str] = {}
        for network in self.networks():
            if network.driver != "overlay":
                continue
            kept = have.get(network.name)
            if kept is not None and self._node_address_ok(network, kept):
                addresses[network.name] = kept
                continue
            try:
                fresh = self.ipam.allocate_endpoint(network.name)
            except Conflict:
                continue  # a full network: this node serves it without an address
            self.ipam.release(network.name, [fresh])  # claimed for real by _put
            addresses[network.name] = str(fresh)
        if (
            isinstance(current, Node)
            and not current.deleted
            and current.vtep == self.vtep
            and current.addresses == addresses
        ):
            return []
        record = Node(name=self.node, vtep=self.vtep, addresses=addresses, version=self._tick())
        return [self._write(record)]

    def _node_address_ok(self, network: Network, address: str) -> bool:
        try:
            parsed = ipaddress.IPv4Address(address)
        except ValueError:
            return False
        if parsed not in ipaddress.IPv4Network(network.subnet):
            return False
        if address == network.gateway or address in network.aux_addresses.values():
            return False
        key = (network.name, address)
        if key in self._endpoint_holders or key in self._vip_holders:
            return False
        return not any(n < self.node for n in self._node_holders.get(key, ()))

    def node_record(self, name: str) -> Node | None:
        record = self.get(Kind.NODE, name)
        return record if isinstance(record, Node) else None

    def _repair_vips_on_endpoints(self, names: Iterable[str]) -> list[Change]:
        """A VIP on a sandbox endpoint's address (two nodes handed it out at one moment):
        the endpoint is wired into a kernel, so the VIP moves, by the hand of the node
        that wrote the service's current version (written once, then gossiped)."""
        changes: list[Change] = []
        for name in sorted(names):
            service = self.get(Kind.SERVICE, name)
            if not isinstance(service, Service) or service.version.node != self.node:
                continue
            for vip in service.vips:
                if (vip.network, vip.address) in self._endpoint_holders:
                    service = self._reallocated(service, vip.network)
                    changes.append(self._write(service))
        return changes

    def vip_conflicts(self) -> list[tuple[str, str, list[str]]]:
        """(network, address, services) for every VIP held by more than one service."""
        return sorted(
            (net, addr, sorted(names))
            for (net, addr), names in self._vip_holders.items()
            if len(names) > 1
        )

    def _repair_vip_conflicts(self, keys: Iterable[tuple[str, str]]) -> list[Change]:
        """Two services with one VIP: the younger gives its VIP up, by its own writer's hand.

        Every node picks the same loser (the later-created service, then the
        greater name), but only the node that wrote the loser's current
        version changes it, so the repair is written once and then gossiped.
        `keys`: the (network, address) pairs to look at.
        """
        changes: list[Change] = []
        for network, address in sorted(keys):
            holders = sorted(self._vip_holders.get((network, address), ()))
            services = [
                s for name in holders if isinstance(s := self.get(Kind.SERVICE, name), Service)
            ]
            if len(services) < 2:
                continue
            loser = max(services, key=lambda s: (s.created_at, s.name))
            if loser.version.node != self.node:
                continue
            changes.append(self._write(self._reallocated(loser, network)))
        return changes

    def _reallocated(self, service: Service, network: str) -> Service:
        fresh = Vip(network=network, address=str(self.ipam.allocate(network)))
        vips = tuple(fresh if v.network == network else v for v in service.vips)
        self.ipam.release(network, [ipaddress.IPv4Address(fresh.address)])  # _put claims it
        return dataclasses.replace(service, vips=vips, version=self._tick())

    # -- networks ----------------------------------------------------------

    def create_network(self, spec: NetworkSpec, now: float) -> list[Change]:
        self._check_name_free(Kind.NETWORK, spec.name)
        if spec.subnet is None:
            subnet = self.ipam.next_subnet()
        else:
            subnet = parse_subnet(spec.subnet)
            other = self.ipam.overlapping(subnet)
            if other is not None:
                raise Conflict(
                    f"subnet {subnet} overlaps network {other!r}", code="subnet_overlaps"
                )
        gateway = (
            gateway_of(subnet)
            if spec.gateway is None
            else parse_address_in(spec.gateway, subnet, "gateway")
        )
        ip_range = None if spec.ip_range is None else parse_ip_range(spec.ip_range, subnet)
        aux: dict[str, str] = {}
        for aux_name, text in spec.aux_addresses.items():
            address = parse_address_in(text, subnet, f"aux address {aux_name!r}")
            if address == gateway:
                raise Invalid(f"aux address {aux_name!r} ({address}) is the gateway")
            if str(address) in aux.values():
                raise Invalid(f"aux address {address} is given twice")
            aux[aux_name] = str(address)
        _check_encrypted(spec)
        if spec.driver == "macvlan":
            try:
                macvlan_options.check(
                    spec.options,
                    subnet,
                    gateway,
                    internal=spec.internal,
                    ip_range=ip_range,
                    reserved=[ipaddress.IPv4Address(a) for a in aux.values()],
                )
            except ValueError as exc:
                raise Invalid(str(exc)) from None
        local = spec.driver == "bridge"  # bridge: one node's; overlay, macvlan: everyone's
        record = Network(
            name=spec.name,
            id=new_id(self._rng),
            driver=spec.driver,
            subnet=str(subnet),
            gateway=str(gateway),
            labels=dict(spec.labels),
            created_at=now,
            version=self._tick(),
            scope="local" if local else "swarm",
            node=self.node if local else "",
            internal=spec.internal,
            attachable=local if spec.attachable is None else spec.attachable,
            ip_range=None if ip_range is None else str(ip_range),
            aux_addresses=aux,
            options=dict(spec.options),
            vni=self._vni_for(spec) if spec.driver == "overlay" else 0,
        )
        return [self._write(record), *self._ensure_node()]

    def remove_network(self, name: str, now: float) -> list[Change]:
        network = self.network(name)
        if name == INGRESS:
            raise Conflict(
                "the ingress network is built in and carries the routing mesh",
                code="network_builtin",
            )
        users = [s.name for s in self.services() if name in s.networks]
        tasks = sorted(
            {tid for (net, _), ids in self._endpoint_holders.items() if net == name for tid in ids}
        )
        if users or tasks:
            holders = []
            if users:
                holders.append(f"services {', '.join(users)}")
            if tasks:
                names = [t.name if (t := self.get_task(i)) else i for i in tasks]
                holders.append(f"tasks {', '.join(names)}")
            raise Conflict(
                f"network {name!r} is in use by {' and '.join(holders)}", code="network_in_use"
            )
        removed = self._write(dataclasses.replace(network, deleted=True, version=self._tick()))
        return [removed, *self._ensure_node()]

    # -- services ----------------------------------------------------------

    def create_service(self, spec: ServiceSpec, now: float) -> list[Change]:
        self._check_name_free(Kind.SERVICE, spec.name)
        self._check_networks(spec.networks)
        aliases = self._check_aliases(spec.name, spec.aliases, spec.networks)
        ports = self._resolve_ports(spec.ports, owner=None)
        self._check_endpoint_mode(spec.endpoint_mode, ports)
        _check_health_port(spec.health_check, ports)
        vips = self._allocate_vips(spec.name, spec.endpoint_mode, spec.networks, ports, keep=())
        record = Service(
            name=spec.name,
            id=new_id(self._rng),
            networks=spec.networks,
            endpoint_mode=spec.endpoint_mode,
            ports=ports,
            labels=dict(spec.labels),
            vips=vips,
            health_check=spec.health_check,
            created_at=now,
            updated_at=now,
            version=self._tick(),
            aliases=aliases,
        )
        return [self._write(record)]

    def _merge_weights(self, service: Service, given: dict[str, int | None]) -> dict[str, int]:
        """The service's weight overrides with `given` merged in; a task is named by id or
        name and must be one of the service's (422 otherwise); overrides of tasks that no
        longer exist are dropped on the way."""
        tasks = self.tasks(service=service.name)
        by_ref = {t.id: t for t in tasks} | {t.name.lower(): t for t in tasks}
        merged = {tid: w for tid, w in service.weights.items() if tid in by_ref}
        for ref, weight in given.items():
            task = by_ref.get(ref) or by_ref.get(ref.lower())
            if task is None:
                raise Invalid(
                    f"service {service.name!r} has no task {ref!r} to weigh",
                    code="unknown_task",
                )
            if weight is None:
                merged.pop(task.id, None)
            elif not 0 <= weight <= MAX_TASK_WEIGHT:
                raise Invalid(f"weight {weight} for {ref!r} is not in 0..{MAX_TASK_WEIGHT}")
            else:
                merged[task.id] = weight
        return merged

    def update_service(
        self, name: str, patch: ServicePatch, now: float, expected_version: int | None = None
    ) -> list[Change]:
        current = self.service(name)
        if expected_version is not None and expected_version != current.version.clock:
            raise Conflict(
                f"service {name!r} is at version {current.version.clock}, not {expected_version}",
                code="version_conflict",
            )
        networks = current.networks if patch.networks is None else patch.networks
        mode = patch.endpoint_mode or current.endpoint_mode
        self._check_networks(networks)
        # Aliases of a network the service leaves go with it.
        wanted = current.aliases if patch.aliases is None else patch.aliases
        kept = {net: names for net, names in wanted.items() if net in networks}
        aliases = self._check_aliases(name, kept if patch.aliases is None else wanted, networks)
        ports = (
            current.ports if patch.ports is None else self._resolve_ports(patch.ports, owner=name)
        )
        self._check_endpoint_mode(mode, ports)
        check = None if patch.clear_health_check else (patch.health_check or current.health_check)
        _check_health_port(check, ports)
        # Release first so a VIP kept on an unchanged network is found again below.
        self._release_vips(current)
        try:
            vips = self._allocate_vips(name, mode, networks, ports, keep=current.vips)
        except Exception:
            self._claim_vips(current)
            raise
        record = dataclasses.replace(
            current,
            networks=networks,
            endpoint_mode=mode,
            ports=ports,
            labels=current.labels if patch.labels is None else dict(patch.labels),
            vips=vips,
            health_check=check,
            updated_at=now,
            version=self._tick(),
            aliases=aliases,
            weights=current.weights
            if patch.weights is None
            else self._merge_weights(current, patch.weights),
        )
        return [self._write(record)]

    def remove_service(self, name: str, now: float) -> list[Change]:
        """Remove a service and, as Swarm does, every task of it."""
        current = self.service(name)
        changes = [
            self._write(
                dataclasses.replace(task, deleted=True, updated_at=now, version=self._tick())
            )
            for task in self.tasks(service=name)
        ]
        changes.append(
            self._write(
                dataclasses.replace(current, deleted=True, updated_at=now, version=self._tick())
            )
        )
        return changes

    # -- tasks ---------------------------------------------------------------

    def add_task(self, spec: TaskSpec, now: float) -> list[Change]:
        """A task at `spec.address` (a host process), or with a sandbox: one endpoint per
        network of its service, addressed from each network's IPAM, in network order."""
        service = self.service(spec.service)
        if spec.sandbox is not None and spec.address is not None:
            raise Invalid("a sandboxed task gets its address from its networks: drop address")
        if spec.sandbox is None and spec.address is None:
            raise Invalid("a task needs an address, or a sandbox", code="invalid_address")
        if not 0 <= spec.weight <= MAX_TASK_WEIGHT:
            raise Invalid(f"weight {spec.weight} is not in 0..{MAX_TASK_WEIGHT}")
        task_id = new_id(self._rng)
        slots = self._slots.get(service.name)
        slot = 1 if slots is None else slots.lowest_free()
        name = spec.name or f"{service.name}.{slot}.{task_id}"
        if name.lower() in self._task_names:
            raise Conflict(f"task name {name!r} is in use", code="name_in_use")
        sandbox = None
        if spec.sandbox is not None:
            sandbox = self._sandbox(service, task_id, spec.sandbox)
            address = sandbox.endpoints[0].address
        else:
            assert spec.address is not None
            address = _parse_task_address(spec.address)
        holders = self._endpoints.get((service.name, endpoint_of(address, spec.ports)))
        if holders:
            sibling = min(
                (t for i in holders if isinstance(t := self._records[Kind.TASK][i], Task)),
                key=lambda t: (t.slot, t.id),
            )
            raise Conflict(
                f"service {service.name!r} already has task {sibling.name!r} at "
                f"{address} with the same ports",
                code="endpoint_in_use",
            )
        task = Task(
            id=task_id,
            name=name,
            service=service.name,
            slot=slot,
            node=self.node,
            address=address,
            ports=dict(spec.ports),
            health=Health.STARTING if service.health_check else Health.HEALTHY,
            created_at=now,
            updated_at=now,
            version=self._tick(),
            sandbox=sandbox,
            weight=spec.weight,
        )
        return [self._write(task)]

    def _sandbox(self, service: Service, task_id: str, spec: SandboxSpec) -> Sandbox:
        """Check the service's networks can take a sandbox here and address its endpoints.

        The addresses are claimed for real when the task is written (`_put`)."""
        networks = [self.network(n) for n in service.networks if n != INGRESS]
        if not networks:
            raise Invalid(
                f"service {service.name!r} is on no network: a sandbox joins its service's "
                "networks, so attach the service to one first"
            )
        ingress = self.get(Kind.NETWORK, INGRESS)
        if (
            self.vtep is not None
            and isinstance(ingress, Network)
            and ingress.driver == "overlay"
            and any(p.publish_mode == "ingress" for p in service.ports)
        ):
            # As in Swarm, a task of a service that publishes a port joins ingress too
            # (last, so its other endpoints keep their eth numbers): the routing mesh of
            # every node reaches it there, whatever its own networks are.
            networks.append(ingress)
        if len(networks) > MAX_ENDPOINTS:
            raise Invalid(f"a sandbox has at most {MAX_ENDPOINTS} endpoints (networks)")
        for network in networks:
            if network.driver not in SANDBOX_DRIVERS:
                raise Invalid(
                    f"network {network.name!r} (driver {network.driver}) cannot hold sandboxes"
                    " yet: only bridge, macvlan and overlay networks can"
                )
            if network.driver == "overlay" and self.vtep is None:
                raise Invalid(
                    f"network {network.name!r} is an overlay network and node {self.node!r}"
                    " serves no overlay (its sandboxes are off)"
                )
            if network.scope == "local" and network.node != self.node:
                raise Invalid(
                    f"network {network.name!r} is a {network.driver} network of node "
                    f"{network.node!r}: sandboxes on it run on that node only"
                )
            if (
                network.driver == "macvlan"
                and macvlan_options.has_node_ranges(network.options)
                and macvlan_options.node_range(network.options, self.node) is None
            ):
                raise Invalid(
                    f"macvlan network {network.name!r} gives each node its own address range"
                    f" (ip_range@<node>) and none to node {self.node!r}: its sandboxes run on"
                    " the nodes it names"
                )
        if spec.netns is None:
            netns, adopted = netns_path(netns_name(self.node, task_id)), False
        else:
            netns, adopted = self._adopted_netns(spec.netns), True
        endpoints: list[Endpoint] = []
        try:
            for index, network in enumerate(networks):
                within = (
                    macvlan_options.node_range(network.options, self.node)
                    if network.driver == "macvlan"
                    else None
                )
                address = str(self.ipam.allocate_endpoint(network.name, within=within))
                endpoints.append(
                    Endpoint(
                        network=network.name,
                        address=address,
                        mac=mac_of(address),
                        interface=sandbox_interface(index),
                    )
                )
        finally:
            for made in endpoints:  # claimed for real again by _put when the task is written
                self.ipam.release(made.network, [ipaddress.IPv4Address(made.address)])
        return Sandbox(netns=netns, adopted=adopted, endpoints=tuple(endpoints))

    def _adopted_netns(self, spec: str) -> str:
        """A netns name (under /run/netns) or an absolute path, as a path."""
        if "\x00" in spec or any(ord(c) < 0x20 for c in spec):
            raise Invalid("netns holds a control character")
        if "/" in spec:
            if not spec.startswith("/") or "/../" in f"{spec}/":
                raise Invalid(
                    f"netns {spec!r} is neither a name under {NETNS_DIR} nor an absolute path"
                )
            path = spec
        else:
            if spec in (".", ".."):
                raise Invalid(f"netns {spec!r} is not a namespace name")
            path = netns_path(spec)
        if path.startswith(f"{NETNS_DIR}/{netns_prefix(self.node)}"):
            raise Invalid(
                f"netns {spec!r} is a sandbox this agent made for another task: not adoptable"
            )
        return path

    def drain_task(self, task_id: str, now: float, grace: float) -> list[Change]:
        """Stop new traffic to a task; it is removed once `grace` seconds have passed."""
        task = self.task(task_id)
        if task.state is TaskState.DRAINING:
            return []
        return [
            self._write(
                dataclasses.replace(
                    task,
                    state=TaskState.DRAINING,
                    drain_until=now + grace,
                    updated_at=now,
                    version=self._tick(),
                )
            )
        ]

    def remove_task(self, task_id: str, now: float) -> list[Change]:
        task = self.task(task_id)
        return [
            self._write(
                dataclasses.replace(task, deleted=True, updated_at=now, version=self._tick())
            )
        ]

    def drained_tasks(self, now: float) -> list[Task]:
        """Tasks this node drained whose grace period is over (this node removes them)."""
        return [
            t
            for t in self.tasks()
            if t.state is TaskState.DRAINING
            and t.version.node == self.node
            and (t.drain_until or 0.0) <= now
        ]

    def set_health(self, task_id: str, health: Health, output: str, now: float) -> list[Change]:
        """Record a health transition; a report that changes nothing writes nothing."""
        task = self.task(task_id)
        output = output[:512]
        if task.health is health and task.health_output == output:
            return []
        return [
            self._write(
                dataclasses.replace(
                    task, health=health, health_output=output, updated_at=now, version=self._tick()
                )
            )
        ]

    def tombstones(self) -> list[tuple[Kind, str]]:
        return [
            (kind, key)
            for kind, records in self._records.items()
            for key, record in records.items()
            if record.deleted
        ]

    def forget(self, kind: Kind, key: str) -> bool:
        """Drop a tombstone for good (its reap interval is over); a live record stays."""
        record = self._records[kind].get(key)
        if record is None or not record.deleted:
            return False
        del self._records[kind][key]
        return True

    # -- internals -----------------------------------------------------------

    def _tick(self) -> Version:
        self.clock += 1
        return Version(self.clock, self.node)

    def _write(self, record: Record) -> Change:
        kind = KIND_OF[type(record)]
        before = self._records[kind].get(record.key)
        self._put(record)
        return Change(kind, record.key, before, record)

    def _put(self, record: Record) -> None:
        before = self._records[KIND_OF[type(record)]].get(record.key)
        if before is not None and not before.deleted:
            self._digest_acc ^= version_hash(before)
            self._digest_count -= 1
        self._unindex(before)
        self._records[KIND_OF[type(record)]][record.key] = record
        if record.deleted:
            return
        self._digest_acc ^= version_hash(record)
        self._digest_count += 1
        match record:
            case Network():
                self._folded[Kind.NETWORK].setdefault(record.key.lower(), set()).add(record.key)
                # Refused overlaps were refused before the write (create_network,
                # ensure_ingress); a record loaded or merged exists whatever it overlaps:
                # two nodes may carve one /24 at once, or an older node hold a /24
                # ingress inside a newer one's /16. Kept, so last-writer-wins holds.
                self.ipam.add_network(
                    record.name,
                    ipaddress.IPv4Network(record.subnet),
                    overlap_ok=True,
                    gateway=ipaddress.IPv4Address(record.gateway),
                    ip_range=None
                    if record.ip_range is None
                    else ipaddress.IPv4Network(record.ip_range),
                    aux=[
                        *(ipaddress.IPv4Address(a) for a in record.aux_addresses.values()),
                        *(
                            macvlan_options.shim_addresses(record.options)
                            if record.driver == "macvlan"
                            else ()
                        ),
                    ],
                )
                for service in self.services():
                    self._claim_vips(service)
                for net, address in [*self._endpoint_holders, *self._node_holders]:
                    if net == record.name:
                        self.ipam.claim(net, ipaddress.IPv4Address(address))
            case Service():
                self._folded[Kind.SERVICE].setdefault(record.key.lower(), set()).add(record.key)
                self._claim_vips(record)
                for port in record.ports:
                    self._published[(port.protocol, port.published_port)] = record.name
                for net, names in record.aliases.items():
                    for alias in names:
                        self._aliases[(net, alias.lower())] = record.name
            case Task():
                self._tasks_by_service.setdefault(record.service, set()).add(record.id)
                bisect.insort(self._task_order, task_key(record))
                self._slots.setdefault(record.service, SlotIndex()).take(record.slot)
                self._endpoints.add((record.service, record.endpoint()), record.id)
                self._task_names[record.name.lower()] = record.id
                for ep in record.sandbox.endpoints if record.sandbox else ():
                    self._endpoint_holders.setdefault((ep.network, ep.address), set()).add(
                        record.id
                    )
                    self.ipam.claim(ep.network, ipaddress.IPv4Address(ep.address))
            case Node():
                for net, address in record.addresses.items():
                    self._node_holders.setdefault((net, address), set()).add(record.name)
                    with contextlib.suppress(ValueError):  # a malformed one claims nothing
                        self.ipam.claim(net, ipaddress.IPv4Address(address))

    def _unindex(self, record: Record | None) -> None:
        if record is None or record.deleted:
            return
        match record:
            case Network():
                self._unfold(Kind.NETWORK, record.key)
                self.ipam.remove_network(record.name)
            case Service():
                self._unfold(Kind.SERVICE, record.key)
                self._release_vips(record)
                for port in record.ports:
                    if self._published.get((port.protocol, port.published_port)) == record.name:
                        del self._published[(port.protocol, port.published_port)]
                for net, names in record.aliases.items():
                    for alias in names:
                        if self._aliases.get((net, alias.lower())) == record.name:
                            del self._aliases[(net, alias.lower())]
            case Task():
                self._tasks_by_service.get(record.service, set()).discard(record.id)
                order = self._task_order
                index = bisect.bisect_left(order, task_key(record))
                if index < len(order) and order[index] == task_key(record):
                    del order[index]
                slots = self._slots.get(record.service)
                if slots is not None:
                    slots.release(record.slot)
                    if not slots:
                        del self._slots[record.service]
                self._endpoints.discard((record.service, record.endpoint()), record.id)
                if self._task_names.get(record.name.lower()) == record.id:
                    del self._task_names[record.name.lower()]
                for ep in record.sandbox.endpoints if record.sandbox else ():
                    key = (ep.network, ep.address)
                    holders = self._endpoint_holders.get(key, set())
                    holders.discard(record.id)
                    if not holders:
                        self._endpoint_holders.pop(key, None)
                        self._release_if_free(key)
            case Node():
                for key in record.addresses.items():
                    nodes = self._node_holders.get(key, set())
                    nodes.discard(record.name)
                    if not nodes:
                        self._node_holders.pop(key, None)
                        self._release_if_free(key)

    def _release_if_free(self, key: tuple[str, str]) -> None:
        """Give an address back to IPAM once no VIP, endpoint or node holds it."""
        if key in self._vip_holders or key in self._endpoint_holders or key in self._node_holders:
            return
        with contextlib.suppress(ValueError):
            self.ipam.release(key[0], [ipaddress.IPv4Address(key[1])])

    def _claim_vips(self, service: Service) -> None:
        for vip in service.vips:
            self._vip_holders.setdefault((vip.network, vip.address), set()).add(service.name)
            self.ipam.claim(vip.network, ipaddress.IPv4Address(vip.address))

    def _release_vips(self, service: Service) -> None:
        for vip in service.vips:
            key = (vip.network, vip.address)
            holders = self._vip_holders.get(key, set())
            holders.discard(service.name)
            if not holders:
                self._vip_holders.pop(key, None)
                self._release_if_free(key)

    def _unfold(self, kind: Kind, key: str) -> None:
        folded = key.lower()
        keys = self._folded[kind].get(folded)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._folded[kind][folded]

    def _check_name_free(self, kind: Kind, name: str) -> None:
        """Names are DNS names, which compare in lower case: `WEB` is taken by `web`.

        One look-up in the index `_put` keeps, not a scan of the records."""
        keys = self._folded[kind].get(name.lower())
        if keys:
            key = name if name in keys else min(keys)
            taken = "" if key == name else f" as {key!r}"
            raise Conflict(f"{kind.value} {name!r} already exists{taken}", code="name_in_use")

    def _check_networks(self, networks: tuple[str, ...]) -> None:
        if len(set(networks)) != len(networks):
            raise Invalid("a service lists a network more than once")
        for name in networks:
            if name == INGRESS:
                raise Invalid("services join ingress by publishing a port, not by naming it")
            if self.get(Kind.NETWORK, name) is None:
                raise Invalid(f"network {name!r} does not exist", code="unknown_network")

    def _check_aliases(
        self, service: str, aliases: dict[str, tuple[str, ...]], networks: tuple[str, ...]
    ) -> dict[str, tuple[str, ...]]:
        """Aliases are DNS labels of a network the service is on, unique on that network."""
        checked: dict[str, tuple[str, ...]] = {}
        for net, names in aliases.items():
            if net not in networks:
                raise Invalid(
                    f"alias {', '.join(names)} is for network {net!r}, which service "
                    f"{service!r} is not on"
                )
            seen: list[str] = []
            for alias in names:
                try:
                    check_label(alias, "alias")
                except ValueError as exc:
                    raise Invalid(str(exc)) from None
                if alias.lower() in (a.lower() for a in seen):
                    continue
                holder = self._aliases.get((net, alias.lower()))
                if holder is not None and holder != service:
                    raise Conflict(
                        f"alias {alias!r} on network {net!r} is taken by service {holder!r}",
                        code="alias_in_use",
                    )
                seen.append(alias)
            if seen:
                checked[net] = tuple(seen)
        return checked

    def _check_endpoint_mode(self, mode: str, ports: tuple[PortConfig, ...]) -> None:
        if mode == "dnsrr" and any(p.publish_mode == "ingress" for p in ports):
            raise Invalid(
                "endpoint mode dnsrr cannot publish ports in ingress mode "
                "(use publish mode host), as in Swarm"
            )

    def _resolve_ports(
        self, specs: tuple[PortSpec, ...], owner: str | None
    ) -> tuple[PortConfig, ...]:
        """Fill in published ports and refuse ports another service has published."""
        taken_here: set[tuple[str, int]] = set()
        resolved: list[PortConfig] = []
        for spec in specs:
            published = spec.published_port
            if published is None:
                published = self._free_port(spec.protocol, taken_here)
            key = (spec.protocol, published)
            if key in taken_here:
                raise Invalid(f"port {published}/{spec.protocol} is published twice")
            holder = self._published.get(key)
            if holder is not None and holder != owner:
                raise Conflict(
                    f"port {published}/{spec.protocol} is already published by service {holder!r}",
                    code="port_in_use",
                )
            taken_here.add(key)
            resolved.append(
                PortConfig(
                    protocol=spec.protocol,
                    target_port=spec.target_port,
                    published_port=published,
                    publish_mode=spec.publish_mode,
                    traffic_policy=spec.traffic_policy,
                )
            )
        return tuple(resolved)

    def _free_port(self, protocol: str, taken_here: set[tuple[str, int]]) -> int:
        for port in AUTO_PORTS:
            if (protocol, port) not in self._published and (protocol, port) not in taken_here:
                return port
        raise Conflict(
            f"no free {protocol} port left in {AUTO_PORTS.start}-{AUTO_PORTS.stop - 1},"
            " the range published ports are picked from: give published_port, "
            "or remove a service that publishes one",
            code="port_in_use",
        )

    def _allocate_vips(
        self,
        name: str,
        mode: str,
        networks: tuple[str, ...],
        ports: tuple[PortConfig, ...],
        keep: tuple[Vip, ...],
    ) -> tuple[Vip, ...]:
        """One VIP per attached network, plus one on ingress for ingress ports (Swarm)."""
        if mode != "vip":
            return ()
        wanted = list(networks)
        if any(p.publish_mode == "ingress" for p in ports):
            wanted.append(INGRESS)
        kept = {v.network: v for v in keep}
        vips: list[Vip] = []
        try:
            for network in wanted:
                old = kept.get(network)
                if old is not None and not self.ipam.is_claimed(
                    network, ipaddress.IPv4Address(old.address)
                ):
                    self.ipam.claim(network, ipaddress.IPv4Address(old.address))
                    vips.append(old)
                else:
                    vips.append(Vip(network=network, address=str(self.ipam.allocate(network))))
        except Exception:
            for vip in vips:
                self.ipam.release(vip.network, [ipaddress.IPv4Address(vip.address)])
            raise
        # Claimed for real again by _put when the record is written.
        for vip in vips:
            self.ipam.release(vip.network, [ipaddress.IPv4Address(vip.address)])
        return tuple(vips)


def _check_health_port(check: HealthCheck | None, ports: tuple[PortConfig, ...]) -> None:
    if check is not None and check.type != "ttl" and check.port is None and not ports:
        raise Invalid(
            f"a {check.type} health check needs a port: give health_check.port, "
            "or publish a port (its target port is checked)"
        )


def _parse_task_address(text: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise Invalid(
            f"task address {text!r} is not an IP address", code="invalid_address"
        ) from None
    if not isinstance(address, ipaddress.IPv4Address):
        raise Invalid(
            f"task address {text!r}: only IPv4 is supported for now", code="invalid_address"
        )
    if address.is_unspecified or address.is_multicast:
        raise Invalid(f"task address {text!r} cannot receive connections", code="invalid_address")
    return str(address)


def _check_encrypted(spec: NetworkSpec) -> None:
    """`--opt encrypted` is an overlay's (its VXLAN between nodes becomes ESP);
    another driver's traffic never crosses an overlay, so there it is refused."""
    try:
        encrypted = esp.is_encrypted(spec.options)
    except esp.EspError as exc:
        raise Invalid(str(exc)) from None
    if encrypted and spec.driver != "overlay":
        raise Invalid(
            f"--opt encrypted is an overlay network's option, not a {spec.driver} network's "
            "(it encrypts the VXLAN traffic between nodes)",
            code="encrypted_needs_overlay",
        )

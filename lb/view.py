"""The L4 table this node should program, kept in step with the state: a sans-IO view.

`LbView` is fed the state's change feed (`load(records)`, then `on_change(change)`
for every change, as `dns.table.NameTable` is) and answers each change with the
`lb.table` ops that bring the table up to date. One task changing touches only
the (virtual service, real server) pairs that task contributes: a constant
number of ops, and work independent of how many tasks the service has.

What the table holds, for the node named at construction:

- per `vip`-mode service, per VIP (every network, `ingress` included) and per
  service port: a virtual service `(protocol, VIP, target_port)`;
- per port published in `ingress` mode (either endpoint mode): a virtual
  service `(protocol, ANY_ADDRESS, published_port)` over the service's tasks on
  every node: the routing mesh;
- per port published in `host` mode: the same key, but only over this node's
  own tasks, and only while this node has one (a node without a task does not
  answer on that port, as in Swarm);
- per port published with `traffic_policy="local"` (ingress mode): the same key,
  on every node, but only over this node's own tasks, with `options.local` set
  (the backends do not masquerade it); a node without a local healthy task keeps
  the key with no real, so it refuses (RST) rather than forward;
- real servers: `(task address, task.actual_port(target_port))`, where a
  sandboxed task's address under a VIP is its endpoint's address on that VIP's
  network (`task_address`; a task on two networks is reached through each VIP
  at its address there) and under a published port its first address, or, for a
  task of another node with an endpoint on `ingress` (an overlay every node
  serves), its address there. A running,
  healthy task has its weight (`Service.weight_of`: the service's override, else
  the task's own, 1 unless given; 0 drains it); a draining one weight 0 (its
  connections finish, new ones go elsewhere); an unhealthy or still starting
  one is left out. That is the rule DNS uses (`tasks.<service>` lists running,
  healthy tasks only), so DNS and the load balancer never disagree about who
  takes new traffic.

Options come from service labels (docs/lb.md): `mesh.lb.scheduler=rr|wrr|lc|maglev`,
`mesh.lb.proxy_protocol=v2`, `mesh.lb.affinity=client-ip[:TIMEOUT]` and
`mesh.lb.locality=prefer-local`. A label with a value the view does not know is
ignored (the default applies) and counted in `invalid_labels`.

Locality (`prefer-local`) is the view's alone, no backend sees it: on a VIP key
of such a service, while a real of one of this node's tasks takes new
connections, every other real is programmed with weight 0 (it keeps the
connections it has, takes no new ones); when the node has none left, they get
their weights back. Such a key is recomputed whole on each change of its reals
(O(its reals), for these services only), as the local/remote split is per key.

Two services claiming one key (a published port merged from two nodes before
the store's conflict check could see both) is settled deterministically: the
service with the smaller name owns the key, the other's claim waits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace

from lb.table import (
    ANY_ADDRESS,
    DeleteReal,
    Op,
    PutReal,
    Real,
    Scheduler,
    ServiceOptions,
    Table,
    VirtualKey,
    VirtualService,
    diff,
)
from mesh.core.model import INGRESS, Change, Health, Record, Service, Task, TaskState

SCHEDULER_LABEL = "mesh.lb.scheduler"
PROXY_PROTOCOL_LABEL = "mesh.lb.proxy_protocol"
LOCALITY_LABEL = "mesh.lb.locality"
PREFER_LOCAL = "prefer-local"
AFFINITY_LABEL = "mesh.lb.affinity"
#: Seconds a client idle that long loses its affinity, when the label names none (kube-proxy's).
DEFAULT_AFFINITY_TIMEOUT = 10800
#: The longest affinity timeout (a day): IPVS and nftables take seconds in 32 bits, but
#: an affinity that outlives a day only pins clients after their task is long gone.
MAX_AFFINITY_TIMEOUT = 86400
#: Scheduler label values beside the enum's own (`mh` is IPVS's name for Maglev).
SCHEDULER_ALIASES = {"maglev": Scheduler.MAGLEV}


@dataclass(frozen=True, slots=True)
class Claim:
    """A service's claim on one virtual service key."""

    options: ServiceOptions
    #: a host-mode published port: present only while it has a real server
    host_only: bool = False
    #: a VIP key of a `prefer-local` service: this node's tasks first (module doc)
    prefer_local: bool = False


def parse_affinity(text: str) -> int:
    """`client-ip[:TIMEOUT]` (or `none`) as seconds of affinity (0: none); ValueError if bad."""
    value = text.strip().lower()
    if value in ("", "none", "off"):
        return 0
    kind, _, timeout = value.partition(":")
    if kind != "client-ip":
        raise ValueError(f"affinity {text!r}: expected client-ip[:TIMEOUT] or none")
    if not timeout:
        return DEFAULT_AFFINITY_TIMEOUT
    digits = timeout[:-1] if timeout.endswith("s") else timeout
    if not digits.isascii() or not digits.isdigit():
        raise ValueError(f"affinity timeout {timeout!r} is not a number of seconds")
    seconds = int(digits)
    if not 1 <= seconds <= MAX_AFFINITY_TIMEOUT:
        raise ValueError(f"affinity timeout {seconds} s is not in 1..{MAX_AFFINITY_TIMEOUT}")
    return seconds


def parse_scheduler(text: str) -> Scheduler:
    """A scheduler label value (`rr`, `wrr`, `lc`, `maglev` or `mh`); ValueError if unknown."""
    value = text.strip().lower()
    return SCHEDULER_ALIASES.get(value) or Scheduler(value)


def service_options(
    service: Service, problems: Counter[str] | None = None, *, proxy_supported: bool = True
) -> ServiceOptions:
    """The balancing options a service's labels ask for (unknown values: the default).

    `proxy_supported=False` (a kernel backend): the PROXY label is refused, not
    programmed; `lb.policy.lb_problems` shows it as a problem on the service.
    """
    scheduler = Scheduler.ROUND_ROBIN
    text = service.labels.get(SCHEDULER_LABEL)
    if text is not None:
        try:
            scheduler = parse_scheduler(text)
        except ValueError:
            if problems is not None:
                problems[SCHEDULER_LABEL] += 1
    affinity = 0
    text = service.labels.get(AFFINITY_LABEL)
    if text is not None:
        try:
            affinity = parse_affinity(text)
        except ValueError:
            if problems is not None:
                problems[AFFINITY_LABEL] += 1
    proxy = False
    text = service.labels.get(PROXY_PROTOCOL_LABEL)
    if text is not None:
        value = text.strip().lower()
        if value in ("v2", "2"):
            proxy = proxy_supported
        elif value not in ("", "off", "none", "false", "0") and problems is not None:
            problems[PROXY_PROTOCOL_LABEL] += 1
    return ServiceOptions(scheduler=scheduler, proxy_protocol=proxy, affinity=affinity)


def prefers_local(service: Service, problems: Counter[str] | None = None) -> bool:
    """Whether the service asks for `mesh.lb.locality=prefer-local` (other values: no)."""
    text = service.labels.get(LOCALITY_LABEL)
    if text is None:
        return False
    value = text.strip().lower()
    if value == PREFER_LOCAL:
        return True
    if value not in ("", "any", "none") and problems is not None:
        problems[LOCALITY_LABEL] += 1
    return False


def service_claims(
    service: Service, options: ServiceOptions, *, prefer_local: bool = False
) -> dict[VirtualKey, Claim]:
    """Every key a service claims on any node (host-mode keys show up only with a real)."""
    claims: dict[VirtualKey, Claim] = {}
    if service.endpoint_mode == "vip":
        for vip in service.vips:
            for port in service.ports:
                claims[VirtualKey(port.protocol, vip.address, port.target_port)] = Claim(
                    options, prefer_local=prefer_local
                )
    for port in service.ports:
        key = VirtualKey(port.protocol, ANY_ADDRESS, port.published_port)
        local = port.traffic_policy == "local"
        claims[key] = Claim(
            replace(options, local=True) if local else options,
            host_only=port.publish_mode == "host",
        )
    return claims


def task_weight(service: Service, task: Task) -> int | None:
    """The weight of a task's real servers, or None when it takes no traffic at all."""
    if task.health is Health.UNHEALTHY:
        return None
    if task.state is TaskState.DRAINING:
        return 0
    return service.weight_of(task) if task.health is Health.HEALTHY else None


def prefer_local_reals(reals: dict[Real, int], local: set[Real]) -> dict[Real, int]:
    """`prefer-local`: while a local real takes new connections, the others drain."""
    if any(reals.get(real, 0) > 0 for real in local):
        return {real: weight if real in local else 0 for real, weight in reals.items()}
    return reals


def task_address(task: Task, network: str) -> str:
    """The task's address on `network`: a sandboxed task's endpoint there, else `address`."""
    return task.address_on(network)


def task_entries(service: Service, task: Task, node: str) -> list[tuple[VirtualKey, Real, int]]:
    """The (key, real, weight) entries one task contributes to this node's table."""
    weight = task_weight(service, task)
    if weight is None:
        return []
    entries: list[tuple[VirtualKey, Real, int]] = []
    for port in service.ports:
        target = task.actual_port(port.target_port)
        # A task of another node is reached at its ingress endpoint when it has one
        # (every node serves that overlay); one of this node at its first address, so
        # a flow to it keeps the client's address.
        real = Real(task.address if task.node == node else task.address_on(INGRESS), target)
        if service.endpoint_mode == "vip":
            for vip in service.vips:
                address = task_address(task, vip.network)
                # the same object as `real` where it is the same real (a local task
                # without a sandbox): every table holding both keeps one object, not two
                at = real if address == real.address else Real(address, target)
                entries.append(
                    (VirtualKey(port.protocol, vip.address, port.target_port), at, weight)
                )
        mine_only = port.publish_mode == "host" or port.traffic_policy == "local"
        if task.node == node or not mine_only:
            entries.append(
                (VirtualKey(port.protocol, ANY_ADDRESS, port.published_port), real, weight)
            )
    return entries


def wants_proxy_protocol(service: Service) -> bool:
    """Whether the service's labels ask for PROXY protocol v2 towards its tasks."""
    return service_options(service).proxy_protocol


def build_table(records: Iterable[Record], node: str, *, proxy_supported: bool = True) -> Table:
    """The table from scratch, for `node`: what `LbView` must equal after any changes."""
    services: dict[str, Service] = {}
    tasks: list[Task] = []
    for record in records:
        if record.deleted:
            continue
        if isinstance(record, Service):
            services[record.name.lower()] = record
        elif isinstance(record, Task):
            tasks.append(record)
    owners: dict[VirtualKey, tuple[str, Claim]] = {}
    for name in sorted(services, reverse=True):  # the smallest name is written last: it wins
        service = services[name]
        claims = service_claims(
            service,
            service_options(service, proxy_supported=proxy_supported),
            prefer_local=prefers_local(service),
        )
        for key, claim in claims.items():
            owners[key] = (name, claim)
    reals: dict[VirtualKey, dict[Real, int]] = {key: {} for key in owners}
    local: dict[VirtualKey, set[Real]] = {key: set() for key in owners}
    for task in tasks:
        name = task.service.lower()
        owner_service = services.get(name)
        if owner_service is None:
            continue
        for key, real, weight in task_entries(owner_service, task, node):
            if owners[key][0] == name:
                reals[key][real] = max(weight, reals[key].get(real, weight))
                if task.node == node:
                    local[key].add(real)
    return {
        key: VirtualService(
            key,
            claim.options,
            prefer_local_reals(reals[key], local[key]) if claim.prefer_local else reals[key],
        )
        for key, (_, claim) in owners.items()
        if reals[key] or not claim.host_only
    }


#: One real's tasks and their weights: (task id, weight) for the one task most reals have
#: (a dict of one costs ~180 bytes, three per task: ~1.5 MB at 10,000 tasks), else a dict
#: task id -> weight (two tasks may share an endpoint).
TaskWeights = tuple[str, int] | dict[str, int]


def with_task(held: TaskWeights | None, task_id: str, weight: int) -> TaskWeights:
    if held is None or (isinstance(held, tuple) and held[0] == task_id):
        return (task_id, weight)
    if isinstance(held, tuple):
        return {held[0]: held[1], task_id: weight}
    held[task_id] = weight
    return held


def without_task(held: TaskWeights | None, task_id: str) -> TaskWeights | None:
    """What is left of `held` without `task_id` (None: nothing)."""
    if held is None:
        return None
    if isinstance(held, tuple):
        return None if held[0] == task_id else held
    held.pop(task_id, None)
    if len(held) == 1:
        return next(iter(held.items()))
    return held or None


def top_weight(held: TaskWeights) -> int:
    return held[1] if isinstance(held, tuple) else max(held.values())


def task_ids(held: TaskWeights) -> Iterable[str]:
    return (held[0],) if isinstance(held, tuple) else held


class LbView:
    """This node's L4 table, fed changes, answering each with the ops that follow it."""

    def __init__(self, node: str, *, proxy_supported: bool = True) -> None:
        self.node = node
        #: False on a kernel backend: the PROXY label is refused (a problem on the service)
        self.proxy_supported = proxy_supported
        self._services: dict[str, Service] = {}  # by lower-cased name
        self._tasks: dict[str, Task] = {}  # by id
        self._tasks_by_service: dict[str, set[str]] = {}
        # VIP address -> service name -> the VIP's network (for `vip_network`)
        self._vip_networks: dict[str, dict[str, str]] = {}
        # key -> service name -> its claim
        self._claims: dict[VirtualKey, dict[str, Claim]] = {}
        # key -> service name -> real -> its tasks' weights (two tasks may share an endpoint)
        self._weights: dict[VirtualKey, dict[str, dict[Real, TaskWeights]]] = {}
        # what the ops emitted so far have programmed
        self._options: dict[VirtualKey, ServiceOptions] = {}
        self._reals: dict[VirtualKey, dict[Real, int]] = {}
        #: label values ignored, by label
        self.invalid_labels: Counter[str] = Counter()
        # keys whose claims changed (recomputed whole) and single reals touched
        self._dirty_keys: set[VirtualKey] = set()
        self._dirty_reals: dict[VirtualKey, set[Real]] = {}

    def __repr__(self) -> str:
        return (
            f"<LbView node={self.node} services={len(self._services)} "
            f"tasks={len(self._tasks)} virtual={len(self._reals)}>"
        )

    # -- what it holds ----------------------------------------------------------

    def table(self) -> Table:
        """The table as the ops so far have made it (a copy)."""
        return {
            key: VirtualService(key, self._options[key], dict(reals))
            for key, reals in self._reals.items()
        }

    def vip_network(self, address: str) -> str | None:
        """The network of a VIP address in the current state (None: no service has it).

        A sandbox's LB (`lb/sandbox.py`) programs only the VIPs of its networks.
        Two services claiming one VIP is settled as keys are: the smaller name wins.
        """
        owners = self._vip_networks.get(address)
        return owners[min(owners)] if owners else None

    def service_of(self, key: VirtualKey) -> str | None:
        """The name of the service that owns a virtual service now (None: no one's)."""
        owner = self._owner(key)
        if owner is None:
            return None
        service = self._services.get(owner[0])
        return service.name if service is not None else None

    def service_names(self) -> set[str]:
        """The names of the services in the state (as they are spelled there)."""
        return {service.name for service in self._services.values()}

    def services(self) -> list[Service]:
        """The services in the state, by name."""
        return [self._services[name] for name in sorted(self._services)]

    def service(self, name: str) -> Service | None:
        return self._services.get(name.lower())

    def healthy_tasks(self, name: str) -> tuple[int, int]:
        """(on this node, on every node): the service's tasks taking new connections."""
        here = everywhere = 0
        service = self._services.get(name.lower())
        if service is None:
            return here, everywhere
        for task_id in self._tasks_by_service.get(name.lower(), ()):
            task = self._tasks[task_id]
            if task_weight(service, task):  # healthy, running, weight > 0
                everywhere += 1
                here += task.node == self.node
        return here, everywhere

    # -- feeding ----------------------------------------------------------------

    def load(self, records: Iterable[Record]) -> list[Op]:
        """Take a snapshot; the ops that program it from an empty table."""
        for record in records:
            self._add(record)
        return self._flush()

    def on_change(self, change: Change) -> list[Op]:
        """Take one change; the ops (in order) that bring the table up to date."""
        if change.before is not None and not change.before.deleted:
            self._remove(change.before)
        if not change.after.deleted:
            self._add(change.after)
        return self._flush()

    def _add(self, record: Record) -> None:
        if record.deleted:
            return
        if isinstance(record, Service):
            name = record.name.lower()
            self._services[name] = record
            for vip in record.vips:
                self._vip_networks.setdefault(vip.address, {})[name] = vip.network
            for key, claim in service_claims(
                record,
                service_options(record, self.invalid_labels, proxy_supported=self.proxy_supported),
                prefer_local=prefers_local(record, self.invalid_labels),
            ).items():
                self._claims.setdefault(key, {})[name] = claim
                self._dirty_keys.add(key)
            for task_id in self._tasks_by_service.get(name, ()):
                self._contribute(record, self._tasks[task_id], add=True)
        elif isinstance(record, Task):
            name = record.service.lower()
            self._tasks[record.id] = record
            self._tasks_by_service.setdefault(name, set()).add(record.id)
            service = self._services.get(name)
            if service is not None:
                self._contribute(service, record, add=True)

    def _remove(self, record: Record) -> None:
        if isinstance(record, Service):
            name = record.name.lower()
            service = self._services.pop(name, None)
            if service is None:
                return
            for task_id in self._tasks_by_service.get(name, ()):
                self._contribute(service, self._tasks[task_id], add=False)
            for vip in service.vips:
                owners = self._vip_networks.get(vip.address, {})
                owners.pop(name, None)
                if not owners:
                    self._vip_networks.pop(vip.address, None)
            for key in service_claims(service, ServiceOptions()):
                claims = self._claims.get(key, {})
                claims.pop(name, None)
                if not claims:
                    self._claims.pop(key, None)
                self._dirty_keys.add(key)
        elif isinstance(record, Task):
            task = self._tasks.pop(record.id, None)
            if task is None:
                return
            name = task.service.lower()
            siblings = self._tasks_by_service.get(name)
            if siblings is not None:
                siblings.discard(task.id)
                if not siblings:
                    del self._tasks_by_service[name]
            service = self._services.get(name)
            if service is not None:
                self._contribute(service, task, add=False)

    def _contribute(self, service: Service, task: Task, *, add: bool) -> None:
        name = service.name.lower()
        for key, real, weight in task_entries(service, task, self.node):
            by_service = self._weights.setdefault(key, {})
            by_real = by_service.setdefault(name, {})
            if add:
                by_real[real] = with_task(by_real.get(real), task.id, weight)
            elif (left := without_task(by_real.get(real), task.id)) is not None:
                by_real[real] = left
            else:
                by_real.pop(real, None)
                if not by_real:
                    del by_service[name]
                    if not by_service:
                        del self._weights[key]
            self._dirty_reals.setdefault(key, set()).add(real)

    # -- turning dirty entries into ops -----------------------------------------------

    def _owner(self, key: VirtualKey) -> tuple[str, Claim] | None:
        claims = self._claims.get(key)
        if not claims:
            return None
        name = min(claims)
        return name, claims[name]

    def _weight(self, key: VirtualKey, owner: str, real: Real) -> int | None:
        by_task = self._weights.get(key, {}).get(owner, {}).get(real)
        return None if by_task is None else top_weight(by_task)

    def _is_local(self, task_id: str) -> bool:
        task = self._tasks.get(task_id)
        return task is not None and task.node == self.node

    def _wanted(self, key: VirtualKey) -> VirtualService | None:
        owner = self._owner(key)
        if owner is None:
            return None
        name, claim = owner
        by_real = self._weights.get(key, {}).get(name, {})
        reals = {real: top_weight(by_task) for real, by_task in by_real.items()}
        if claim.prefer_local:
            local = {
                r for r, by_task in by_real.items() if any(map(self._is_local, task_ids(by_task)))
            }
            reals = prefer_local_reals(reals, local)
        if claim.host_only and not reals:
            return None
        return VirtualService(key, claim.options, reals)

    def _flush(self) -> list[Op]:
        ops: list[Op] = []
        whole = self._dirty_keys
        for key, reals in self._dirty_reals.items():
            if key not in whole and not self._update_reals(key, reals, ops):
                whole.add(key)
        for key in sorted(whole):
            self._update_whole(key, ops)
        self._dirty_keys = set()
        self._dirty_reals = {}
        return ops

    def _update_reals(self, key: VirtualKey, reals: set[Real], ops: list[Op]) -> bool:
        """Update single reals of a key that stays; False when the key must be redone whole."""
        programmed = self._reals.get(key)
        owner = self._owner(key)
        if programmed is None or owner is None:
            return False
        name, claim = owner
        if claim.prefer_local:
            return False  # one real's change may move the others' weights: redo the key
        for real in sorted(reals):
            weight = self._weight(key, name, real)
            if weight is None:
                if programmed.pop(real, None) is not None:
                    ops.append(DeleteReal(key, real))
            elif programmed.get(real) != weight:
                programmed[real] = weight
                ops.append(PutReal(key, real, weight))
        # A host-mode port whose last local task left goes away whole.
        return not (claim.host_only and not programmed)

    def _update_whole(self, key: VirtualKey, ops: list[Op]) -> None:
        wanted = self._wanted(key)
        programmed = self._reals.get(key)
        found: Table = (
            {} if programmed is None else {key: VirtualService(key, self._options[key], programmed)}
        )
        ops.extend(diff(found, {} if wanted is None else {key: wanted}))
        if wanted is None:
            self._reals.pop(key, None)
            self._options.pop(key, None)
        else:
            self._reals[key] = dict(wanted.reals)
            self._options[key] = wanted.options

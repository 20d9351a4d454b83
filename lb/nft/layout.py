"""The sans-IO core of the nftables backend: what is programmed, and the commands that change it.

`Layout` mirrors the backend's nftables table. Each virtual service owns:

- a chain `svc_<id>` holding one rule: `dnat ip to numgen inc mod N map @slots_<id>`
  (or `reject` while no real takes new connections); the rule's comment keeps
  the service options (`meshplane sched=rr proxy=0`) so `read()` gives them back;
- a map `slots_<id>`: slot number -> real `address . port`, the round-robin ring;
- a map `weights_<id>`: real `address . port` -> weight, every real including
  the draining ones (weight 0 has no slot, so no new connection reaches it,
  while conntrack keeps the flows it already has going);
- a named counter `conns_<id>`, which the service chain's rule bumps: only the
  first packet of a connection (or UDP flow) reaches a nat chain, so its packets
  are the service's new connections (its bytes, the first packets' only, mean
  nothing). Named, so that rewriting the rule keeps the count;
- one element in the dispatch map `vips` (`daddr . l4proto . dport : goto svc_<id>`)
  or `published` (`l4proto . dport : goto svc_<id>`, matched only for packets to
  a local address: `fib daddr type local`).

Maglev (`mh`): the slots map is `lb.maglev`'s lookup table (M entries, M prime,
see `lb.maglev.table_size`), the rule `dnat ip to jhash ip saddr . <proto> sport mod M
map @slots_<id>`; a change rewrites only the entries whose real changed (about
M/N of them). Session affinity (`affinity` seconds), as kube-proxy's nftables
mode does it (nft cannot store a map lookup's result from the packet path): per
real taking new connections, a set `aff_<id>_<real>` of client addresses with
timeouts. The service chain has per real a rule "source in its set: renew the
entry (`update`), DNAT to it", then per real a rule "the client's address hashes
(`jhash ip saddr`) into its share: add the client to its set, DNAT to it", and
last the plain balancing rule, reached only when a set is full (`AFFINITY_SIZE`).
A real that leaves or drains takes its set with it (its clients pick again; the
others keep theirs). The chain is rewritten on every change of its reals: O(N)
for a service with affinity, as kube-proxy's.

Weights: `wrr` gives each real its share of the slots (`lb/nft/slots.py`:
weights reduced by their gcd, exact up to 16,384 slots, within one slot of the
quota beyond), `rr` one slot per real of weight > 0, as IPVS's rr ignores
weights. `lc` is refused (`LayoutError`): nftables keeps no per-real connection
count a rule can read, and balancing round-robin under that name would be a lie.
Removing slots moves the last ones into the holes (swap with last), so a change
rewrites only the elements whose real changed plus the one rule whose modulus
changed: O(slots changed), not O(service). (Under `wrr` a change that moves the
gcd, or a capped map's apportionment, changes other reals' slots too.)

Everything here is pure: `Layout.plan(op)` returns nft commands (text syntax,
see `lb/nft/__init__.py` for why not JSON) and changes the mirror;
`lb.nft.listing.parse_listing` turns `nft -j list table` back into a Layout.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

from lb import maglev
from lb.nft.base import DEFAULT_MASQUERADE_MARK
from lb.nft.slots import interleave, slot_counts
from lb.table import (
    DeleteService,
    Op,
    PutReal,
    PutService,
    Real,
    Scheduler,
    ServiceOptions,
    Table,
    VirtualKey,
    VirtualService,
)

#: The largest weight (a task's, `mesh.core.model.MAX_TASK_WEIGHT`); bigger ones are refused.
MAX_WEIGHT = 1000
#: nft commands carry at most this many map elements each (one line of `nft -f`).
ELEMENTS_PER_COMMAND = 2048
COMMENT_PREFIX = "meshplane"
VIPS_MAP = "vips"
PUBLISHED_MAP = "published"
ENDPOINTS_SET = "endpoints"
#: Clients one real's affinity set holds; past it a client is balanced without affinity.
AFFINITY_SIZE = 65536
#: The jhash seed: fixed, so every node (and every restart) hashes a flow alike.
HASH_SEED = 0x6D657368

#: A real server's `address . protocol . port`, as the `endpoints` set holds it.
Endpoint: TypeAlias = tuple[str, str, int]


class LayoutError(Exception):
    """An op the layout cannot program (bad value, or a real under a missing service)."""


@dataclass
class ServiceLayout:
    key: VirtualKey
    options: ServiceOptions = field(default_factory=ServiceOptions)
    weights: dict[Real, int] = field(default_factory=dict)
    slots: list[Real] = field(default_factory=list)
    #: real -> its slot numbers, ascending (the inverse of `slots`, so a change finds
    #: them in O(1) and gives up its highest first)
    positions: dict[Real, list[int]] = field(default_factory=dict)
    #: real -> how many slots its weight and the scheduler ask for (`recount`)
    counts: dict[Real, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.slots and not self.positions:
            self.reindex()
        self.recount()

    def recount(self, changed: Real | None = None) -> set[Real]:
        """Recompute the reals' wanted slots; the reals whose number changed.

        Under `rr` a real's slots depend on its own weight only: with `changed`
        given, only that real is looked at (O(1): a change among 10,000 reals costs
        what it costs among 10). Under `wrr` every real's may move (the gcd, the cap).
        """
        weighted = self.options.scheduler == Scheduler.WEIGHTED_ROUND_ROBIN
        if changed is not None and not weighted:
            want = 1 if self.weights.get(changed, 0) > 0 else 0
            if self.counts.get(changed, 0) == want:
                return set()
            if want:
                self.counts[changed] = want
            else:
                self.counts.pop(changed, None)
            return {changed}
        new = slot_counts(
            self.weights, weighted=self.options.scheduler == Scheduler.WEIGHTED_ROUND_ROBIN
        )
        old = self.counts
        self.counts = new
        return {real for real in old.keys() | new.keys() if old.get(real, 0) != new.get(real, 0)}

    def reindex(self) -> None:
        self.positions = {}
        for index, real in enumerate(self.slots):
            self.positions.setdefault(real, []).append(index)

    def copy(self) -> ServiceLayout:
        return ServiceLayout(
            self.key,
            self.options,
            dict(self.weights),
            list(self.slots),
            {r: list(p) for r, p in self.positions.items()},
            dict(self.counts),
        )

    def service(self) -> VirtualService:
        return VirtualService(self.key, self.options, dict(self.weights))

    def maglev_table(self) -> list[Real]:
        """The Maglev lookup table the weights ask for (its size kept while big enough)."""
        ready = [r for r, w in self.weights.items() if w > 0]
        size = maglev.table_size(len(ready), len(self.slots) or None)
        return maglev.build(ready, size)

    def wanted_slots(self, real: Real) -> int:
        return self.counts.get(real, 0)

    def consistent(self) -> bool:
        """Whether the slots are what the weights and scheduler ask for (a repaired leftover)."""
        if self.options.scheduler is Scheduler.MAGLEV:
            return self.slots == self.maglev_table()
        counts: dict[Real, int] = {}
        for real in self.slots:
            counts[real] = counts.get(real, 0) + 1
        return (
            all(counts.get(r, 0) == self.wanted_slots(r) for r in self.weights)
            and counts.keys() <= self.weights.keys()
        )


# -- names ----------------------------------------------------------------------


def service_id(key: VirtualKey) -> str:
    where = "any" if key.published else key.address.replace(".", "_")
    return f"{key.protocol}_{where}_{key.port}"


def chain_name(key: VirtualKey) -> str:
    return f"svc_{service_id(key)}"


def slots_map(key: VirtualKey) -> str:
    return f"slots_{service_id(key)}"


def weights_map(key: VirtualKey) -> str:
    return f"weights_{service_id(key)}"


def counter_name(key: VirtualKey) -> str:
    return f"conns_{service_id(key)}"


def affinity_set(key: VirtualKey, real: Real) -> str:
    return f"aff_{service_id(key)}_{real.address.replace('.', '_')}_{real.port}"


def options_comment(options: ServiceOptions) -> str:
    text = f"{COMMENT_PREFIX} sched={options.scheduler.value} proxy={int(options.proxy_protocol)}"
    # `aff=` and `local=1` only when set, so the rules of services without them read
    # as an older version wrote them
    text += f" aff={options.affinity}" if options.affinity else ""
    return text + (" local=1" if options.local else "")


def parse_options_comment(comment: str) -> ServiceOptions | None:
    words = comment.split()
    if not words or words[0] != COMMENT_PREFIX:
        return None
    fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    try:
        return ServiceOptions(
            Scheduler(fields.get("sched", "rr")),
            fields.get("proxy") == "1",
            int(fields.get("aff", "0")),
            local=fields.get("local") == "1",
        )
    except ValueError:
        return None


# -- validation -----------------------------------------------------------------


def _check_ipv4(address: str, what: str, *, allow_any: bool = False) -> None:
    try:
        parsed = ipaddress.IPv4Address(address)
    except ValueError:
        raise LayoutError(f"{what} {address!r} is not an IPv4 address") from None
    if parsed.is_unspecified and not allow_any:
        raise LayoutError(f"{what} {address!r} cannot be the unspecified address")
    if str(parsed) != address:
        raise LayoutError(f"{what} {address!r} is not in canonical form ({parsed})")


def _check_port(port: object, what: str) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise LayoutError(f"{what} port {port!r} is not in 1..65535")


def check_options(key: VirtualKey, options: ServiceOptions) -> None:
    if options.scheduler == Scheduler.LEAST_CONNECTIONS:
        raise LayoutError(
            f"{key}: the nftables backend cannot balance by least connections (lc): "
            "nftables keeps no per-real connection count a rule can read; use rr or wrr "
            "on this node, or run it with --lb ipvs or --lb userspace"
        )


def check_key(key: VirtualKey) -> None:
    if key.protocol not in ("tcp", "udp"):
        raise LayoutError(f"{key}: protocol {key.protocol!r} is not tcp or udp")
    _check_ipv4(key.address, f"{key}: address", allow_any=True)
    _check_port(key.port, f"{key}:")


def check_real(key: VirtualKey, real: Real, weight: int) -> None:
    _check_ipv4(real.address, f"{key} real")
    _check_port(real.port, f"{key} real {real.address}")
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
        raise LayoutError(
            f"{key} real {real}: weight {weight!r} is not in 0..{MAX_WEIGHT} "
            "(the nftables backend expands weights into map slots)"
        )


# -- commands -------------------------------------------------------------------


class Layout:
    """The mirror of one nftables table of the backend, and the commands that change it."""

    def __init__(
        self,
        table: str,
        services: Mapping[VirtualKey, ServiceLayout] | None = None,
        *,
        mark: int = DEFAULT_MASQUERADE_MARK,
    ) -> None:
        self.table = table
        self.mark = mark
        self.services: dict[VirtualKey, ServiceLayout] = dict(services or {})
        #: services refused (lc), with why: their reals' ops are refused with the same reason
        self.refused: dict[VirtualKey, str] = {}
        self._undo: dict[VirtualKey, ServiceLayout | None] | None = None
        # wrr services whose ring is rewoven once at the end of a batch (`defer`), and
        # whether their rule must be rewritten whatever the ring's length
        self._deferred: dict[VirtualKey, bool] | None = None
        #: `address . protocol . port` of every real, with how many services have it
        self.endpoints: dict[Endpoint, int] = {}
        self.count_endpoints()

    def count_endpoints(self) -> None:
        self.endpoints = {}
        for key, layout in self.services.items():
            for real in layout.weights:
                end = (real.address, key.protocol, real.port)
                self.endpoints[end] = self.endpoints.get(end, 0) + 1

    def _endpoint(self, key: VirtualKey, real: Real, change: int) -> list[str]:
        """Count a real in or out of the `endpoints` set: a command when it enters or leaves."""
        end = (real.address, key.protocol, real.port)
        count = self.endpoints.get(end, 0) + change
        if count > 0:
            self.endpoints[end] = count
        else:
            self.endpoints.pop(end, None)
        element = f"{ENDPOINTS_SET} {{ {real.address} . {key.protocol} . {real.port} }}"
        if change > 0 and count == 1:
            return [f"add element ip {self.table} {element}"]
        if change < 0 and count == 0:
            return [f"delete element ip {self.table} {element}"]
        return []

    def to_table(self) -> Table:
        return {key: layout.service() for key, layout in self.services.items()}

    # The undo log: `plan` saves a service before it first changes it.
    def begin(self) -> None:
        self._undo = {}
        self._deferred = None

    def defer(self) -> None:
        """Until `flush_deferred`, reweave each `wrr` ring once, not once per op: a batch of
        300 weights would otherwise rewrite a ring of thousands of slots 300 times."""
        self._deferred = {}

    def flush_deferred(self) -> list[str]:
        """The slot commands of the rings deferred since `defer` (and stop deferring)."""
        deferred, self._deferred = self._deferred or {}, None
        commands: list[str] = []
        for key, rebuild in sorted(deferred.items()):
            layout = self.services.get(key)
            if layout is not None:
                commands += self._reslot(layout, (), rebuild=rebuild)
        return commands

    def rollback(self) -> None:
        for key, saved in (self._undo or {}).items():
            if saved is None:
                self.services.pop(key, None)
            else:
                self.services[key] = saved
        self._undo = {}
        self._deferred = None
        self.count_endpoints()

    def _save(self, key: VirtualKey) -> None:
        undo = self._undo
        if undo is not None and key not in undo:
            current = self.services.get(key)
            undo[key] = None if current is None else current.copy()

    def plan(self, op: Op) -> tuple[list[str], list[tuple[VirtualKey, Real]]]:
        """The commands for `op` (applied to the mirror), and the (service, real) flows to flush."""
        check_key(op.key)
        if isinstance(op, PutService):
            try:
                check_options(op.key, op.options)
            except LayoutError as exc:
                self.refused[op.key] = str(exc)
                raise
            self.refused.pop(op.key, None)
            return self._put_service(op.key, op.options), []
        if isinstance(op, DeleteService):
            self.refused.pop(op.key, None)
        elif op.key in self.refused and op.key not in self.services:
            raise LayoutError(self.refused[op.key])
        if isinstance(op, DeleteService):
            return self._delete_service(op.key)
        if isinstance(op, PutReal):
            check_real(op.key, op.real, op.weight)
            return self._put_real(op.key, op.real, op.weight), []
        return self._delete_real(op.key, op.real)

    def _put_service(self, key: VirtualKey, options: ServiceOptions) -> list[str]:
        t = self.table
        current = self.services.get(key)
        self._save(key)
        if current is None:
            layout = self.services[key] = ServiceLayout(key, options)
            sid = service_id(key)
            element = (
                f"add element ip {t} {PUBLISHED_MAP} {{ {key.protocol} . {key.port} "
                f": goto svc_{sid} }}"
                if key.published
                else f"add element ip {t} {VIPS_MAP} {{ {key.address} . {key.protocol} . "
                f"{key.port} : goto svc_{sid} }}"
            )
            return [
                f"add map ip {t} slots_{sid} {{ typeof numgen inc mod 1 : "
                f"ip daddr . {key.protocol} dport ; }}",
                f"add map ip {t} weights_{sid} {{ type ipv4_addr . inet_service : mark ; }}",
                f"add counter ip {t} {counter_name(key)}",
                f"add chain ip {t} svc_{sid}",
                *self._rule(layout),
                element,
            ]
        if current.options == options:
            return []
        before = current.options.affinity
        current.options = options
        ready = [r for r, w in sorted(current.weights.items()) if w > 0]
        made = [] if before or not options.affinity else self._affinity_sets(key, ready, "add")
        gone = [] if not before or options.affinity else self._affinity_sets(key, ready, "delete")
        changed = current.recount() | set(current.weights)
        return [*made, *self._reslot(current, changed, rebuild=True), *gone]

    def _delete_service(self, key: VirtualKey) -> tuple[list[str], list[tuple[VirtualKey, Real]]]:
        current = self.services.get(key)
        if current is None:
            return [], []
        t = self.table
        self._save(key)
        del self.services[key]
        sid = service_id(key)
        element = (
            f"delete element ip {t} {PUBLISHED_MAP} {{ {key.protocol} . {key.port} }}"
            if key.published
            else f"delete element ip {t} {VIPS_MAP} {{ {key.address} . {key.protocol} . "
            f"{key.port} }}"
        )
        commands = [
            element,
            f"delete chain ip {t} svc_{sid}",
            f"delete map ip {t} slots_{sid}",
            f"delete map ip {t} weights_{sid}",
            f"delete counter ip {t} {counter_name(key)}",
        ]
        if current.options.affinity:
            ready = [r for r, w in sorted(current.weights.items()) if w > 0]
            commands += self._affinity_sets(key, ready, "delete")
        for real in sorted(current.weights):
            commands += self._endpoint(key, real, -1)
        return commands, [(key, real) for real in sorted(current.weights)]

    def _put_real(self, key: VirtualKey, real: Real, weight: int) -> list[str]:
        current = self.services.get(key)
        if current is None:
            raise LayoutError(f"{key} real {real}: no such virtual service")
        old = current.weights.get(real)
        if old == weight:
            return []
        self._save(key)
        t, wmap = self.table, weights_map(key)
        commands = self._endpoint(key, real, +1) if old is None else []
        if old is not None:
            commands.append(f"delete element ip {t} {wmap} {{ {real.address} . {real.port} }}")
        commands.append(f"add element ip {t} {wmap} {{ {real.address} . {real.port} : {weight} }}")
        current.weights[real] = weight
        affinity = current.options.affinity
        joins, leaves = not old and weight > 0, bool(old) and weight == 0
        if affinity and joins:
            commands += self._affinity_sets(key, [real], "add")
        commands += self._reslot(current, current.recount(real) | {real})
        if affinity:
            commands += self._rule(current)  # its rules name each real and its share
            if leaves:
                commands += self._affinity_sets(key, [real], "delete")
        return commands

    def _delete_real(
        self, key: VirtualKey, real: Real
    ) -> tuple[list[str], list[tuple[VirtualKey, Real]]]:
        current = self.services.get(key)
        if current is None or real not in current.weights:
            return [], []
        self._save(key)
        old = current.weights.pop(real)
        changed = current.recount(real) | {real}
        commands = [
            f"delete element ip {self.table} {weights_map(key)} {{ {real.address} . {real.port} }}",
            *self._endpoint(key, real, -1),
        ]
        commands += self._reslot(current, changed)
        if current.options.affinity and old:
            commands += [*self._rule(current), *self._affinity_sets(key, [real], "delete")]
        return commands, [(key, real)]

    def _reslot(
        self, layout: ServiceLayout, reals: Iterable[Real], *, rebuild: bool = False
    ) -> list[str]:
        """Give `reals` the slots their weights ask for, touching only the slots that change.

        `rr` (one slot per real): a real losing its slot gives it to the ring's last
        slot, which is dropped (swap with last); a real gaining one appends it.
        Cost: O(slots changed), whatever the size of the ring. `wrr`: `_reweave`.
        """
        if layout.options.scheduler is Scheduler.MAGLEV:
            return self._remaglev(layout, rebuild=rebuild)
        if layout.options.scheduler == Scheduler.WEIGHTED_ROUND_ROBIN:
            if self._deferred is not None:
                key = layout.key
                self._deferred[key] = self._deferred.get(key, False) or rebuild
                return []
            return self._reweave(layout, rebuild=rebuild)
        slots, positions = layout.slots, layout.positions
        before = len(slots)
        was: dict[int, Real | None] = {}  # slot -> its real before this change (None: new)

        def note(index: int) -> None:
            if index not in was:
                was[index] = slots[index] if index < len(slots) else None

        for real in sorted(set(reals)):
            mine = positions.setdefault(real, [])
            want = layout.wanted_slots(real)
            while len(mine) > want:
                index = mine.pop()  # its highest slot
                last = len(slots) - 1
                note(index)
                note(last)
                if index != last:
                    moved = slots[last]
                    slots[index] = moved
                    theirs = positions[moved]
                    theirs.pop()  # `last` is the ring's highest slot, so its highest
                    bisect.insort(theirs, index)
                slots.pop()
            while len(mine) < want:
                note(len(slots))
                mine.append(len(slots))
                slots.append(real)
            if not mine:
                del positions[real]
        return self._slot_commands(layout, was, rebuild=rebuild or len(slots) != before)

    def _reweave(self, layout: ServiceLayout, *, rebuild: bool) -> list[str]:
        """`wrr`: the whole ring again, each real's slots spread evenly (`interleave`),
        rewriting only the slots whose real changed. O(slots) per change: the price of
        a ring without long runs of one real."""
        old = layout.slots
        new = interleave({real: layout.counts[real] for real in sorted(layout.counts)})
        was: dict[int, Real | None] = {
            i: old[i] if i < len(old) else None
            for i in range(max(len(old), len(new)))
            if i >= len(old) or i >= len(new) or old[i] != new[i]
        }
        layout.slots = new
        layout.reindex()
        return self._slot_commands(layout, was, rebuild=rebuild or len(new) != len(old))

    def _slot_commands(
        self, layout: ServiceLayout, was: Mapping[int, Real | None], *, rebuild: bool
    ) -> list[str]:
        """The element commands that turn the ring as it `was` into `layout.slots`."""
        slots = layout.slots
        t, smap = self.table, slots_map(layout.key)
        removed = [
            str(i)
            for i, old in sorted(was.items())
            if old is not None and (i >= len(slots) or slots[i] != old)
        ]
        added = [
            f"{i} : {slots[i].address} . {slots[i].port}"
            for i, old in sorted(was.items())
            if i < len(slots) and slots[i] != old
        ]
        step = ELEMENTS_PER_COMMAND
        commands = [
            f"delete element ip {t} {smap} {{ {', '.join(removed[i : i + step])} }}"
            for i in range(0, len(removed), step)
        ] + [
            f"add element ip {t} {smap} {{ {', '.join(added[i : i + step])} }}"
            for i in range(0, len(added), step)
        ]
        if rebuild:
            commands += self._rule(layout)
        return commands

    def _remaglev(self, layout: ServiceLayout, *, rebuild: bool) -> list[str]:
        """Rebuild the Maglev table; rewrite only the entries whose real changed."""
        old, new = layout.slots, layout.maglev_table()
        t, smap = self.table, slots_map(layout.key)
        changed = [
            i
            for i in range(max(len(old), len(new)))
            if i >= len(new) or i >= len(old) or old[i] != new[i]
        ]
        commands = [f"delete element ip {t} {smap} {{ {i} }}" for i in changed if i < len(old)]
        added = [f"{i} : {new[i].address} . {new[i].port}" for i in changed if i < len(new)]
        # One command per few thousand elements keeps each line a sane length.
        for start in range(0, len(added), 4096):
            commands.append(
                f"add element ip {t} {smap} {{ {', '.join(added[start : start + 4096])} }}"
            )
        layout.slots = new
        layout.reindex()
        if rebuild or len(old) != len(new):
            commands += self._rule(layout)
        return commands

    def _affinity_sets(self, key: VirtualKey, reals: Iterable[Real], verb: str) -> list[str]:
        """Make (`add`) or remove (`delete`) the affinity sets of `reals`.

        Entries carry their own timeout (set by the rule's `update`), so a new
        timeout needs only new rules, not new sets.
        """
        if verb == "delete":
            return [f"delete set ip {self.table} {affinity_set(key, r)}" for r in reals]
        return [
            f"add set ip {self.table} {affinity_set(key, r)} {{ type ipv4_addr ; "
            f"flags dynamic,timeout ; size {AFFINITY_SIZE} ; }}"
            for r in reals
        ]

    def repair(self, key: VirtualKey) -> list[str]:
        """Rewrite one service's slots and rule from its weights (a damaged leftover)."""
        layout = self.services[key]
        self._save(key)
        layout.slots, layout.positions = [], {}
        layout.recount()
        commands = [
            f"add counter ip {self.table} {counter_name(key)}",  # a table of an older version
            f"flush map ip {self.table} {slots_map(key)}",
        ]
        if layout.options.affinity:  # `add` of a set that exists changes nothing
            commands += self._affinity_sets(
                key, [r for r, w in layout.weights.items() if w > 0], "add"
            )
        return commands + self._reslot(layout, list(layout.weights), rebuild=True)

    def _rule(self, layout: ServiceLayout) -> list[str]:
        t, key = self.table, layout.key
        comment = f'comment "{options_comment(layout.options)}"'
        count = f"counter name {counter_name(key)}"
        commands = [f"flush chain ip {t} {chain_name(key)}"]
        if not layout.slots:
            # Nothing takes new connections: refuse them at once rather than let
            # them time out (flows already made never reach a nat chain again).
            return [*commands, f"add rule ip {t} {chain_name(key)} {count} reject {comment}"]
        # The mark bit says "DNATed by meshplane" to the forward and
        # postrouting chains (base.py), which masquerade only such flows.
        mark = f"meta mark set meta mark | {self.mark:#x}"
        size, slots = len(layout.slots), f"map @{slots_map(key)}"
        seed = f"seed {HASH_SEED:#x}"
        if layout.options.scheduler is Scheduler.MAGLEV:
            pick = f"jhash ip saddr . {key.protocol} sport mod {size} {seed} {slots}"
        else:
            pick = f"numgen inc mod {size} {slots}"
        if layout.options.affinity:
            commands += self._affinity_rules(layout, f"{count} {mark}", comment)
        commands.append(
            f"add rule ip {t} {chain_name(key)} meta l4proto {key.protocol} {count} {mark} "
            f"dnat ip to {pick} {comment}"
        )
        return commands

    def _affinity_rules(self, layout: ServiceLayout, count_mark: str, comment: str) -> list[str]:
        """Per ready real: "a client it has: keep it"; then "a new client hashing into its
        share: record it". Shares follow the weights under `wrr`, else one each."""
        t, key = self.table, layout.key
        ready = sorted(r for r, w in layout.weights.items() if w > 0)
        shares = [
            layout.weights[r] if layout.options.scheduler is Scheduler.WEIGHTED_ROUND_ROBIN else 1
            for r in ready
        ]
        total = sum(shares)
        head = f"add rule ip {t} {chain_name(key)} meta l4proto {key.protocol}"
        timeout = f"timeout {layout.options.affinity}s"
        kept, new = [], []
        start = 0
        for real, share in zip(ready, shares, strict=True):
            name = affinity_set(key, real)
            to = f"dnat ip to {real.address}:{real.port} {comment}"
            update = f"update @{name} {{ ip saddr {timeout} }} {count_mark}"
            kept.append(f"{head} ip saddr @{name} {update} {to}")
            span = f"{start}" if share == 1 else f"{start}-{start + share - 1}"
            new.append(
                f"{head} jhash ip saddr mod {total} seed {HASH_SEED:#x} {span} {update} {to}"
            )
            start += share
        return kept + new

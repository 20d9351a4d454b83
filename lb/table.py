"""The L4 table every backend programs: virtual services to real servers.

A *virtual service* is what clients address: a service VIP and target port, or
a published port on every address of the node (`address == ANY_ADDRESS`). Its
*real servers* are task endpoints, each with a weight; weight 0 means draining
(connections already made finish, new ones go elsewhere), as IPVS does it.

Backends are driven by `Op`s, not whole tables, so that one task changing costs
one kernel operation: `PutService` / `PutReal` add or update (idempotent),
`DeleteService` / `DeleteReal` remove (a missing object is not an error).
`diff(found, desired)` gives the ops that turn one table into another; a
backend uses it once at start, to reconcile what it finds left over from a
previous run with what the state wants.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple, TypeAlias

Protocol: TypeAlias = Literal["tcp", "udp"]

#: The address of a published port: every address of this node.
ANY_ADDRESS = "0.0.0.0"


class Scheduler(enum.StrEnum):
    ROUND_ROBIN = "rr"
    WEIGHTED_ROUND_ROBIN = "wrr"
    LEAST_CONNECTIONS = "lc"
    #: Maglev consistent hashing of the client's address and port (IPVS's name, `mh`)
    MAGLEV = "mh"


# VirtualKey and Real are NamedTuples, not dataclasses: they are the keys of every
# table of the LB path (the view, the suspect filter, the backends, the proxy's pools),
# and a tuple's hash and equality are C, where a dataclass's are Python calls (about
# 50 of them a registration, and some on each proxied connection). Their order is
# the fields' order, as `order=True` gave. A tuple of the same values compares equal
# to them: nothing mixes the two as keys.
class VirtualKey(NamedTuple):
    protocol: Protocol
    address: str  # a VIP, or ANY_ADDRESS for a published port
    port: int

    def __str__(self) -> str:
        return f"{self.protocol}/{self.address}:{self.port}"

    @property
    def published(self) -> bool:
        return self.address == ANY_ADDRESS


class Real(NamedTuple):
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServiceOptions:
    """How one virtual service balances; backends that cannot honour an option say so."""

    scheduler: Scheduler = Scheduler.ROUND_ROBIN
    #: Send a PROXY protocol v2 header to the real servers (the userspace proxy
    #: only; kernel backends keep the client address by not masquerading where
    #: the return path allows it).
    proxy_protocol: bool = False
    #: Session affinity by client address: seconds an idle client stays with its real
    #: server (0: no affinity). IPVS persistence, an nftables timeout map, the proxy's table.
    affinity: int = 0
    #: A published port's `traffic-policy=local` (docs/load-balancing.md): the view gives
    #: it only this node's tasks; the backends never masquerade its flows, so the task
    #: sees the client's address. Always False for a VIP.
    local: bool = False


@dataclass(frozen=True, slots=True)
class VirtualService:
    key: VirtualKey
    options: ServiceOptions = ServiceOptions()
    reals: Mapping[Real, int] = field(default_factory=dict)  # real -> weight (0: draining)

    def with_real(self, real: Real, weight: int) -> VirtualService:
        return replace(self, reals={**self.reals, real: weight})

    def without_real(self, real: Real) -> VirtualService:
        return replace(self, reals={r: w for r, w in self.reals.items() if r != real})


@dataclass(frozen=True, slots=True)
class PutService:
    key: VirtualKey
    options: ServiceOptions = ServiceOptions()


@dataclass(frozen=True, slots=True)
class DeleteService:
    """Remove the virtual service and every real server under it."""

    key: VirtualKey


@dataclass(frozen=True, slots=True)
class PutReal:
    key: VirtualKey
    real: Real
    weight: int = 1


@dataclass(frozen=True, slots=True)
class DeleteReal:
    key: VirtualKey
    real: Real


Op: TypeAlias = PutService | DeleteService | PutReal | DeleteReal

#: A whole table, as a backend reads it back or the state wants it.
Table: TypeAlias = dict[VirtualKey, VirtualService]


def diff(
    found: Mapping[VirtualKey, VirtualService], desired: Mapping[VirtualKey, VirtualService]
) -> list[Op]:
    """The ops that turn `found` into `desired`, touching nothing that already matches."""
    ops: list[Op] = []
    for key in sorted(found.keys() - desired.keys()):
        ops.append(DeleteService(key))
    for key in sorted(desired):
        want = desired[key]
        have = found.get(key)
        if have is None or have.options != want.options:
            ops.append(PutService(key, want.options))
        have_reals: Mapping[Real, int] = {} if have is None else have.reals
        for real in sorted(have_reals.keys() - want.reals.keys()):
            ops.append(DeleteReal(key, real))
        for real in sorted(want.reals):
            if have_reals.get(real) != want.reals[real]:
                ops.append(PutReal(key, real, want.reals[real]))
    return ops


def apply_ops(table: Table, ops: Iterable[Op]) -> Table:
    """Apply ops to an in-memory table (in place) with the backends' semantics; returns it.

    A `PutReal` under a virtual service that does not exist is an error in a
    backend; here it raises KeyError, so a view emitting ops in the wrong order
    is caught by its unit tests.
    """
    for op in ops:
        if isinstance(op, PutService):
            current = table.get(op.key)
            table[op.key] = (
                VirtualService(op.key, op.options)
                if current is None
                else replace(current, options=op.options)
            )
        elif isinstance(op, DeleteService):
            table.pop(op.key, None)
        elif isinstance(op, PutReal):
            table[op.key] = table[op.key].with_real(op.real, op.weight)
        elif op.key in table:
            table[op.key] = table[op.key].without_real(op.real)
    return table


def describe(table: Mapping[VirtualKey, VirtualService]) -> Iterator[str]:
    """The table as `ipvsadm -Ln` prints it: one line per service, one per real."""
    for key in sorted(table):
        service = table[key]
        extra = " proxy-v2" if service.options.proxy_protocol else ""
        extra += " local" if service.options.local else ""
        if service.options.affinity:
            extra += f" affinity={service.options.affinity}s"
        yield f"{key.protocol.upper()}  {key.address}:{key.port} {service.options.scheduler}{extra}"
        for real in sorted(service.reals):
            yield f"  -> {real}  weight {service.reals[real]}"

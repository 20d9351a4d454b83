"""The part of the node's L4 table one sandbox programs: the VIPs of its networks (sans-IO).

A sandbox (a task's own network namespace, issue 15) balances the connections
its processes make to a service's VIP, as Swarm programs IPVS inside each
container. It sees exactly the VIP virtual services whose VIP belongs to one of
the sandbox's networks: never a published port (those are the node's, reached
through the node's addresses), never the VIP a service has on another network.

`SandboxScope` turns the node view's (`lb.view.LbView`) table and ops into the
sandbox's: `initial` filters a whole table when the sandbox opens, `filter`
each later batch of ops, so the sandbox follows the state incrementally, one
task's change costing the same handful of ops it costs the node. Which network
a VIP is on is asked of `network_of` (the view's `vip_network`) at the moment
the ops are made, so a Put is judged against the state it belongs to; a Delete
is passed on when the sandbox holds the key, whatever the state says now (the
service, and with it the VIP's network, may be gone already).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from lb.table import DeleteService, Op, PutService, Table, VirtualKey

NetworkOf = Callable[[str], "str | None"]


class SandboxScope:
    """Which virtual services one sandbox holds, and the ops that keep them."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(networks)
        self._networks = frozenset(self.networks)
        #: the keys the ops passed on so far have programmed
        self.keys: set[VirtualKey] = set()

    def __repr__(self) -> str:
        return f"<SandboxScope networks={','.join(self.networks)} keys={len(self.keys)}>"

    def wants(self, key: VirtualKey, network_of: NetworkOf) -> bool:
        return not key.published and network_of(key.address) in self._networks

    def initial(self, table: Table, network_of: NetworkOf) -> Table:
        """The sandbox's share of a whole table; from now on `filter` follows it."""
        mine = {key: vs for key, vs in table.items() if self.wants(key, network_of)}
        self.keys = set(mine)
        return mine

    def filter(self, ops: Sequence[Op], network_of: NetworkOf) -> list[Op]:
        """The ops of one batch that concern this sandbox, in order."""
        out: list[Op] = []
        for op in ops:
            key = op.key
            if isinstance(op, PutService):
                if self.wants(key, network_of):
                    self.keys.add(key)
                    out.append(op)
                elif key in self.keys:  # its VIP left the sandbox's networks
                    self.keys.discard(key)
                    out.append(DeleteService(key))
            elif isinstance(op, DeleteService):
                if key in self.keys:
                    self.keys.discard(key)
                    out.append(op)
            elif key in self.keys:  # PutReal, DeleteReal under a key we hold
                out.append(op)
        return out

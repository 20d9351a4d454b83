"""The L4 load balancer inside one sandbox: `SandboxLb`.

A process in a sandbox (a task's network namespace, issue 15) that connects
to a service's VIP must reach one of the service's healthy tasks, as in Swarm,
where the engine programs IPVS inside each container. Here the sandbox always
gets nftables, whatever backend the node itself uses (userspace, nftables,
ipvs): one table, `ip meshplane_sbx`, made by the nftables backend's own code
(`lb/nft/`: per-VIP service chain, `numgen inc` round robin over a slots map,
weights, draining, the conntrack flush of removed reals, reconciliation of a
leftover table at start) with a smaller fixed part (`sandbox_base_commands`:
the nat `output` hook only, no masquerade, no published ports, no sysctl).

What it holds is `SandboxScope`'s (`lb/scope.py`): the VIP virtual services of
the sandbox's networks, taken from the node's `LbView` and kept in step with
its ops (incrementally, as the node's backend is). A sandboxed real is the
task's endpoint address on the VIP's network (`lb.view.task_address`).

How commands get into the namespace: `nft` runs under `nsenter --net=<path>`
(a child process; the agent's threads never switch namespace, and unlike `ip
netns exec` it needs no name under /run/netns, so an adopted /proc/<pid>/ns/net
works too and no private mount namespace is made); the conntrack socket is
opened there by pyroute2 (`netns=<path>`, never creating one).

`LbDriver.open_sandbox` / `close_sandbox` (lb/driver.py) drive it: `start` with
the sandbox's share of the table, `apply` for each filtered batch, `close` to
remove the table. On the agent's own exit the tables stay, as the sandboxes
do, and the next start reconciles each against the state.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from lb.nft.backend import NftablesBackend
from lb.scope import NetworkOf, SandboxScope
from lb.table import Op, Table

#: The sandbox LB's table, inside each sandbox's namespace (names: spec of issue 15).
SANDBOX_TABLE = "meshplane_sbx"


class SandboxLb:
    """One sandbox's nftables table: the VIPs of its networks, DNATed to healthy tasks."""

    def __init__(self, key: str, netns: str, networks: Iterable[str], *, nft: str = "nft") -> None:
        if not netns.startswith("/"):
            raise ValueError(f"sandbox {key}: netns must be a path, not {netns!r}")
        self.key = key
        self.netns = netns
        self.scope = SandboxScope(networks)
        self.backend = NftablesBackend(
            table=SANDBOX_TABLE, netns=netns, nft=nft, localhost=False, sandbox=True
        )
        #: programming failures in this sandbox (logged by the driver)
        self.errors = 0

    def __repr__(self) -> str:
        return f"<SandboxLb {self.key} {self.netns} {self.scope!r}>"

    @property
    def networks(self) -> tuple[str, ...]:
        return self.scope.networks

    def vanished(self) -> bool:
        """Whether the namespace is gone (its task removed, or a container that exited)."""
        return not os.path.exists(self.netns)

    # -- sans-IO: what to program ----------------------------------------------------

    def rescope(self, networks: Iterable[str]) -> None:
        """Hold another set of networks from now on (then `initial` and `start` again)."""
        self.scope = SandboxScope(networks)

    def initial(self, table: Table, network_of: NetworkOf) -> Table:
        return self.scope.initial(table, network_of)

    def filter(self, ops: Sequence[Op], network_of: NetworkOf) -> list[Op]:
        return self.scope.filter(ops, network_of)

    # -- the kernel ---------------------------------------------------------------------

    async def start(self, desired: Table) -> None:
        """Make the table (or reconcile one a previous run left) to `desired`."""
        await self.backend.start(desired)

    async def apply(self, ops: Sequence[Op]) -> None:
        await self.backend.apply(ops)

    async def read(self) -> Table:
        return await self.backend.read()

    async def close(self) -> None:
        """Remove the table (nothing to do when the namespace went with its task)."""
        if self.vanished():
            await self.backend.abandon()
            return
        await self.backend.close()

    async def abandon(self) -> None:
        """Forget it, leaving the table in the kernel (the agent exits; the sandbox stays)."""
        await self.backend.abandon()

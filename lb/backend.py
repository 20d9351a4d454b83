"""The one interface of the L4 backends (`ipvs`, `nftables`, `userspace`).

Life of a backend, as the agent drives it:

1. `start(desired)`: find what a previous run of this backend left behind (its
   own objects only: its nftables table, its IPVS services, nothing else),
   and reconcile it to `desired` with the fewest changes (`table.diff`), so
   connections through backends that did not change survive an agent restart.
2. `apply(ops)`, many times: ops in order, each idempotent; a few objects
   touched per op, never a rebuild.
3. `read()`: the table as programmed, read back from where it lives (the
   kernel for the kernel backends): for `mesh lb`, `mesh doctor` and tests.
4. `close()`: remove every object it created.

A failure to program something raises `BackendError` naming it; the caller logs
it and carries on with the next change (one bad entry must not stop the others).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from lb.table import Op, Table


class BackendError(Exception):
    """The backend could not program an op (the message names it and why)."""


class Backend(Protocol):
    #: "ipvs", "nftables" or "userspace": what `--lb auto` chose is logged by it.
    name: str

    async def start(self, desired: Table) -> None: ...

    async def apply(self, ops: Sequence[Op]) -> None: ...

    async def read(self) -> Table: ...

    async def close(self) -> None: ...

"""`NftablesBackend`: the asyncio shell around `Layout` (see `lb/nft/__init__.py`)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lb.backend import BackendError
from lb.nft.base import (
    DEFAULT_MASQUERADE_MARK,
    base_commands,
    localnet_was,
    sandbox_base_commands,
)
from lb.nft.conntrack import ConntrackFlusher
from lb.nft.layout import (
    PUBLISHED_MAP,
    VIPS_MAP,
    Layout,
    LayoutError,
    chain_name,
    counter_name,
    slots_map,
    weights_map,
)
from lb.nft.listing import Listing, parse_counters, parse_listing
from lb.table import Op, Real, Table, VirtualKey, diff

log = logging.getLogger(__name__)

NFT_TIMEOUT = 30.0
#: DNAT to a real on another host is forwarding.
IP_FORWARD = "net/ipv4/ip_forward"
#: Lets 127.0.0.1:<published> from the node reach a real elsewhere (see base.py).
ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"


class NftablesBackend:
    name = "nftables"

    def __init__(
        self,
        *,
        table: str = "meshplane",
        netns: str | None = None,
        nft: str = "nft",
        masquerade_mark: int = DEFAULT_MASQUERADE_MARK,
        localhost: bool = True,
        sandbox: bool = False,
    ) -> None:
        """`netns`: run every nft command and the conntrack socket in that
        namespace: a name (`ip netns exec`) or a path such as /run/netns/<name>
        or /proc/<pid>/ns/net (`nsenter --net=<path>`, which unlike `ip netns
        exec` leaves the mount namespace alone); None is this process's own.
        `localhost`: published ports answer at 127.0.0.1 on the node too, with
        `route_localnet=1` and the guard chain (`lb/nft/base.py`); restored at close.
        `sandbox`: the table inside a sandbox (`lb/sandbox.py`): only the `output`
        hook (`sandbox_base_commands`), no sysctl changed, no `localhost`.
        """
        if not table.replace("_", "").replace("-", "").isalnum() or not table[0].isalpha():
            raise ValueError(f"table name {table!r}: use letters, digits, - and _")
        if not 0 < masquerade_mark < 2**32 or masquerade_mark & (masquerade_mark - 1):
            raise ValueError(f"masquerade mark {masquerade_mark:#x} must be one bit")
        self.table = table
        self._netns = netns
        if sandbox and localhost:
            raise ValueError("a sandbox's table has no published ports: localhost=False")
        self._sandbox = sandbox
        if netns is None:
            self._prefix: list[str] = []
        elif netns.startswith("/"):
            self._prefix = ["nsenter", f"--net={netns}", "--"]
        else:
            self._prefix = ["ip", "netns", "exec", netns]
        self._nft = nft
        self._mark = masquerade_mark
        self._localhost = localhost
        self._localnet_was: str | None = None
        self._layout = Layout(table, mark=masquerade_mark)
        self._conntrack = ConntrackFlusher(netns)
        self._lock = asyncio.Lock()
        self._closed = False

    # -- the Backend interface ------------------------------------------------------

    async def start(self, desired: Table) -> None:
        async with self._lock:
            if not self._sandbox:  # a sandbox DNATs only its own output: nothing forwarded
                await self._sysctl(IP_FORWARD, "1")
            if self._localhost:
                self._localnet_was = localnet_was(
                    self.table, await self._list()
                ) or await self._sysctl(ROUTE_LOCALNET)
            await self._load()
            if self._localhost:
                await self._sysctl(ROUTE_LOCALNET, "1")
        await self.apply(diff(self._layout.to_table(), desired))

    async def apply(self, ops: Sequence[Op]) -> None:
        async with self._lock:
            if self._closed:
                raise BackendError("nftables backend is closed")
            await self._apply(ops)

    async def read(self) -> Table:
        listing = await self._list()
        if listing is None:
            return {}
        return parse_listing(self.table, listing).layout.to_table()

    async def service_counters(self) -> dict[VirtualKey, dict[str, int]]:
        """Per virtual service, its new connections (and UDP flows): the packets of its
        named counter, which only a connection's first packet reaches. One
        `nft -j list counters` of the table (the driver reads at most once a second).
        nftables cannot say more per service: its bytes and its open connections are
        conntrack's, per flow, not the rule's; they are left out (docs/metrics.md)."""
        by_name = {counter_name(key): key for key in self._layout.services}
        if not by_name or self._closed:
            return {}
        out = await self._exec([self._nft, "-j", "list", "counters", "table", "ip", self.table])
        try:
            packets = parse_counters(json.loads(out))
        except ValueError as exc:
            raise BackendError(f"nft -j list counters: bad JSON: {exc}") from exc
        return {
            key: {"connections": packets[name]} for name, key in by_name.items() if name in packets
        }

    async def close(self) -> None:
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            if await self._list() is not None:
                await self._run([f"delete table ip {self.table}"])
            if self._localnet_was == "0":
                await self._sysctl(ROUTE_LOCALNET, "0")

    async def abandon(self) -> None:
        """Drop this object as a crashed agent would: its table stays in the kernel."""
        self._closed = True

    # -- inside ---------------------------------------------------------------------

    async def _apply(self, ops: Sequence[Op]) -> None:
        layout = self._layout
        errors: list[str] = []
        commands: list[str] = []
        flushes: list[tuple[VirtualKey, Real]] = []
        layout.begin()
        layout.defer()
        for op in ops:
            try:
                planned, flows = layout.plan(op)
            except LayoutError as exc:
                errors.append(str(exc))
                continue
            commands += planned
            flushes += flows
        commands += layout.flush_deferred()
        try:
            await self._run(commands)
        except BackendError as exc:
            # Something in the kernel is not as the mirror says (or one command
            # is refused): reload the truth and program op by op, so one bad
            # op does not stop the others.
            log.warning("nftables batch failed, retrying op by op: %s", exc)
            layout.rollback()
            await self._load()
            errors, flushes = await self._apply_one_by_one(ops)
        if flushes:
            try:
                await self._conntrack.flush(flushes)
            except Exception as exc:
                errors.append(f"conntrack flush of {len(flushes)} removed real(s): {exc}")
        if errors:
            raise BackendError("; ".join(errors))

    async def _apply_one_by_one(
        self, ops: Sequence[Op]
    ) -> tuple[list[str], list[tuple[VirtualKey, Real]]]:
        errors: list[str] = []
        flushes: list[tuple[VirtualKey, Real]] = []
        for op in ops:
            self._layout.begin()
            try:
                planned, flows = self._layout.plan(op)
                await self._run(planned)
            except (LayoutError, BackendError) as exc:
                self._layout.rollback()
                errors.append(f"{op}: {exc}")
                continue
            flushes += flows
        return errors, flushes

    async def _load(self) -> None:
        """Make sure the fixed objects exist and read the services back into the mirror."""
        await self._run(
            sandbox_base_commands(self.table)
            if self._sandbox
            else base_commands(self.table, self._mark, localnet_was=self._localnet_was)
        )
        listing = await self._list()
        found = parse_listing(self.table, listing or {}, mark=self._mark)
        for problem in found.problems:
            log.warning("nftables table %s: %s", self.table, problem)
        self._layout = found.layout
        await self._remove_broken(found)
        if found.endpoints_missing or found.endpoints_extra:
            await self._run(found.endpoint_fixes())
        if found.repair:
            self._layout.begin()
            await self._run([c for key in sorted(found.repair) for c in self._layout.repair(key)])

    async def _remove_broken(self, found: Listing) -> None:
        """Remove, one by one and best effort, what is left of half-present services."""
        t = self.table
        for key in found.broken:
            element = (
                f"delete element ip {t} {PUBLISHED_MAP} {{ {key.protocol} . {key.port} }}"
                if key.published
                else f"delete element ip {t} {VIPS_MAP} {{ {key.address} . {key.protocol} "
                f". {key.port} }}"
            )
            for command in (
                element,
                f"delete chain ip {t} {chain_name(key)}",
                f"delete map ip {t} {slots_map(key)}",
                f"delete map ip {t} {weights_map(key)}",
                f"delete counter ip {t} {counter_name(key)}",
            ):
                try:
                    await self._run([command])
                except BackendError as exc:
                    log.debug("cleanup of %s: %s", key, exc)

    async def _sysctl(self, name: str, value: str | None = None) -> str:
        """Read a sysctl of the backend's namespace, and set it when `value` is given."""
        if self._netns is not None:
            dotted = name.replace("/", ".")
            if value is not None:
                await self._exec(["sysctl", "-qw", f"{dotted}={value}"])
                return value
            return (await self._exec(["sysctl", "-n", dotted])).strip()
        path = Path("/proc/sys") / name
        try:
            current = path.read_text().strip()
            if value is not None and current != value:
                path.write_text(value)
        except OSError as exc:
            raise BackendError(f"cannot {'set' if value else 'read'} {name}: {exc}") from exc
        return current if value is None else value

    async def _list(self) -> dict[str, Any] | None:
        """The table as `nft -j` lists it, or None when it does not exist."""
        try:
            out = await self._exec([self._nft, "-j", "list", "table", "ip", self.table])
        except BackendError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
        try:
            listing: dict[str, Any] = json.loads(out)
        except ValueError as exc:
            raise BackendError(f"nft -j list table ip {self.table}: bad JSON: {exc}") from exc
        return listing

    async def _run(self, commands: Sequence[str]) -> None:
        """Run commands as one nft transaction (all or nothing)."""
        if commands:
            await self._exec([self._nft, "-f", "-"], "\n".join(commands) + "\n")

    async def _exec(self, argv: list[str], stdin: str | None = None) -> str:
        try:
            process = await asyncio.create_subprocess_exec(
                *self._prefix,
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise BackendError(f"{argv[0]}: cannot run: {exc}") from exc
        try:
            out, err = await asyncio.wait_for(
                process.communicate(None if stdin is None else stdin.encode()), NFT_TIMEOUT
            )
        except TimeoutError:
            process.kill()
            await process.wait()
            raise BackendError(f"{' '.join(argv)}: no answer in {NFT_TIMEOUT:.0f} s") from None
        if process.returncode != 0:
            detail = err.decode(errors="replace").strip()
            raise BackendError(f"{' '.join(argv)} failed: {detail}")
        return out.decode()

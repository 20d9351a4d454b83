"""The `userspace` L4 backend: the table programmed as listening sockets of this process.

Each virtual service is a listener (TCP) or a socket (UDP) on its VIP and port,
or on the publish address for a published port (`ANY_ADDRESS`: every address by
default), with a `Pool` of real servers. Ops change pools in place: a weight of
0 or a removed real drains (its connections finish, new ones go elsewhere); a
removed service stops listening while its open connections carry on. Nothing
outlives the process, so `start` has nothing left over to reconcile; it
programs the desired table from scratch.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence

from lb.backend import BackendError
from lb.table import (
    ANY_ADDRESS,
    DeleteReal,
    DeleteService,
    Op,
    PutReal,
    PutService,
    ServiceOptions,
    Table,
    VirtualKey,
    VirtualService,
    diff,
)
from lb.userspace.runtime import KeyStats, ProxySettings, Runtime
from lb.userspace.scheduler import Pool
from lb.userspace.tcp import TcpService
from lb.userspace.udp import UdpService
from mesh.core.sockets import SocketOwners, holder_of, in_use_by

log = logging.getLogger(__name__)

Service = TcpService | UdpService


class UserspaceBackend:
    name = "userspace"

    def __init__(self, settings: ProxySettings | None = None) -> None:
        self.settings = settings or ProxySettings()
        self.runtime = Runtime(self.settings)
        self._services: dict[VirtualKey, Service] = {}
        # Services whose socket could not be made (a port taken, a privileged port):
        # reported once, then kept up to date quietly, and retried on their next PutService
        # and by `retry_unbound` (the driver calls it, backing off, while any is left).
        self._unbound: dict[VirtualKey, tuple[Service, str]] = {}
        # Socket owners read from /proc once per batch of ops, when a port is in use.
        self._owners: SocketOwners | None = None
        # Each virtual service's counts. Kept past a DeleteService until a reading has
        # seen them and its last connection has ended (so nothing counted is lost), and
        # taken up again if the service comes back before that.
        self._stats: dict[VirtualKey, KeyStats] = {}
        self._stats_read = False  # nobody reads them: a deleted service's go at once
        self._evicted_gone = 0  # affinity evictions of deleted services

    def __repr__(self) -> str:
        return f"<UserspaceBackend services={len(self._services)} open={len(self.runtime.open)}>"

    def stats(self) -> dict[str, int]:
        """Counters since start: accepted, refused, failovers, idle closes, drops."""
        return {
            **self.runtime.counters(),
            "open": len(self.runtime.open),
            "unbound": len(self._unbound),
            # clients forgotten by a full affinity table (they are balanced afresh)
            "affinity_evicted": self._evicted_gone
            + sum(s.pool.affinity_evicted for s in self._services.values()),
        }

    def service_counters(self) -> dict[VirtualKey, dict[str, int]]:
        """Per virtual service: connections, bytes each way, connect errors, failovers
        (since it was made) and connections open now. One pass over the open connections
        and flows (their bytes so far), no system call: what `GET /metrics` reads."""
        live: dict[int, list[int]] = {}  # id(KeyStats) -> [open, bytes in, bytes out]
        for item in self.runtime.open:
            stats, bytes_in, bytes_out = item.usage()
            mine = live.setdefault(id(stats), [0, 0, 0])
            mine[0] += 1
            mine[1] += bytes_in
            mine[2] += bytes_out
        self._stats_read = True
        sample: dict[VirtualKey, dict[str, int]] = {}
        programmed = self._services.keys() | self._unbound.keys()
        for key, stats in list(self._stats.items()):
            active, bytes_in, bytes_out = live.get(id(stats), (0, 0, 0))
            sample[key] = {
                "connections": stats.connections,
                "bytes_in": stats.bytes_in + bytes_in,
                "bytes_out": stats.bytes_out + bytes_out,
                "connect_errors": stats.connect_errors,
                "failovers": stats.failovers,
                "active": active,
            }
            if key not in programmed and not active:
                del self._stats[key]  # deleted, and this reading has its last counts
        return sample

    def unbound(self) -> dict[str, str]:
        """Virtual services in the table that have no socket, and why."""
        return {str(key): reason for key, (_, reason) in sorted(self._unbound.items())}

    def address_of(self, key: VirtualKey) -> str:
        """The address a virtual service listens on."""
        return self.settings.publish_address if key.address == ANY_ADDRESS else key.address

    async def start(self, desired: Table) -> None:
        self.runtime.start()
        await self.apply(diff({}, desired))

    async def apply(self, ops: Sequence[Op]) -> None:
        """Every op in order; the ones that fail are reported together at the end."""
        errors: list[str] = []
        self._owners = None
        for op in ops:
            try:
                await self._apply(op)
            except BackendError as exc:
                errors.append(str(exc))
        if errors:
            raise BackendError("; ".join(errors))

    async def _apply(self, op: Op) -> None:
        if isinstance(op, PutService):
            service = self._services.get(op.key)
            if service is None:
                await self._listen(op.key, op.options)
            else:
                await self._transparent(op.key, op.options)
                service.options = op.options
                service.pool.configure(op.options.scheduler, op.options.affinity)
        elif isinstance(op, DeleteService):
            gone = self._services.pop(op.key, None)
            if gone is not None:
                self._evicted_gone += gone.pool.affinity_evicted  # the count stays monotonic
                gone.close()
            self._unbound.pop(op.key, None)
            if not self._stats_read:
                self._stats.pop(op.key, None)
        elif isinstance(op, PutReal):
            if op.weight < 0:
                raise BackendError(f"{op.key}: real {op.real} weight {op.weight} is negative")
            self._pool(op.key, op.real).set(op.real, op.weight)
        elif isinstance(op, DeleteReal):
            service = self._services.get(op.key) or self._unbound.get(op.key, (None,))[0]
            if service is not None:
                service.pool.remove(op.real)

    def _pool(self, key: VirtualKey, real: object) -> Pool:
        service = self._services.get(key)
        if service is not None:
            return service.pool
        unbound = self._unbound.get(key)
        if unbound is not None:
            return unbound[0].pool  # its error was reported when it failed to listen
        raise BackendError(f"{key}: no such virtual service for real {real}")

    async def _transparent(self, key: VirtualKey, options: ServiceOptions) -> None:
        """Set up transparent connects at the first `traffic-policy=local` TCP port. When
        the kernel refuses, the port is served from the proxy's own address: logged
        once, counted (`transparent_failed`), and `lb.policy` shows it on the service."""
        transparency = self.runtime.transparency
        if not options.local or key.protocol != "tcp" or transparency is None:
            return
        if transparency.ready or self.runtime.stats["transparent_failed"]:
            return
        try:
            await transparency.ensure()
        except BackendError as exc:
            self.runtime.stats["transparent_failed"] += 1
            log.warning(
                "transparent connects unavailable, %s uses the proxy's address: %s", key, exc
            )

    def keeps_client_address(self) -> bool:
        """Whether `traffic-policy=local` TCP ports reach their tasks from the client's address."""
        transparency = self.runtime.transparency
        return transparency is not None and not self.runtime.stats["transparent_failed"]

    async def retry_unbound(self) -> list[VirtualKey]:
        """Try again to listen where the socket could not be made; the keys that
        listen now. A port still taken keeps the reason it was reported with (no
        second scan of /proc for its holder)."""
        bound: list[VirtualKey] = []
        for key, (service, _) in list(self._unbound.items()):
            try:
                await self._listen(key, service.options, explain=False)
            except BackendError:
                continue
            bound.append(key)
        return bound

    async def _listen(self, key: VirtualKey, options: ServiceOptions, explain: bool = True) -> None:
        await self._transparent(key, options)
        previous = self._unbound.pop(key, None)
        pool = Pool() if previous is None else previous[0].pool
        pool.configure(options.scheduler, options.affinity)
        stats = self._stats.setdefault(key, KeyStats())
        service: Service = (
            TcpService(key, options, pool, self.runtime, stats)
            if key.protocol == "tcp"
            else UdpService(key, options, pool, self.runtime, stats)
        )
        host = self.address_of(key)
        try:
            await service.listen(host)
        except OSError as exc:
            reason = f"cannot listen on {host}:{key.port}: {exc.strerror or exc}"
            if not explain and previous is not None:
                reason = previous[1]
            elif exc.errno == errno.EADDRINUSE:  # name who holds it, as `ss -lntup` would
                self._owners = self._owners or SocketOwners()
                held = holder_of(
                    key.protocol, host, key.port, ours={os.getpid()}, owners=self._owners
                )
                if held is not None:
                    reason = f"cannot listen on {host}:{key.port}: in use {in_use_by(held)}"
            self._unbound[key] = (service, reason)
            raise BackendError(f"{key}: {reason}") from None
        self._services[key] = service

    async def read(self) -> Table:
        return {
            key: VirtualService(key, s.options, dict(s.pool.weights))
            for key, s in self._services.items()
        }

    async def close(self) -> None:
        """Stop listening and end every connection and flow."""
        for service in self._services.values():
            service.close()
        self._services.clear()
        self._unbound.clear()
        await self.runtime.close()
        if self.runtime.transparency is not None:
            await self.runtime.transparency.close()
        self._stats.clear()

    async def abandon(self) -> None:
        """What a crash does to this backend: its sockets die with the process."""
        await self.close()

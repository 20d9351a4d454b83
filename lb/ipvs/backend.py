"""`IpvsBackend`: the L4 table programmed into the kernel's IPVS, as Swarm does it.

- A virtual service per VIP:port (an IPVS address service); the VIP is a /32
  on the backend's own dummy device so that IPVS sees it as local.
- A published port (`VirtualKey.address == ANY_ADDRESS`) is an IPVS fwmark
  service; the backend's nftables table marks packets to that port on any
  local address (see `firewall`).
- Schedulers rr / wrr / lc; real servers reached by NAT (masquerading
  forwarding); weight 0 drains (IPVS keeps existing connections, schedules no
  new ones); removal deletes the real server.
- At start: the sysctls Swarm sets (see `host.swarm_sysctls`), strict ARP for
  the VIPs (`host.strict_arp_sysctls`), and the IPVS timeouts, configurable
  (`DEFAULT_TIMEOUTS` says why they are what they are). The sysctls' previous
  values are recorded (`lb/sysctls.py`: in the data dir, so a kill -9 loses
  nothing) and put back at close.

Ownership, and how a restarted backend recognises its objects with no state
file: an address service is ours when its address is on our dummy device (we
add the VIP before the service and remove it after, so a crash in between
leaves at worst an unused VIP, which the next start removes); a fwmark service
is ours when its mark falls in our mark range (marks are computed from
protocol and port). The dummy device and the nftables table are ours by name.
Everything else in IPVS is left alone. The timeouts and sysctls are per
network namespace, so they apply to every IPVS service there, ours or not.

The backend keeps a mirror of what it programmed (loaded from the kernel at
start), so each op costs a fixed number of kernel calls and never a dump.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from typing import TypeVar, cast

from lb.backend import BackendError
from lb.ipvs.firewall import (
    DEFAULT_MARK_BASE,
    Firewall,
    check_mark_base,
    decode_mark,
    published_mark,
)
from lb.ipvs.host import VipDevice, strict_arp_sysctls, swarm_sysctls
from lb.ipvs.netlink import Command, DestEntry, IpvsError, IpvsNetlink, ServiceId, Timeouts
from lb.sysctls import SysctlError, SysctlLedger
from lb.table import (
    ANY_ADDRESS,
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
    diff,
)

#: Idle timeouts in seconds. The kernel's tcp 900 s silently forgets an idle
#: connection after 15 minutes (Swarm's most-reported VIP bug, moby#31208). 7800
#: s is past Linux's default keepalive time (7200 s), so any connection that
#: enables keepalive with the OS defaults (most database drivers and HTTP
#: clients) keeps its entry; an entry costs a few hundred bytes, so holding idle
#: ones two hours is cheap. tcpfin 900 s (kernel: 120 s) keeps idle half-closed flows
#: (a client that sent FIN and still reads) alive far longer; udp stays at the
#: kernel's 300 s, already longer than conntrack's own UDP stream timeout.
DEFAULT_TIMEOUTS = Timeouts(tcp=7800, tcp_fin=900, udp=300)

DEFAULT_DEVICE = "meshipvs0"
DEFAULT_NFT_TABLE = "meshplane_ipvs"

_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_PROTOCOL_NAMES = {number: name for name, number in _PROTOCOLS.items()}
_MISSING = (errno.ESRCH, errno.ENOENT)  # IPVS: no such service / no such real server
T = TypeVar("T")


class IpvsBackend:
    """L4 backend over the kernel's IPVS (pyroute2), in the caller's network namespace."""

    name = "ipvs"

    def __init__(
        self,
        *,
        device: str = DEFAULT_DEVICE,
        nft_table: str = DEFAULT_NFT_TABLE,
        mark_base: int = DEFAULT_MARK_BASE,
        masquerade: bool = True,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        set_sysctls: bool = True,
        sysctls: SysctlLedger | None = None,
    ) -> None:
        """`sysctls`: where the previous values of the sysctls it sets are recorded
        (the agent's: `lb-sysctls.json` in its data dir; None: in memory only)."""
        check_mark_base(mark_base)
        self.timeouts = timeouts
        self.set_sysctls = set_sysctls
        self._sysctls = sysctls or SysctlLedger(None)
        self._mark_base = mark_base
        self._ipvs = IpvsNetlink()
        self._device = VipDevice(device)
        self._firewall = Firewall(nft_table, mark_base, masquerade)
        # The mirror: options and reals of each of our services, mutated in place so that
        # one op costs O(1) here too (a VirtualService copy per op would be O(reals)).
        self._options: dict[VirtualKey, ServiceOptions] = {}
        self._reals: dict[VirtualKey, dict[Real, int]] = {}
        self._vip_users: Counter[str] = Counter()
        self._lock = asyncio.Lock()
        self._started = False

    # -- life -------------------------------------------------------------------

    async def start(self, desired: Table) -> None:
        async with self._lock:
            try:
                found = await self._prepare()
            except BaseException:
                self._drop()  # no socket left open; what was programmed stays, as after a crash
                raise
            # A desired entry the kernel refuses is reported like any failed op (BackendError)
            # and the backend keeps serving the others.
            await self._apply(diff(found, desired))

    async def _prepare(self) -> Table:
        """Sockets, sysctls, timeouts, device and table; what a previous run left, read back."""
        try:
            await self._ipvs.open()
        except IpvsError as error:
            raise BackendError(f"ipvs backend unavailable: {error}") from error
        if self.set_sysctls:
            try:
                self._sysctls.apply({**swarm_sysctls(), **strict_arp_sysctls()})
            except (SysctlError, OSError) as error:
                raise BackendError(str(error)) from error
        await _kernel(self._ipvs.set_timeouts(self.timeouts))
        await self._device.open(create=True)
        found = await self._read_kernel()
        await self._firewall.install(
            ((key.protocol, key.port) for key in found if key.published),
            (key.address for key in found if not key.published),
        )
        used = {key.address for key in found if not key.published}
        for address in await self._device.addresses() - used:
            await self._device.remove(address)  # left by a crash between VIP and service
        self._options = {key: service.options for key, service in found.items()}
        self._reals = {key: dict(service.reals) for key, service in found.items()}
        self._vip_users = Counter(key.address for key in found if not key.published)
        self._started = True
        return found

    async def apply(self, ops: Sequence[Op]) -> None:
        async with self._lock:
            if not self._started:
                raise BackendError("ipvs backend: apply() before start()")
            await self._apply(ops)

    async def read(self) -> Table:
        async with self._lock:
            if not self._started:
                raise BackendError("ipvs backend: read() before start()")
            return await self._read_kernel()

    async def service_counters(self) -> dict[VirtualKey, dict[str, int]]:
        """Per virtual service, the kernel's own counts: connections and bytes each way
        (IPVS's service stats, in the service dump) and connections open now (the sum
        over its reals' entries: established ones for TCP, every flow for UDP, which
        IPVS keeps as inactive entries until their timeout). A dump of the services
        and one of each service's reals; the driver reads at most once a second."""
        async with self._lock:
            if not self._started:
                return {}
            vips = await self._device.addresses()
            found: dict[VirtualKey, dict[str, int]] = {}
            for entry in await _kernel(self._ipvs.services()):
                key = self._key_of(entry.id, vips)
                if key is None or entry.stats is None:
                    continue
                dests = await _kernel(self._ipvs.dests(entry.id))
                found[key] = {
                    "connections": entry.stats.connections,
                    "bytes_in": entry.stats.bytes_in,
                    "bytes_out": entry.stats.bytes_out,
                    "active": sum(d.active if key.protocol == "tcp" else d.inactive for d in dests),
                }
            return found

    async def close(self) -> None:
        """Remove our IPVS services, the VIP device and the nftables table."""
        async with self._lock:
            try:
                if self._started:
                    for key in await self._read_kernel():
                        await _kernel_missing_ok(
                            self._ipvs.service(Command.DELETE, self._service_id(key))
                        )
                    await self._device.delete()  # and with it every VIP
                    await self._firewall.delete()
            finally:
                self._drop()
                if self.set_sysctls:
                    try:
                        self._sysctls.restore()
                    except (SysctlError, OSError) as error:
                        raise BackendError(f"putting sysctls back: {error}") from error

    async def abandon(self) -> None:
        """Let go without cleaning up, as a crash would (tests use it)."""
        self._drop()

    def _drop(self) -> None:
        self._ipvs.close()
        self._device.close()
        self._options.clear()
        self._reals.clear()
        self._vip_users.clear()
        self._started = False

    # -- ops --------------------------------------------------------------------

    async def _apply(self, ops: Sequence[Op]) -> None:
        """Every op is tried; the failures are raised together, after the others are done."""
        failures: list[str] = []
        for op in ops:
            try:
                if isinstance(op, PutService):
                    await self._put_service(op.key, op.options)
                elif isinstance(op, DeleteService):
                    await self._delete_service(op.key)
                elif isinstance(op, PutReal):
                    await self._put_real(op.key, op.real, op.weight)
                else:
                    await self._delete_real(op.key, op.real)
            except BackendError as error:
                failures.append(str(error))
        if failures:
            raise BackendError("; ".join(failures))

    async def _put_service(self, key: VirtualKey, options: ServiceOptions) -> None:
        if options.proxy_protocol:
            raise BackendError(
                f"ipvs cannot send PROXY protocol headers ({key}); "
                "use the userspace backend for that service"
            )
        service = self._service_id(key)
        scheduler = str(options.scheduler)
        persist = options.affinity
        current = self._options.get(key)
        if current is not None:
            if current != options:
                await _kernel(self._ipvs.service(Command.SET, service, scheduler, persist))
                if key.published and current.local != options.local:
                    await self._firewall.set_local(key.protocol, key.port, options.local)
                self._options[key] = options
            return
        if not key.published and self._vip_users[key.address] == 0:
            await self._device.add(key.address)  # the VIP first: a service of ours has one
            await self._firewall.add_vip(key.address)
        try:
            await self._ipvs.service(Command.ADD, service, scheduler, persist)
        except IpvsError as error:
            if error.code != errno.EEXIST:
                raise BackendError(f"ipvs: {error}") from error
            await _kernel(self._ipvs.service(Command.SET, service, scheduler, persist))
        if key.published:
            await self._firewall.add_published(key.protocol, key.port)
            if options.local:
                await self._firewall.set_local(key.protocol, key.port, True)
        else:
            self._vip_users[key.address] += 1
        self._options[key] = options
        self._reals[key] = {}

    async def _delete_service(self, key: VirtualKey) -> None:
        if key not in self._options:
            return
        if key.published:
            await self._firewall.remove_published(key.protocol, key.port)
            if self._options[key].local:
                await self._firewall.set_local(key.protocol, key.port, False)
        await _kernel_missing_ok(self._ipvs.service(Command.DELETE, self._service_id(key)))
        del self._options[key], self._reals[key]
        if not key.published:
            self._vip_users[key.address] -= 1
            if self._vip_users[key.address] <= 0:
                del self._vip_users[key.address]
                await self._firewall.remove_vip(key.address)
                await self._device.remove(key.address)

    async def _put_real(self, key: VirtualKey, real: Real, weight: int) -> None:
        reals = self._reals.get(key)
        if reals is None:
            raise BackendError(f"ipvs: no virtual service {key} for real {real}")
        if not 0 <= weight <= 0x7FFF_FFFF:
            raise BackendError(f"ipvs: weight {weight} of {real} under {key} out of range")
        had = reals.get(real)
        if had == weight:
            return
        check_real(real)
        service, dest = self._service_id(key), DestEntry(real.address, real.port, weight)
        try:
            await self._ipvs.dest(Command.ADD if had is None else Command.SET, service, dest)
        except IpvsError as error:
            if error.code == errno.EEXIST:
                await _kernel(self._ipvs.dest(Command.SET, service, dest))
            elif error.code == errno.ENOENT:
                await _kernel(self._ipvs.dest(Command.ADD, service, dest))
            else:
                raise BackendError(f"ipvs: {error}") from error
        reals[real] = weight

    async def _delete_real(self, key: VirtualKey, real: Real) -> None:
        reals = self._reals.get(key)
        if reals is None or real not in reals:
            return
        await _kernel_missing_ok(
            self._ipvs.dest(
                Command.DELETE, self._service_id(key), DestEntry(real.address, real.port, 0)
            )
        )
        del reals[real]

    # -- kernel -----------------------------------------------------------------

    def _service_id(self, key: VirtualKey) -> ServiceId:
        check_key(key)
        if key.published:
            return ServiceId.of_fwmark(published_mark(self._mark_base, key.protocol, key.port))
        return ServiceId.of_address(_PROTOCOLS[key.protocol], key.address, key.port)

    def _key_of(self, service: ServiceId, vips: set[str]) -> VirtualKey | None:
        """Our key for an IPVS service, or None when the service is not ours."""
        if service.fwmark:
            decoded = decode_mark(self._mark_base, service.fwmark)
            return None if decoded is None else VirtualKey(decoded[0], ANY_ADDRESS, decoded[1])
        name = _PROTOCOL_NAMES.get(service.protocol)
        if name is None or service.address not in vips:
            return None
        return VirtualKey("tcp" if name == "tcp" else "udp", service.address, service.port)

    async def _read_kernel(self) -> Table:
        vips = await self._device.addresses()
        table: Table = {}
        for entry in await _kernel(self._ipvs.services()):
            key = self._key_of(entry.id, vips)
            if key is None:
                continue
            dests = await _kernel(self._ipvs.dests(entry.id))
            options = _options(entry.scheduler, entry.persistence)
            # IPVS keeps no traffic policy: it lives in the firewall's `local_marks`,
            # which this backend alone writes (flushed at start), so its mirror says it.
            mirrored = self._options.get(key)
            if mirrored is not None and mirrored.local:
                options = replace(options, local=True)
            table[key] = VirtualService(
                key, options, {Real(d.address, d.port): d.weight for d in dests}
            )
        return table


def check_key(key: VirtualKey) -> None:
    """What IPVS can take as a virtual service; BackendError naming what it cannot."""
    if key.protocol not in _PROTOCOLS:
        raise BackendError(f"ipvs: protocol {key.protocol!r} of {key} is not tcp or udp")
    if not isinstance(key.port, int) or not 0 < key.port <= 0xFFFF:
        raise BackendError(f"ipvs: port of {key} is not 1-65535")
    if not key.published:
        _check_ipv4(key.address, f"VIP of {key}")


def check_real(real: Real) -> None:
    _check_ipv4(real.address, f"real {real}")
    if not isinstance(real.port, int) or not 0 < real.port <= 0xFFFF:
        raise BackendError(f"ipvs: port of real {real} is not 1-65535")


def _check_ipv4(address: str, what: str) -> None:
    try:
        ipaddress.IPv4Address(address)
    except ValueError as error:
        raise BackendError(f"ipvs: {what}: not an IPv4 address (IPv4 only, as Swarm)") from error


async def _kernel(call: Awaitable[T]) -> T:
    try:
        return await call
    except IpvsError as error:
        raise BackendError(f"ipvs: {error}") from error


async def _kernel_missing_ok(call: Awaitable[None]) -> None:
    """A delete: what is already gone is not an error (ops are idempotent)."""
    try:
        await call
    except IpvsError as error:
        if error.code not in _MISSING:
            raise BackendError(f"ipvs: {error}") from error


def _options(scheduler: str, persistence: int = 0) -> ServiceOptions:
    """Options read back. A scheduler we never program (someone changed it) is kept
    as its name, so that it compares unequal to every desired option and gets fixed."""
    try:
        return ServiceOptions(Scheduler(scheduler), affinity=persistence)
    except ValueError:
        return ServiceOptions(cast(Scheduler, scheduler), affinity=persistence)

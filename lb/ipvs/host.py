"""The host side of the IPVS backend: its dummy device for VIPs, and the sysctls.

IPVS only sees packets addressed to this host, so every service VIP is added
as a /32 on a dummy device the backend creates and owns (as kube-proxy does
with kube-ipvs0). The device stays down: its addresses are local anyway (the
kernel puts /32 local routes in the local table whatever the link state), and
a down dummy has no routes of its own to leak into the main table.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lb.backend import BackendError
from lb.netlink_thread import NetlinkThread

T = TypeVar("T")

PROC_SYS = Path("/proc/sys")


class VipDevice:
    """The dummy device holding the VIPs; every address on it is ours.

    Its rtnetlink socket lives on a `NetlinkThread` (pyroute2's async sockets
    do not run on uvloop); each method is awaited from the caller's loop.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._ipr: Any = None
        self._index: int | None = None
        self._thread: NetlinkThread | None = None

    async def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._thread is None:
            self._thread = NetlinkThread("ipvs-vips")
        return await self._thread.run(coro)

    async def open(self, create: bool = True) -> None:
        """Find the device (create it when `create`); raises BackendError when it cannot."""
        await self._run(self._open(create))

    async def _open(self, create: bool) -> None:
        self._ipr = AsyncIPRoute()
        found = await self._ipr.link_lookup(ifname=self.name)
        if not found and create:
            try:
                await self._ipr.link("add", ifname=self.name, kind="dummy")
            except NetlinkError as error:
                raise BackendError(
                    f"cannot create the VIP device {self.name} (dummy): {os.strerror(error.code)}"
                ) from error
            found = await self._ipr.link_lookup(ifname=self.name)
        self._index = found[0] if found else None

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._ipr is not None:
            thread.call(self._close())
        thread.stop()

    async def _close(self) -> None:
        self._ipr.close()
        self._ipr = None

    @property
    def exists(self) -> bool:
        return self._index is not None

    async def addresses(self) -> set[str]:
        if self._index is None:
            return set()
        return await self._run(self._addresses())

    async def _addresses(self) -> set[str]:
        dump = await self._ipr.addr("dump", index=self._index)
        return {m.get("IFA_ADDRESS") async for m in dump}

    async def add(self, address: str) -> None:
        await self._run(self._add(address))

    async def _add(self, address: str) -> None:
        try:
            await self._ipr.addr("add", index=self._index, address=address, prefixlen=32)
        except NetlinkError as error:
            if error.code != errno.EEXIST:
                raise BackendError(
                    f"cannot add VIP {address} to {self.name}: {os.strerror(error.code)}"
                ) from error

    async def remove(self, address: str) -> None:
        await self._run(self._remove(address))

    async def _remove(self, address: str) -> None:
        try:
            await self._ipr.addr("del", index=self._index, address=address, prefixlen=32)
        except NetlinkError as error:
            if error.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                raise BackendError(
                    f"cannot remove VIP {address} from {self.name}: {os.strerror(error.code)}"
                ) from error

    async def delete(self) -> None:
        """Remove the device (and with it every VIP on it)."""
        if self._index is None:
            return
        await self._run(self._delete())
        self._index = None

    async def _delete(self) -> None:
        try:
            await self._ipr.link("del", index=self._index)
        except NetlinkError as error:
            if error.code != errno.ENODEV:
                raise BackendError(
                    f"cannot remove {self.name}: {os.strerror(error.code)}"
                ) from error


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of the running kernel, from `uname -r` ("6.1.0-26-amd64" -> (6, 1))."""
    found = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def swarm_sysctls(version: tuple[int, int] | None = None) -> dict[str, str]:
    """The sysctls the IPVS backend sets, and why (docs/lb-ipvs.md has the story).

    - vs/conntrack=1: IPVS keeps conntrack entries for its connections, which
      the masquerade rule (nftables NAT) needs; Swarm sets it in NAT mode.
    - vs/expire_nodest_conn=1: a connection whose real server was removed is
      expired at its next packet (the client sees a reset, not a hang).
    - vs/expire_quiescent_template=1: persistence templates of a draining
      (weight 0) real server expire, so it gets no new connections through them.
    - vs/conn_reuse_mode: Swarm sets 0 because, with conntrack=1, mode 1 dropped
      the SYN of a connection reusing a TIME_WAIT tuple for a second (moby#35082).
      Linux 5.9 fixed that (commit d752c3645717); there mode 1 (the default) is
      better: a reused tuple is rescheduled instead of sticking to a draining or
      removed real server (the trade-off Swarm accepted). So 0 before 5.9 only.
    - ipv4/ip_forward=1: replies from real servers to remote clients are
      forwarded through this host, where IPVS un-NATs them.
    """
    reuse = "0" if (version or kernel_version()) < (5, 9) else "1"
    return {
        "net/ipv4/vs/conntrack": "1",
        "net/ipv4/vs/expire_nodest_conn": "1",
        "net/ipv4/vs/expire_quiescent_template": "1",
        "net/ipv4/vs/conn_reuse_mode": reuse,
        "net/ipv4/ip_forward": "1",
    }


def strict_arp_sysctls() -> dict[str, str]:
    """Strict ARP, as MetalLB asks of kube-proxy's IPVS mode (`strictARP: true`).

    Every VIP is a /32 on the backend's dummy device, so by Linux's default (the
    weak host model) every node would answer ARP for every VIP on each of its
    interfaces, and a VIP in a LAN's subnet would flap between nodes' MACs.
    arp_ignore=1: answer ARP only for addresses of the interface it came in on;
    arp_announce=2: take the ARP source from the outgoing interface's addresses,
    never a VIP. "all" is enough: the kernel uses the larger of all and the
    interface's value. Put back at close with the others (lb/sysctls.py).
    """
    return {"net/ipv4/conf/all/arp_ignore": "1", "net/ipv4/conf/all/arp_announce": "2"}


def write_sysctls(values: dict[str, str], root: Path = PROC_SYS) -> None:
    for key, value in values.items():
        try:
            (root / key).write_text(value + "\n")
        except OSError as error:
            raise BackendError(
                f"cannot set sysctl {key.replace('/', '.')}={value}: {error.strerror}"
            ) from error


def read_sysctl(key: str, root: Path = PROC_SYS) -> str:
    return (root / key).read_text().strip()

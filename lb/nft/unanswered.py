"""Read the TCP flows the nftables backend DNATed that no reply has reached (lb/outlier.py).

Conntrack marks a flow SEEN_REPLY at the first packet back from the real; a SYN
DNATed to a dead task never gets one. The backend's mark bit is a packet mark
(set on a flow's first packet for the masquerade, cleared in postrouting), not
a conntrack mark, so the kernel cannot select our flows by mark: the dump asks
for TCP entries only, and each entry is kept when it was DNATed (status) to a
real of the programmed table through its virtual service (`matches`, as the
flush of a removed real does) and is still unreplied. A reading stops after
`cap` entries, so a huge conntrack table costs a bounded time per poll
(`truncated` counts the readings cut short).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Mapping

from pyroute2.conntrack import AsyncConntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from lb.nft.conntrack import IPS_DST_NAT, matches
from lb.outlier import Unanswered
from lb.table import Real, VirtualKey, VirtualService
from mesh.core.netns import entered

IPS_SEEN_REPLY = 1 << 1
#: conntrack entries read per reading at most
READ_CAP = 20_000


class UnansweredReader:
    """The unanswered TCP flows DNATed to a table's reals, read on a worker thread
    (pyroute2's socket needs a loop that takes AF_NETLINK: not uvloop, see
    lb/nft/conntrack.py)."""

    def __init__(self, netns: str | None = None, cap: int = READ_CAP) -> None:
        self._netns = netns
        self.cap = cap
        self.truncated = 0

    async def read(self, table: Mapping[VirtualKey, VirtualService]) -> list[Unanswered]:
        by_real: dict[tuple[str, int], list[tuple[VirtualKey, Real]]] = {}
        for key, service in table.items():
            if key.protocol != "tcp":
                continue
            for real in service.reals:
                by_real.setdefault((real.address, real.port), []).append((key, real))
        if not by_real:
            return []
        found, truncated = await asyncio.to_thread(self._read_on_own_loop, by_real)
        self.truncated += truncated
        return found

    def _read_on_own_loop(
        self, by_real: dict[tuple[str, int], list[tuple[VirtualKey, Real]]]
    ) -> tuple[list[Unanswered], bool]:
        with contextlib.ExitStack() as stack:
            if self._netns is not None:
                path = self._netns if "/" in self._netns else f"/run/netns/{self._netns}"
                stack.enter_context(entered(path))
            loop = asyncio.SelectorEventLoop()
            try:
                return loop.run_until_complete(self._read(by_real))
            finally:
                loop.close()

    async def _read(
        self, by_real: dict[tuple[str, int], list[tuple[VirtualKey, Real]]]
    ) -> tuple[list[Unanswered], bool]:
        sock = AsyncConntrack()
        found: list[Unanswered] = []
        read = 0
        try:
            entries = await sock.dump_entries(tuple_orig=NFCTAttrTuple(proto=socket.IPPROTO_TCP))
            async for entry in entries:
                read += 1
                if read > self.cap:
                    return found, True
                status = entry.status or 0
                if status & IPS_SEEN_REPLY or not status & IPS_DST_NAT:
                    continue
                orig, reply = entry.tuple_orig, entry.tuple_reply
                for key, real in by_real.get((reply.saddr, reply.sport), ()):
                    if matches(key, real, orig, reply, status):
                        flow = (str(orig.saddr), int(orig.sport), str(orig.daddr), int(orig.dport))
                        found.append(Unanswered(flow, real))
                        break
        finally:
            sock.close()
        return found, False

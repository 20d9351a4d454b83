"""Read the TCP flows the nftables backend DNATed that no reply has reached (lb/outlier.py).

Conntrack marks a flow SEEN_REPLY at the first packet back from the real; a SYN
DNATed to a dead task never gets one. The backend's mark bit is a packet mark
(set on a flow's first packet for the masquerade, cleared in postrouting), not
a conntrack mark, so the kernel cannot select our flows by mark. It selects
them by status instead (Linux 5.15 and later: CTA_STATUS with CTA_STATUS_MASK):
DNATed, and no reply seen. So a busy node's thousands of answered flows (every
closed connection lingers two minutes in TIME_WAIT) are never sent, let alone
parsed: a reading costs a few ms, not the 0.1-0.2 s a full dump of some
hundreds of entries takes pyroute2 to parse. Each entry sent is kept when it is
TCP, was DNATed to a real of the programmed table through its virtual service
(`matches`, as the flush of a removed real does) and is still unreplied (checked
again here: an older kernel ignores the status filter and sends everything). A
reading stops after `cap` entries, so even then the time per poll is bounded
(`truncated` counts the readings cut short).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Mapping

from lb.nft.conntrack import IPS_DST_NAT, IPS_SEEN_REPLY, matches
from lb.outlier import Unanswered
from lb.table import Real, VirtualKey, VirtualService
from mesh.core.netns import entered

#: conntrack entries read per reading at most
READ_CAP = 5_000


class UnansweredReader:
    """The unanswered TCP flows DNATed to a table's reals, read on a worker thread
    (pyroute2's socket needs a loop that takes AF_NETLINK: not uvloop, see
    lb/nft/conntrack.py)."""

    def __init__(self, netns: str | None = None, cap: int = READ_CAP) -> None:
        self._netns = netns
        self.cap = cap
        self.truncated = 0
        self._indexed: Mapping[VirtualKey, VirtualService] | None = None
        self._by_real: dict[tuple[str, int], list[tuple[VirtualKey, Real]]] = {}

    async def read(self, table: Mapping[VirtualKey, VirtualService]) -> list[Unanswered]:
        if table is not self._indexed:  # the caller passes the same table until it changes
            self._by_real = {}
            for key, service in table.items():
                if key.protocol != "tcp":
                    continue
                for real in service.reals:
                    self._by_real.setdefault((real.address, real.port), []).append((key, real))
            self._indexed = table
        by_real = self._by_real
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
        # pyroute2 on first use, as lb/nft/conntrack.py: ~10 MB an agent that never reads
        # conntrack (no remote reals, another backend) does not pay
        from pyroute2.conntrack import ConntrackEntry
        from pyroute2.netlink.nfnetlink.nfctsocket import AsyncNFCTSocket

        sock = AsyncNFCTSocket()
        found: list[Unanswered] = []
        read = 0
        try:
            messages = await sock.dump(status=IPS_DST_NAT, status_mask=IPS_DST_NAT | IPS_SEEN_REPLY)
            # closed when left at the cap, not left pending on the loop closed after
            async with contextlib.aclosing(messages):
                async for message in messages:
                    read += 1
                    if read > self.cap:
                        return found, True
                    status = message.get_attr("CTA_STATUS") or 0
                    if status & IPS_SEEN_REPLY or not status & IPS_DST_NAT:
                        continue
                    entry = ConntrackEntry(
                        message["nfgen_family"],
                        message.get_attr("CTA_TUPLE_ORIG"),
                        message.get_attr("CTA_TUPLE_REPLY"),
                        status,
                        None,
                        message.get_attr("CTA_PROTOINFO"),
                        None,
                        None,
                        None,
                        None,
                    )
                    if entry.tuple_orig.proto != socket.IPPROTO_TCP:
                        continue
                    orig, reply = entry.tuple_orig, entry.tuple_reply
                    for key, real in by_real.get((reply.saddr, reply.sport), ()):
                        if matches(key, real, orig, reply, status):
                            flow = (
                                str(orig.saddr),
                                int(orig.sport),
                                str(orig.daddr),
                                int(orig.dport),
                            )
                            found.append(Unanswered(flow, real))
                            break
        finally:
            sock.close()
        return found, False

"""Forget the conntrack entries of removed reals, through pyroute2's conntrack netlink.

Conntrack keeps a flow's DNAT binding until the flow times out, so without this
a UDP "flow" (a client that keeps its source port) would go on reaching a task
that was removed for as long as it keeps sending. Only entries that were
DNATed to the removed real through the removed virtual service are deleted:
an established flow to any other real, or one that reached that real directly,
is untouched.

A TCP flow the removed real has answered is left to finish, as kube-proxy
leaves it (it clears only UDP entries): a task that fails its health check may
still serve the connections it has, and a deleted entry would send the flow's
next packet to another task, which resets it. A TCP flow it never answered (a
SYN, perhaps retransmitted, to a task on a dead node) is deleted, so the
client's next SYN is balanced anew instead of going on to the dead task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterable
from typing import Any

from lb.table import Real, VirtualKey
from mesh.core.netns import entered

log = logging.getLogger(__name__)

IPS_SEEN_REPLY = 1 << 1
IPS_DST_NAT = 1 << 5
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def matches(key: VirtualKey, real: Real, orig: Any, reply: Any, status: int) -> bool:
    """Whether one conntrack entry was DNATed to `real` through `key`."""
    if not status & IPS_DST_NAT:
        return False
    if orig.dport != key.port or (not key.published and orig.daddr != key.address):
        return False
    return bool(reply.saddr == real.address and reply.sport == real.port)


def flushed(key: VirtualKey, status: int) -> bool:
    """Whether a matching entry goes: every UDP one, a TCP one only if never answered."""
    return key.protocol != "tcp" or not status & IPS_SEEN_REPLY


class ConntrackFlusher:
    """Deletes the flows of removed (service, real) pairs.

    pyroute2's conntrack socket is asyncio-native but needs a loop that takes
    an AF_NETLINK datagram socket, which uvloop (the agent's loop) refuses
    ("invalid family 16"). So each flush runs on a worker thread, on a plain
    selector event loop of its own: the agent's loop never blocks, whatever
    loop it is.
    """

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns

    async def flush(self, removed: Iterable[tuple[VirtualKey, Real]]) -> int:
        """Delete the flows of each removed pair; the number deleted.

        One dump per virtual service, filtered by the kernel on the original
        direction's protocol, destination port and (for a VIP) address, so the
        cost follows that service's flows, not the whole conntrack table.
        """
        by_key: dict[VirtualKey, set[Real]] = {}
        for key, real in removed:
            by_key.setdefault(key, set()).add(real)
        if not by_key:
            return 0
        return await asyncio.to_thread(self._flush_on_own_loop, by_key)

    def _flush_on_own_loop(self, by_key: dict[VirtualKey, set[Real]]) -> int:
        # A sandbox's flows: this worker thread enters its namespace (setns, undone
        # after), so the netlink socket is opened there. Not pyroute2's `netns=`: it
        # forks a child to open the socket and stops it with SIGTERM, and a forked
        # child of the agent shares the event loop's signal wakeup fd, so the agent
        # took that SIGTERM for its own and stopped. A namespace that is gone raises
        # FileNotFoundError (never made anew, as pyroute2's O_CREAT default would).
        with contextlib.ExitStack() as stack:
            if self._netns is not None:
                # a name (as `ip netns` and pyroute2 take) or a path
                path = self._netns if "/" in self._netns else f"/run/netns/{self._netns}"
                stack.enter_context(entered(path))
            loop = asyncio.SelectorEventLoop()
            try:
                return loop.run_until_complete(self._flush(by_key))
            finally:
                loop.close()

    async def _flush(self, by_key: dict[VirtualKey, set[Real]]) -> int:
        # pyroute2 on first use: importing it costs ~10 MB, and an agent without sandboxes
        # (or a kernel load balancer) never needs it.
        from pyroute2.conntrack import AsyncConntrack
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        sock = AsyncConntrack()
        deleted = 0
        try:
            for key, reals in by_key.items():
                wanted = NFCTAttrTuple(
                    proto=PROTOCOLS[key.protocol],
                    dport=key.port,
                    daddr=None if key.published else key.address,
                )
                doomed = [
                    entry
                    async for entry in await sock.dump_entries(tuple_orig=wanted)
                    if flushed(key, status := entry.status or 0)
                    and any(
                        matches(key, real, entry.tuple_orig, entry.tuple_reply, status)
                        for real in reals
                    )
                ]
                for entry in doomed:
                    try:
                        await sock.delete(entry)
                        deleted += 1
                    except Exception as exc:  # gone meanwhile (it timed out): fine
                        log.debug("conntrack delete %s: %s", entry, exc)
        finally:
            sock.close()
        return deleted

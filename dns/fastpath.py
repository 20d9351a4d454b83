"""The UDP listener's fast path: a burst of queries answered from the reply cache.

`dns.server.UdpServer.datagram_received` hands each datagram the event loop
delivers to `answer_burst`, which answers it and then the queries queued behind
it on the socket (at most `budget` more reads). A query whose reply is in the
cache costs a view lookup by the asker's address, a cache lookup by the query's
bytes after its ID, the LRU touch, the next rotation of the reply, a hit count
and the reply with the asker's ID: nothing is parsed. Anything else goes to
`slow` (the responder: a miss, a name to forward, a malformed packet).

Its own module, with no class and no attribute access, so that the compiled
build (`buildtools/mypyc_build.py`) can make it C: the interpreter's dispatch
of these few operations is most of the Python a cached query costs
(docs/performance.md, DNS). The pure module is the same code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from dns.cache import FORWARD_MARK, Entry, Key
from dns.table import View

#: (host, port), or IPv6's four: the compiled build checks a typed tuple's shape, so Any
Address = tuple[Any, ...]

#: the largest UDP payload: a shorter read would silently cut a longer datagram
RECV_MAX: Final = 65535


def answer_burst(
    data: bytes,
    addr: Address,
    views: dict[str, View],
    cache: OrderedDict[Key, Entry],
    hits: list[int],
    sendto: Callable[[bytes, Address], object],
    recvfrom: Callable[[int], tuple[bytes, Address]] | None,
    slow: Callable[[bytes, Address], None],
    budget: int,
    unsent: list[int],
) -> bool:
    """Answer `data` from `addr`, then up to `budget` more datagrams read with
    `recvfrom` (None: only this one). True if the first read found the socket
    empty: the caller then skips a few drains, an empty read being a syscall wasted.

    `sendto` is the socket's own where the listener drains it: a reply its send
    buffer cannot take is dropped and counted in `unsent[0]`, as dnsmasq drops it
    (a transport would queue it, unbounded, behind a flood)."""
    left = budget
    # Bound once: each is a lookup per query otherwise (compiled too: `cache` is not a
    # plain dict, and FORWARD_MARK lives in an interpreted module).
    lookup, touch, forward_mark = cache.get, cache.move_to_end, FORWARD_MARK
    while True:
        view = views.get(addr[0])
        if view is not None:
            key: Key = (view, False, data[2:])
            entry = lookup(key)
            if entry is not None and entry is not forward_mark:
                touch(key)  # LRU: a hit goes to the back
                reply, slot = next(entry)
                hits[slot] += 1
                try:
                    sendto(data[:2] + reply, addr)
                except OSError:  # EAGAIN: the socket's send buffer is full
                    unsent[0] += 1
            else:
                slow(data, addr)
        else:
            slow(data, addr)
        if recvfrom is None or left <= 0:
            return False
        left -= 1
        try:
            data, addr = recvfrom(RECV_MAX)
        except OSError:  # EAGAIN: drained; any other error is the event loop's to see
            return left == budget - 1

"""pyroute2's asyncio netlink sockets, usable from any event loop (uvloop included).

pyroute2 0.9's async sockets open their AF_NETLINK socket as a datagram
endpoint of the running loop, which uvloop (the agent's loop) refuses
("cannot open a UDP handle, invalid family 16"). `NetlinkThread` runs a plain
selector event loop on a thread of its own; coroutines that touch pyroute2 run
there, and the caller awaits their result from whatever loop it runs. The
thread is made by the caller's thread, so it starts in the caller's network
namespace (a namespace is per thread in Linux): sockets it opens live there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class NetlinkThread:
    def __init__(self, name: str = "netlink") -> None:
        self._loop = asyncio.SelectorEventLoop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the netlink thread's loop; await its result here."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """The same, blocking (for close paths with no loop left)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

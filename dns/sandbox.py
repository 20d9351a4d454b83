"""DNS inside sandboxes: 127.0.0.11:53 (UDP and TCP) in each sandbox's namespace.

For every sandbox the agent opens two sockets *inside* its network namespace
(a short synchronous block in `mesh.core.netns.entered`: a socket belongs to
the namespace it was made in for its whole life, whichever thread serves it)
and serves them from the agent's event loop with the same responder, cache and
forwarder as its own listener, but with a fixed view: the sandbox's networks
(`dns.table.sandbox_view`). So a sandbox sees the services on its networks and
nothing else, whatever address it asks from; names the mesh does not own are
forwarded as from the host (the forwarder's sockets live in the agent's own
namespace).

The sockets are bound and listening when `open` returns, so a query sent
right after is queued by the kernel and answered once the loop attaches them.
`open` and `close` may be called from any thread (the sandbox manager's worker
thread, say): the event-loop side of the work is handed to the loop.

A namespace that vanished (its file removed: `ip netns delete`, the adopted
process exited; our sockets keep the kernel object alive, so it cannot be
seen any other way) is found by `sweep`, run every `check_interval` seconds:
its listeners are closed and counted (`sandbox_vanished`).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from dns.responder import Responder
from dns.server import Forward, TcpServer, UdpServer, serve_sockets, udp_socket
from dns.table import sandbox_view
from mesh.core import upkeep
from mesh.core.logs import event
from mesh.core.netns import entered

log = logging.getLogger(__name__)

SANDBOX_DNS_HOST = "127.0.0.11"  # Docker's embedded DNS address, in every sandbox
SANDBOX_DNS_PORT = 53
TCP_BACKLOG = 128
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
IFREQ = "16sH22x"  # struct ifreq: the name, the flags, the rest of the union


def loopback_up() -> None:
    """Bring `lo` up in this thread's namespace (a fresh namespace has it down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(IFREQ, b"lo", 0)
        flags = struct.unpack(IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))


def namespace_identity(netns: str) -> tuple[int, int]:
    """What tells one namespace from another: the (device, inode) of its nsfs file."""
    info = os.stat(netns)
    return info.st_dev, info.st_ino


def open_sockets(netns: str, host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A bound UDP socket and a listening TCP socket on host:port inside `netns`."""
    with entered(netns):
        loopback_up()
        udp = udp_socket(host, port, reuse_port=False)
        try:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((host, port))
                tcp.listen(TCP_BACKLOG)
            except OSError:
                tcp.close()
                raise
        except OSError:
            udp.close()
            raise
    return udp, tcp


@dataclass(eq=False, slots=True)
class SandboxListener:
    key: str
    netns: str
    identity: tuple[int, int]
    networks: tuple[str, ...]
    udp_sock: socket.socket
    tcp_sock: socket.socket
    udp: UdpServer | None = None
    tcp: TcpServer | None = None
    closed: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class SandboxDns:
    """The 127.0.0.11 listeners of every open sandbox, by key (a task id)."""

    def __init__(
        self,
        responder: Responder,
        forward: Forward,
        *,
        host: str = SANDBOX_DNS_HOST,
        port: int = SANDBOX_DNS_PORT,
    ) -> None:
        self.responder = responder
        self.forward = forward
        self.host = host
        self.port = port
        self._listeners: dict[str, SandboxListener] = {}
        self._lock = threading.Lock()  # open/close may come from the manager's thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.stats: dict[str, int] = dict.fromkeys(
            ("opened", "closed", "vanished", "open_failed"), 0
        )

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop that serves the listeners (the caller's, when called on it)."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._listeners)

    def networks(self, key: str) -> tuple[str, ...] | None:
        with self._lock:
            listener = self._listeners.get(key)
            return None if listener is None else listener.networks

    # -- opening and closing (any thread) ------------------------------------------

    def open(self, key: str, netns: str, networks: tuple[str, ...]) -> None:
        """Listen on 127.0.0.11:53 inside `netns` for sandbox `key`, seeing `networks`.

        Idempotent: the same namespace again only updates the view (the
        service's networks may change); another namespace replaces the
        listeners. Raises OSError when the namespace cannot be entered or the
        address is taken there (counted as `open_failed`).
        """
        view = sandbox_view(networks)
        try:
            identity = namespace_identity(netns)
        except OSError:
            self._count("open_failed")
            raise
        with self._lock:
            current = self._listeners.get(key)
        if current is not None and current.netns == netns and current.identity == identity:
            if current.networks != view:
                current.networks = view
                self._on_loop(lambda: self._set_view(current, view))
            return
        try:
            udp_sock, tcp_sock = open_sockets(netns, self.host, self.port)
        except OSError:
            self._count("open_failed")
            raise
        listener = SandboxListener(key, netns, identity, view, udp_sock, tcp_sock)
        with self._lock:
            old = self._listeners.pop(key, None)
            self._listeners[key] = listener
            self.stats["opened"] += 1
        if old is not None:
            self._close_on_loop(old)
        self._on_loop(lambda: self._attach(listener))

    def close(self, key: str) -> None:
        """Close sandbox `key`'s listeners; nothing if it has none."""
        with self._lock:
            listener = self._listeners.pop(key, None)
            if listener is not None:
                self.stats["closed"] += 1
        if listener is not None:
            self._close_on_loop(listener)

    def sweep(self) -> list[str]:
        """Close the listeners of every namespace that vanished; return their keys."""
        with self._lock:
            listeners = list(self._listeners.values())
        gone = []
        for listener in listeners:
            try:
                alive = namespace_identity(listener.netns) == listener.identity
            except OSError:
                alive = False
            if alive:
                continue
            with self._lock:
                if self._listeners.get(listener.key) is not listener:
                    continue  # closed or replaced meanwhile
                del self._listeners[listener.key]
                self.stats["vanished"] += 1
            gone.append(listener.key)
            self._close_on_loop(listener)
        if gone:
            event(log, "dns_sandbox_vanished", count=len(gone), keys=",".join(gone[:8]))
        return gone

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    # -- the event loop's side ------------------------------------------------------

    def _on_loop(self, work: Callable[[], None]) -> None:
        if self._loop is None:
            raise RuntimeError("the sandbox DNS has no event loop yet (start the DNS first)")
        if threading.get_ident() == self._loop_thread:
            work()
        else:
            self._loop.call_soon_threadsafe(work)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _attach(self, listener: SandboxListener) -> None:
        self._spawn(self._serve(listener))

    async def _serve(self, listener: SandboxListener) -> None:
        if listener.closed:
            return
        try:
            udp, tcp = await serve_sockets(
                self.responder,
                self.forward,
                listener.udp_sock,
                listener.tcp_sock,
                listener.networks,
            )
        except OSError as exc:
            listener.udp_sock.close()
            listener.tcp_sock.close()
            with self._lock:  # not open: the next open_sandbox tries afresh
                if self._listeners.get(listener.key) is listener:
                    del self._listeners[listener.key]
                self.stats["open_failed"] += 1
            event(log, "dns_sandbox_failed", logging.WARNING, key=listener.key, error=str(exc))
            return
        listener.udp, listener.tcp = udp, tcp
        if listener.closed:  # closed while it was being attached
            await self._shut(listener)

    def _set_view(self, listener: SandboxListener, view: tuple[str, ...]) -> None:
        for server in (listener.udp, listener.tcp):
            if server is not None:
                server.view = view

    def _close_on_loop(self, listener: SandboxListener) -> None:
        def close() -> None:
            listener.closed = True
            if listener.udp is not None or listener.tcp is not None:
                self._spawn(self._shut(listener))
            # else: still attaching; _serve sees `closed` and shuts it

        self._on_loop(close)

    async def _shut(self, listener: SandboxListener) -> None:
        if listener.udp is not None:
            await listener.udp.close()
        if listener.tcp is not None:
            await listener.tcp.close()
        listener.udp_sock.close()
        listener.tcp_sock.close()

    async def close_all(self) -> None:
        """Close every listener (the agent stops; the sandboxes themselves stay)."""
        with self._lock:
            listeners = list(self._listeners.values())
            self._listeners.clear()
        for listener in listeners:
            listener.closed = True
        await asyncio.gather(*self._pending, return_exceptions=True)
        for listener in listeners:
            await self._shut(listener)

    def tcp_stats(self) -> dict[str, int]:
        """The TCP counters of every sandbox listener, summed."""
        total: dict[str, int] = {}
        with self._lock:
            servers = [x.tcp for x in self._listeners.values() if x.tcp is not None]
        for server in servers:
            for name, value in server.stats.items():
                total[name] = total.get(name, 0) + value
        return total

    def __len__(self) -> int:
        with self._lock:
            return len(self._listeners)


async def sweep_forever(sandboxes: SandboxDns, interval: float) -> None:
    """Run `sweep` every `interval` seconds until cancelled."""
    while True:
        await upkeep.sleep(interval)  # rides a wake-up taken anyway (mesh.core.upkeep)
        try:
            sandboxes.sweep()
        except Exception as exc:  # a bug in one sweep must not end the sweeping
            event(log, "dns_internal_error", logging.ERROR, error=repr(exc))

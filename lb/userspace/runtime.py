"""What every proxied connection of one userspace backend shares: settings, counters,
reusable buffers, the connection limit and the idle sweep, and the listening sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from lb.accesslog import OFF as access_off
from lb.accesslog import AccessLog, AccessLogSettings
from lb.userspace.transparent import Transparency

#: Linux's IP_FREEBIND: bind a VIP that is not (yet) an address of this host.
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    """How the userspace proxy runs. Durations are in seconds."""

    #: where published ports (ANY_ADDRESS) listen: every address by default; agents
    #: sharing one host each give their own (`--publish-address`)
    publish_address: str = "0.0.0.0"
    connect_timeout: float = 3.0
    #: a TCP connection with no byte either way for this long is closed. Long on
    #: purpose: the complaint about IPVS is idle connections cut at 900 s.
    tcp_idle_timeout: float = 7800.0
    #: a UDP flow (client address -> its real) is forgotten after this long idle
    udp_idle_timeout: float = 30.0
    #: open TCP connections plus UDP flows, over all virtual services
    max_connections: int = 16384
    #: bytes read at once per direction; a buffer is held only while a write waits
    buffer_size: int = 256 * 1024
    backlog: int = 1024
    #: the connection-level access log (a sampled line per TCP connection when it ends)
    access_log: AccessLogSettings = access_off
    #: connect to a `traffic-policy=local` port's tasks from the client's address
    #: (IP_TRANSPARENT: needs CAP_NET_ADMIN; lb/userspace/transparent.py)
    transparent: bool = False

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "tcp_idle_timeout", "udp_idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_connections < 1 or self.buffer_size < 1024 or self.backlog < 1:
            raise ValueError("max_connections, buffer_size (>= 1024) and backlog must be positive")


class KeyStats:
    """One virtual service's counts, plain ints bumped on the hot path (no lock, no call).

    Bytes of a connection or flow are added when it ends; while it is open they
    are its own counters, which `UserspaceBackend.service_counters` adds at
    scrape time, so a long connection's bytes show before it ends.
    """

    __slots__ = ("bytes_in", "bytes_out", "connect_errors", "connections", "failovers")

    def __init__(self) -> None:
        self.connections = 0  # TCP connections accepted, UDP flows opened
        self.bytes_in = 0  # from clients, of connections and flows that ended
        self.bytes_out = 0  # to clients
        self.connect_errors = 0  # connects to a real that failed (or a real refusing UDP)
        self.failovers = 0  # connections that reached a real after another had failed


class Expiring(Protocol):
    """A connection or flow the idle sweep watches: `idle` is reset by traffic."""

    idle: int
    idle_limit: int

    def expire(self) -> None: ...

    def usage(self) -> tuple[KeyStats, int, int]:
        """Its virtual service's counts, and its own bytes so far from and to the client."""
        ...


class Buffers:
    """Reusable read buffers, beside the runtime's spare: a connection takes one only
    while its peer cannot take more (a write waits, holding it), or for its client's
    bytes while the real is being connected, and gives it back after.

    Most writes complete at once, so a handful of buffers serves any number of
    connections.
    """

    def __init__(self, size: int, keep: int = 64) -> None:
        self.size = size
        self._free: list[memoryview] = []
        self._keep = keep

    def take(self) -> memoryview:
        if self._free:
            return self._free.pop()
        return memoryview(bytearray(self.size))

    def give(self, buffer: memoryview) -> None:
        if len(self._free) < self._keep:
            self._free.append(buffer)


class Runtime:
    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.stats: Counter[str] = Counter()
        self.buffers = Buffers(settings.buffer_size)
        #: the buffer every TCP read goes into; never held by a pending write (a write
        #: that has to wait takes it with it and a new spare is made: lb/userspace/tcp.py)
        self.spare = self.buffers.take()
        self.open: set[Expiring] = set()
        self.tick = min(
            5.0, max(0.05, min(settings.tcp_idle_timeout, settings.udp_idle_timeout) / 4)
        )
        self.tcp_idle_ticks = math.ceil(settings.tcp_idle_timeout / self.tick)
        self.udp_idle_ticks = math.ceil(settings.udp_idle_timeout / self.tick)
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: the return path of transparent connects; None: the proxy's own address
        self.transparency: Transparency | None = Transparency() if settings.transparent else None
        log = AccessLog(settings.access_log)
        #: the access log, None when off (its rate is 0)
        self.access = log if log.enabled else None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        # Cached: asyncio.get_running_loop() costs a getpid() system call each time
        # (CPython checks for a fork), and every connection asked several times.
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def admit(self, item: Expiring) -> bool:
        """Count a new connection or flow in, or refuse it over the limit."""
        if len(self.open) >= self.settings.max_connections:
            self.stats["refused_limit"] += 1
            return False
        self.open.add(item)
        return True

    def release(self, item: Expiring) -> None:
        self.open.discard(item)

    def counters(self) -> dict[str, int]:
        return dict(self.stats) | (self.access.counters() if self.access is not None else {})

    def start(self) -> None:
        if self.access is not None:
            self.access.start()
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        # One pass every `tick` instead of a timer per connection reset on every
        # read: traffic only zeroes a counter.
        while True:
            await asyncio.sleep(self.tick)
            for item in list(self.open):
                item.idle += 1
                if item.idle > item.idle_limit:
                    self.stats["idle_closed"] += 1
                    item.expire()

    async def close(self) -> None:
        for item in list(self.open):
            item.expire()
        self.open.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self.access is not None:
            self.access.stop()


def listening_socket(kind: socket.SocketKind, host: str, port: int, backlog: int) -> socket.socket:
    """A bound, non-blocking socket for a virtual service.

    SO_REUSEPORT lets worker processes (and agents sharing a host) serve one
    address together; IP_FREEBIND lets a VIP be bound before it is routed here.
    """
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock

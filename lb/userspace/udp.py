"""The UDP half of the userspace proxy: per client address a flow with its own
socket connected to one real server, forgotten after an idle timeout.

Datagrams are moved with the sockets' own non-blocking calls from reader
callbacks (no transports): `recvfrom_into` a reusable buffer, `send`/`sendto`
of a memoryview. A datagram that cannot be sent at once is dropped and
counted, as the kernel would drop it. A real that answers with ICMP port
unreachable (ConnectionRefusedError on the flow's socket) makes the flow
fail over to the next real.
"""

from __future__ import annotations

import contextlib
import socket
import time

from lb.table import Real, ServiceOptions, VirtualKey
from lb.userspace.runtime import KeyStats, Runtime, listening_socket
from lb.userspace.scheduler import Pool

#: datagrams handled per wake-up before other callbacks get their turn
BATCH = 64
DATAGRAM_MAX = 65535


class Flow:
    """One client address's datagrams to and from one real server."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "client",
        "idle",
        "idle_limit",
        "logged",
        "real",
        "service",
        "sock",
        "tried",
    )

    def __init__(self, service: UdpService, client: tuple[str, int]) -> None:
        self.service = service
        self.client = client
        self.idle = 0
        self.idle_limit = service.runtime.udp_idle_ticks
        self.real: Real | None = None
        self.sock: socket.socket | None = None
        self.tried: set[Real] = set()
        self.logged = 0.0  # when it began, if the access log samples it
        self.bytes_in = 0  # from the client (for the access log)
        self.bytes_out = 0  # to the client

    def connect(self) -> bool:
        """Pick a real (past the ones that refused) and connect a socket to it."""
        self._close_socket()
        pool = self.service.pool
        while True:
            real = pool.pick(self.tried, self.client, time.monotonic())
            if real is None:
                return False
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                sock.connect((real.address, real.port))
            except OSError:
                sock.close()
                self.tried.add(real)
                continue
            self.sock, self.real = sock, real
            pool.opened(real)
            self.service.runtime.loop.add_reader(sock.fileno(), self._readable)
            return True

    def send(self, data: memoryview) -> None:
        self.idle = 0
        self.bytes_in += len(data)
        assert self.sock is not None
        try:
            self.sock.send(data)
        except BlockingIOError:
            self.service.runtime.stats["udp_dropped"] += 1
        except ConnectionRefusedError:
            self._failover()
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.send(data)
        except OSError:
            self.service.runtime.stats["udp_dropped"] += 1

    def _readable(self) -> None:
        service = self.service
        buffer = service.buffer
        sock = self.sock
        assert sock is not None
        for _ in range(BATCH):
            try:
                size = sock.recv_into(buffer)
            except BlockingIOError:
                return
            except ConnectionRefusedError:  # the real's port is closed: try the next one
                self._failover()
                return
            except OSError:
                return
            self.idle = 0
            self.bytes_out += size
            service.reply(buffer[:size], self.client)

    def _failover(self) -> None:
        runtime = self.service.runtime
        runtime.stats["udp_failovers"] += 1
        stats = self.service.stats
        stats.connect_errors += 1
        if self.real is not None:
            self.tried.add(self.real)
        if not self.connect():
            runtime.stats["udp_no_real"] += 1
            self.expire()
        else:
            stats.failovers += 1

    def usage(self) -> tuple[KeyStats, int, int]:
        return self.service.stats, self.bytes_in, self.bytes_out

    def _close_socket(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(Exception):
                self.service.runtime.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if self.real is not None:
            self.service.pool.closed(self.real)
            self.real = None

    def expire(self) -> None:
        if self.logged:
            self._log_access()
            self.logged = 0.0
        self._close_socket()
        self.service.forget(self)

    def _log_access(self) -> None:
        """The flow's access-log entry, when it ends (idle, or the proxy closing)."""
        access = self.service.runtime.access
        if access is None:
            return
        now = time.time()
        access.put(
            {
                "time": now,
                "kind": "udp",
                "client": self.client[0],
                "service": str(self.service.key),
                "backend": str(self.real) if self.real is not None else "-",
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "duration_ms": round((now - self.logged) * 1000, 3),
            }
        )


class UdpService:
    """One UDP virtual service: its socket, its flows and its pool of real servers."""

    def __init__(
        self,
        key: VirtualKey,
        options: ServiceOptions,
        pool: Pool,
        runtime: Runtime,
        stats: KeyStats | None = None,
    ) -> None:
        self.key = key
        self.options = options  # PROXY protocol is TCP only: a UDP service ignores it
        self.pool = pool
        self.runtime = runtime
        self.stats = stats or KeyStats()
        self.flows: dict[tuple[str, int], Flow] = {}
        self.buffer = memoryview(bytearray(DATAGRAM_MAX))
        self._sock: socket.socket | None = None

    async def listen(self, host: str) -> None:
        self._sock = listening_socket(socket.SOCK_DGRAM, host, self.key.port, 0)
        self.runtime.loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        buffer = self.buffer
        for _ in range(BATCH):
            try:
                size, client = sock.recvfrom_into(buffer)
            except BlockingIOError:
                return
            except OSError:
                continue
            flow = self.flows.get(client)
            if flow is None:
                flow = self._open(client)
                if flow is None:
                    continue
            flow.send(buffer[:size])

    def _open(self, client: tuple[str, int]) -> Flow | None:
        flow = Flow(self, client)
        if not self.runtime.admit(flow):
            self.runtime.stats["udp_dropped"] += 1
            return None
        if not flow.connect():
            self.runtime.release(flow)
            self.runtime.stats["udp_no_real"] += 1
            return None
        self.runtime.stats["udp_flows"] += 1
        self.stats.connections += 1
        self.flows[client] = flow
        access = self.runtime.access
        if access is not None and access.take():
            flow.logged = time.time()
        return flow

    def reply(self, data: memoryview, client: tuple[str, int]) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sock.sendto(data, client)
        except OSError:
            self.runtime.stats["udp_dropped"] += 1

    def forget(self, flow: Flow) -> None:
        if self.flows.get(flow.client) is flow:
            del self.flows[flow.client]
            self.stats.bytes_in += flow.bytes_in
            self.stats.bytes_out += flow.bytes_out
        self.runtime.release(flow)

    def close(self) -> None:
        """Stop receiving; flows already open answer until they expire."""
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self.runtime.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

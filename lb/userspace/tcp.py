"""The TCP half of the userspace proxy: one listener per virtual service, and per
accepted connection a `Splice` of two `Side`s that copy bytes to each other.

Copying is protocol-level (no streams): each side is a `BufferedProtocol`
reading straight into a reusable buffer, written to the peer as a memoryview
without a copy. The peer transport's write-buffer limit is 0, so the moment a
write cannot go out whole the peer pauses this side's reading (`pause_writing`)
and the buffer stays with the pending write until it has drained
(`resume_writing`): flow control and buffer reuse are the same mechanism.

End of stream is passed on as a half-close (`write_eof`), so a client that
shuts down its sending side still gets the whole answer; the connection ends
when both directions have ended, or one side is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import cast

from lb.fds import is_fd_shortage
from lb.table import Real, Scheduler, ServiceOptions, VirtualKey
from lb.userspace import proxy_protocol
from lb.userspace.runtime import KeyStats, Runtime, listening_socket
from lb.userspace.scheduler import Pool

log = logging.getLogger(__name__)


class Side(asyncio.BufferedProtocol):
    """One end of a proxied connection: what it reads goes to `peer`."""

    __slots__ = ("buffer", "eof", "peer", "received", "splice", "stalled", "transport")

    def __init__(self, splice: Splice) -> None:
        self.splice = splice
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.buffer: memoryview | None = None
        self.stalled = False  # our transport holds unsent bytes: the peer must not read
        self.eof = False
        self.received = 0  # bytes read and passed on (for the access log)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=0)
        if self.peer is None:  # the client side: accepted by the listener
            self.splice.accepted(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        buffer = self.buffer
        if buffer is None:
            buffer = self.buffer = self.splice.runtime.buffers.take()
        if self.peer is None:  # still connecting: bytes go after the ones held already
            return buffer[self.splice.early :]
        return buffer

    def buffer_updated(self, nbytes: int) -> None:
        splice = self.splice
        splice.idle = 0
        peer = self.peer
        if peer is None:
            # Client bytes before the real answered (a request usually comes at
            # once): hold them in the buffer, and stop reading only once it is full.
            splice.early += nbytes
            assert self.transport is not None and self.buffer is not None
            if splice.early >= len(self.buffer):
                self.transport.pause_reading()
            return
        assert peer.transport is not None and self.buffer is not None
        self.received += nbytes
        peer.transport.write(self.buffer[:nbytes])
        if not peer.stalled:  # all written: the buffer is free again
            splice.runtime.buffers.give(self.buffer)
            self.buffer = None

    def pause_writing(self) -> None:
        self.stalled = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.stalled = False
        peer = self.peer
        if peer is None:
            return
        if peer.buffer is not None:
            self.splice.runtime.buffers.give(peer.buffer)
            peer.buffer = None
        if peer.transport is not None and not peer.transport.is_closing() and not peer.eof:
            peer.transport.resume_reading()

    def release_buffer(self) -> None:
        """Give the read buffer back unless a stalled write of the peer still holds it."""
        buffer = self.buffer
        if buffer is not None:
            self.buffer = None
            peer = self.peer
            if peer is None or not peer.stalled:
                self.splice.runtime.buffers.give(buffer)

    def eof_received(self) -> bool:
        self.eof = True
        # The read that found the EOF took a buffer it did not fill.
        if self.splice.early == 0:
            self.release_buffer()
        if self.peer is not None:  # else the EOF is passed on once the real answers
            self.splice.half_closed(self)
        return True  # keep our sending direction open for the peer's remaining bytes

    def connection_lost(self, exc: Exception | None) -> None:
        self.splice.lost(self)


class Splice:
    """One client connection and its connection to a real server."""

    __slots__ = (
        "client",
        "connecting",
        "done",
        "early",
        "idle",
        "idle_limit",
        "logged",
        "peer_ip",
        "real",
        "runtime",
        "service",
        "timed_out",
        "upstream",
    )

    def __init__(self, service: TcpService) -> None:
        self.service = service
        self.runtime = service.runtime
        self.client = Side(self)
        self.upstream: Side | None = None
        self.real: Real | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.idle = 0
        self.idle_limit = self.runtime.tcp_idle_ticks
        self.done = False
        self.early = 0  # client bytes read before the real answered
        self.timed_out = False
        self.logged = 0.0  # when it was accepted, if the access log samples it
        self.peer_ip = ""

    def accepted(self, client: Side) -> None:
        transport = client.transport
        assert transport is not None
        if not self.runtime.admit(self):
            self.done = True
            transport.abort()
            return
        self.runtime.stats["tcp_accepted"] += 1
        self.service.stats.connections += 1
        access = self.runtime.access
        if access is not None and access.take():
            self.logged = time.time()
            peer = transport.get_extra_info("peername")
            self.peer_ip = str(peer[0]) if peer else ""
        self.connecting = self.runtime.loop.create_task(self._connect())

    async def _connect(self) -> None:
        runtime = self.runtime
        pool = self.service.pool
        loop = runtime.loop
        tried: set[Real] = set()
        # Maglev and affinity need the client's address; the others do not ask for it.
        source: tuple[str, int] | None = None
        if pool.affinity or pool.scheduler is Scheduler.MAGLEV:
            accepted = self.client.transport
            peer = accepted.get_extra_info("peername") if accepted is not None else None
            source = (str(peer[0]), int(peer[1])) if peer else None
        now = time.monotonic()
        while True:
            real = pool.pick(tried, source, now)
            if real is None:
                runtime.stats["tcp_no_real"] += 1
                self._close_client(abort=True)
                return
            upstream = Side(self)
            upstream.peer = self.client
            # A plain timer, not asyncio.timeout(): that asks for the running loop and
            # the current task, a getpid() system call each, on every connection.
            timer = loop.call_later(runtime.settings.connect_timeout, self._connect_timed_out)
            try:
                await self._open(real, upstream)
                break
            except asyncio.CancelledError:
                if not self.timed_out:
                    raise  # the client left, or the backend is closing
                self.timed_out = False
                assert self.connecting is not None
                self.connecting.uncancel()
                runtime.stats["tcp_connect_failed"] += 1
                self.service.stats.connect_errors += 1
                log.debug("connect to %s for %s timed out", real, self.service.key)
                tried.add(real)
            except OSError as exc:
                if is_fd_shortage(exc):
                    # This process is out of descriptors: not the real's failure, and
                    # every other real would fail the same way. Counted on its own.
                    runtime.stats["tcp_fd_shortage"] += 1
                    self.connecting = None
                    self._close_client(abort=True)
                    return
                runtime.stats["tcp_connect_failed"] += 1
                self.service.stats.connect_errors += 1
                log.debug("connect to %s for %s failed: %r", real, self.service.key, exc)
                tried.add(real)
            finally:
                timer.cancel()
        if tried:
            runtime.stats["tcp_failovers"] += 1
            self.service.stats.failovers += 1
        self.connecting = None
        client = self.client.transport
        assert client is not None and upstream.transport is not None
        if self.done or client.is_closing():  # the client left while we connected
            upstream.transport.close()
            return
        self.real = real
        pool.opened(real)
        self.upstream = upstream
        self.client.peer = upstream
        if self.service.options.proxy_protocol:
            upstream.transport.write(
                proxy_protocol.build(
                    "tcp",
                    client.get_extra_info("peername")[:2],
                    client.get_extra_info("sockname")[:2],
                )
            )
        if self.early:
            early, self.early = self.early, 0
            self.client.buffer_updated(early)
        if self.client.eof:
            self.half_closed(self.client)
        elif not upstream.stalled and not client.is_reading():
            client.resume_reading()  # it had filled the buffer while we connected

    async def _open(self, real: Real, upstream: Side) -> None:
        """Connect `upstream` to `real`: from the client's own address for a
        `traffic-policy=local` port when the proxy may (lb/userspace/transparent.py)."""
        loop = self.runtime.loop
        transparency = self.runtime.transparency
        client = self.client.transport
        if (
            transparency is not None
            and transparency.ready
            and self.service.options.local
            and client is not None
        ):
            sock = transparency.socket_from(client.get_extra_info("peername")[0])
            try:
                await loop.sock_connect(sock, (real.address, real.port))
                await loop.create_connection(lambda: upstream, sock=sock)
            except BaseException:
                sock.close()
                raise
            return
        await loop.create_connection(lambda: upstream, real.address, real.port)

    def _connect_timed_out(self) -> None:
        if self.connecting is not None:
            self.timed_out = True
            self.connecting.cancel()

    def half_closed(self, side: Side) -> None:
        peer = side.peer
        if peer is None or peer.transport is None:
            return
        if peer.eof:  # both directions have ended
            self._close_both()
        elif peer.transport.can_write_eof():
            peer.transport.write_eof()

    def lost(self, side: Side) -> None:
        if not self.done:
            self.done = True
            self.runtime.release(self)
            stats, bytes_in, bytes_out = self.usage()
            stats.bytes_in += bytes_in
            stats.bytes_out += bytes_out
            if self.real is not None:
                self.service.pool.closed(self.real)
            if self.logged:
                self._log_access()
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.early == 0:
            side.release_buffer()
        peer = side.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()  # sends what it holds, then closes

    def usage(self) -> tuple[KeyStats, int, int]:
        upstream = self.upstream
        return (
            self.service.stats,
            self.client.received,
            upstream.received if upstream is not None else 0,
        )

    def _log_access(self) -> None:
        """The connection's access-log entry (formatted by the log's writer thread)."""
        access = self.runtime.access
        assert access is not None
        now = time.time()
        upstream = self.upstream
        access.put(
            {
                "time": now,
                "kind": "tcp",
                "client": self.peer_ip,
                "service": str(self.service.key),
                "backend": str(self.real) if self.real is not None else "-",
                "bytes_in": self.client.received,
                "bytes_out": upstream.received if upstream is not None else 0,
                "duration_ms": round((now - self.logged) * 1000, 3),
            }
        )

    def _close_client(self, *, abort: bool) -> None:
        transport = self.client.transport
        if transport is not None:
            transport.abort() if abort else transport.close()

    def _close_both(self) -> None:
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                side.transport.close()

    def expire(self) -> None:
        """Idle too long (or the backend is closing): end both connections now."""
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                side.transport.abort()
        if self.connecting is not None:
            self.connecting.cancel()


class TcpService:
    """One TCP virtual service: its listener and its pool of real servers."""

    def __init__(
        self,
        key: VirtualKey,
        options: ServiceOptions,
        pool: Pool,
        runtime: Runtime,
        stats: KeyStats | None = None,
    ) -> None:
        self.key = key
        self.options = options
        self.pool = pool
        self.runtime = runtime
        self.stats = stats or KeyStats()
        self._server: asyncio.AbstractServer | None = None

    async def listen(self, host: str) -> None:
        sock = listening_socket(
            socket.SOCK_STREAM, host, self.key.port, self.runtime.settings.backlog
        )
        try:
            self._server = await self.runtime.loop.create_server(
                lambda: Splice(self).client, sock=sock, backlog=self.runtime.settings.backlog
            )
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        """Stop accepting; connections already made carry on until they end."""
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.close()
            self._server = None

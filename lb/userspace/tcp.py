"""The TCP half of the userspace proxy: one listener per virtual service, and per
accepted connection a `Splice` of two `Side`s that copy bytes to each other.

Copying is protocol-level (no streams): each side is a `BufferedProtocol`
reading straight into the runtime's one spare buffer, written to the peer as a
memoryview without a copy. The peer transport's write-buffer limit is 0, so the
moment a write cannot go out whole the peer pauses this side's reading
(`pause_writing`) and the buffer stays with the pending write until it has
drained (`resume_writing`), while a new spare takes its place: flow control and
buffer reuse are the same mechanism. A read costs two Python callbacks and no
other call (docs/performance.md, L4 userspace, has the budget).

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
from lb.userspace.scheduler import NOTHING, Pool

log = logging.getLogger(__name__)


class Side(asyncio.BufferedProtocol):
    """One end of a proxied connection: what it reads goes to `peer`.

    Reads go into the runtime's one spare buffer and are written to the peer at once;
    the buffer is free again as soon as that write has gone out whole, which is the
    rule. Only a write that waits (the peer is stalled) keeps it: it becomes this
    side's `buffer` until the peer drains, and the runtime takes a new spare. So the
    keep-alive path is two Python callbacks per read, with no call and no
    allocation for the buffer.
    """

    __slots__ = ("buffer", "eof", "peer", "received", "runtime", "splice", "stalled", "transport")

    def __init__(self, splice: Splice, runtime: Runtime) -> None:
        self.splice = splice
        self.runtime = runtime
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        #: a buffer of this side's own: the client's bytes read while connecting,
        #: or the one a stalled write of the peer still holds
        self.buffer: memoryview | None = None
        self.stalled = False  # our transport holds unsent bytes: the peer must not read
        self.eof = False
        self.received = 0  # bytes read and passed on (for the access log)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream: a Transport
        transport.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]
        if self.peer is None:  # the client side: accepted by the listener
            self.splice.accepted(self)

    def itself(self) -> Side:
        """The protocol factory of a connection made for this side."""
        return self

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.peer is not None:
            return self.runtime.spare
        # Still connecting: the client's bytes wait in a buffer of their own, after
        # the ones held already.
        buffer = self.buffer
        if buffer is None:
            buffer = self.buffer = self.runtime.buffers.take()
        return buffer[self.splice.early :]

    def buffer_updated(self, nbytes: int) -> None:
        splice = self.splice
        splice.idle = 0
        peer = self.peer
        if peer is None:
            # Client bytes before the real answered (a request usually comes at
            # once): hold them, and stop reading only once the buffer is full.
            splice.early += nbytes
            buffer = self.buffer
            if buffer is not None and splice.early >= len(buffer) and self.transport is not None:
                self.transport.pause_reading()
            return
        self.received += nbytes
        runtime = self.runtime
        spare = runtime.spare
        peer.transport.write(spare[:nbytes])  # type: ignore[union-attr]  # set once connected
        if peer.stalled:
            # The write waits and holds the buffer: it is ours until the peer drains.
            self.buffer = spare
            runtime.spare = runtime.buffers.take()

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
        buffer = peer.buffer
        if buffer is not None:  # what we held of the peer's has gone out
            peer.buffer = None
            self.runtime.buffers.give(buffer)
        if peer.transport is not None and not peer.transport.is_closing() and not peer.eof:
            peer.transport.resume_reading()

    def release_buffer(self) -> None:
        """Give the read buffer back unless a stalled write of the peer still holds it."""
        buffer = self.buffer
        if buffer is not None:
            self.buffer = None
            peer = self.peer
            if peer is None or not peer.stalled:
                self.runtime.buffers.give(buffer)

    def eof_received(self) -> bool:
        self.eof = True
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
        self.client = Side(self, self.runtime)
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
        runtime = self.runtime
        if not runtime.admit(self):
            self.done = True
            transport.abort()
            return
        runtime.stats["tcp_accepted"] += 1
        self.service.stats.connections += 1
        access = runtime.access
        if access is not None and access.take():
            self.logged = time.time()
            peer = transport.get_extra_info("peername")
            self.peer_ip = str(peer[0]) if peer else ""
        self.connecting = self.service.loop.create_task(self._connect())

    async def _connect(self) -> None:
        service = self.service
        runtime = self.runtime
        pool = service.pool
        loop = service.loop
        # Reals that failed this connection: made only when one does.
        tried: set[Real] | frozenset[Real] = NOTHING
        # Maglev and affinity need the client's address (and affinity the clock);
        # the others ask for neither.
        source: tuple[str, int] | None = None
        now = 0.0
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
            upstream = Side(self, runtime)
            upstream.peer = self.client
            # A plain timer, not asyncio.timeout(): that asks for the running loop and
            # the current task, a getpid() system call each, on every connection.
            timer = loop.call_later(runtime.settings.connect_timeout, self._connect_timed_out)
            try:
                if self.service.options.local and runtime.transparency is not None:
                    await self._open_transparent(real, upstream)
                else:  # no coroutine of our own around it: one fewer per connection
                    await loop.create_connection(upstream.itself, real.address, real.port)
                break
            except asyncio.CancelledError:
                if not self.timed_out:
                    raise  # the client left, or the backend is closing
                self.timed_out = False
                assert self.connecting is not None
                self.connecting.uncancel()
                runtime.stats["tcp_connect_failed"] += 1
                service.stats.connect_errors += 1
                log.debug("connect to %s for %s timed out", real, service.key)
                tried = tried | {real}
            except OSError as exc:
                if is_fd_shortage(exc):
                    # This process is out of descriptors: not the real's failure, and
                    # every other real would fail the same way. Counted on its own.
                    runtime.stats["tcp_fd_shortage"] += 1
                    self.connecting = None
                    self._close_client(abort=True)
                    return
                runtime.stats["tcp_connect_failed"] += 1
                service.stats.connect_errors += 1
                log.debug("connect to %s for %s failed: %r", real, service.key, exc)
                tried = tried | {real}
            finally:
                timer.cancel()
        if tried:
            runtime.stats["tcp_failovers"] += 1
            service.stats.failovers += 1
        self.connecting = None
        client_side = self.client
        client = client_side.transport
        upstream_transport = upstream.transport
        assert client is not None and upstream_transport is not None
        if self.done or client.is_closing():  # the client left while we connected
            upstream_transport.close()
            return
        self.real = real
        pool.opened(real)
        self.upstream = upstream
        client_side.peer = upstream
        if service.options.proxy_protocol:
            upstream_transport.write(
                proxy_protocol.build(
                    "tcp",
                    client.get_extra_info("peername")[:2],
                    client.get_extra_info("sockname")[:2],
                )
            )
        buffer = client_side.buffer
        if buffer is not None:  # what the client sent while we connected
            early = self.early
            self.early = 0
            if early:
                client_side.received += early
                upstream_transport.write(buffer[:early])
            if not early or not upstream.stalled:
                client_side.buffer = None
                runtime.buffers.give(buffer)
        if client_side.eof:
            self.half_closed(client_side)
        elif not upstream.stalled and not client.is_reading():
            client.resume_reading()  # it had filled the buffer while we connected

    async def _open_transparent(self, real: Real, upstream: Side) -> None:
        """Connect `upstream` to `real` from the client's own address for a
        `traffic-policy=local` port when the proxy may (lb/userspace/transparent.py)."""
        loop = self.service.loop
        transparency = self.runtime.transparency
        client = self.client.transport
        if transparency is not None and transparency.ready and client is not None:
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
        if peer.eof:  # both directions have ended: close both
            peer.transport.close()
            if side.transport is not None:
                side.transport.close()
        elif peer.transport.can_write_eof():
            peer.transport.write_eof()

    def lost(self, side: Side) -> None:
        if not self.done:
            self.done = True
            self.runtime.open.discard(self)  # Runtime.release, without the call
            stats = self.service.stats
            stats.bytes_in += self.client.received
            upstream = self.upstream
            if upstream is not None:
                stats.bytes_out += upstream.received
            if self.real is not None:
                self.service.pool.closed(self.real)
            if self.logged:
                self._log_access()
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if side.buffer is not None:
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
        #: the running loop, kept for every connection (set by `listen`)
        self.loop: asyncio.AbstractEventLoop = cast(asyncio.AbstractEventLoop, None)

    async def listen(self, host: str) -> None:
        self.loop = self.runtime.loop
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

"""The asyncio shell of the DNS server: UDP and TCP listeners around one `Responder`.

The UDP path is the hot one: `datagram_received` looks the query up in the
responder's wire cache and sends the cached reply with the asker's ID, with no
parsing and no allocation beyond the reply itself; having answered, it reads
the queries queued behind that one straight from its socket (a bounded drain),
so that under load most queries cost no event-loop callback. Everything else goes to the
responder's slow path; names the mesh does not own go to the forwarder as
their own asyncio tasks, so a slow or dead upstream never holds up a mesh name.

TCP (RFC 1035 §4.2.2, RFC 7766): two-byte length framing, several queries per
connection answered in order, an idle timeout, a cap on connections per
client and in all, and, at the cap, the longest idle connection closed to
admit a new one (`dns.tcpslots`, RFC 7766 §6.2).

Every answer is counted by query type, rcode and scope (`dns.querystats`):
on the fast path by the slot the cached reply carries, one list increment
and no clock read; elsewhere classified and timed from query to reply.

A query the forwarder cannot take (`MalformedQuery`) gets FORMERR and is
counted with the responder's `formerr`; nothing is logged per bad packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import cast

from dns.cache import FORWARD_MARK
from dns.fastpath import answer_burst
from dns.querystats import NODE, SANDBOX
from dns.relay import MalformedQuery
from dns.responder import Action, Responder, error_reply, fit_udp
from dns.reuseport import spread_at_random
from dns.table import View
from dns.tcpslots import DEFAULT_MAX_PER_CLIENT, DEFAULT_MAX_TOTAL, TcpSlots
from dns.wire import FORMERR, REFUSED, SERVFAIL
from mesh.core.logs import event

log = logging.getLogger(__name__)

Forward = Callable[[bytes, bool], Awaitable[bytes]]
TCP_IDLE_SECONDS = 10.0
MAX_TCP_CONNECTIONS = DEFAULT_MAX_TOTAL
MAX_TCP_PER_CLIENT = DEFAULT_MAX_PER_CLIENT
MAX_PENDING_FORWARDS = 4096
#: datagrams read straight from the socket per event-loop callback, at most (fairness:
#: the loop's other callbacks, TCP, the API, gossip, wait no longer than this)
DRAIN_MAX = 64
#: datagrams answered without trying to drain after a drain found the socket empty
QUIET_SKIPS = 16


class UdpServer(asyncio.DatagramProtocol):
    #: A listener's fixed view (a sandbox's networks); None: by the asker's address.
    view: View | None = None
    #: Whose queries it answers, for the metrics (dns.querystats.SCOPES)
    scope = NODE

    def __init__(self, responder: Responder, forward: Forward) -> None:
        self.responder = responder
        self.forward = forward
        self.transport: asyncio.DatagramTransport | None = None
        self._pending: set[asyncio.Task[None]] = set()
        # Bound once: the hot path reads these without attribute chains.
        self._cache = responder.cache.entries
        self._views = responder.views
        # Answers counted by type, rcode and this listener's scope (dns.querystats):
        # shared by every listener of the responder, so a closed sandbox's counts stay.
        self._queries = responder.queries
        #: slot -> queries answered on the fast path from the cache (one list increment)
        self._hits = responder.queries.hits[self.scope]
        #: slot -> queries the responder found in the cache once canonical (untimed)
        self._cached = responder.queries.cached[self.scope]
        #: the listening socket's recvfrom, to drain queued datagrams in one callback
        #: (`drain_from`); None: datagrams come from the event loop only
        self._recvfrom: Callable[[int], tuple[bytes, tuple[str, int]]] | None = None
        #: datagrams left to answer without draining, after a drain found nothing queued
        self._quiet = 0
        #: how the fast path sends where the listener drains its socket (`drain_from`): the
        #: socket's own sendto; None: the transport's
        self._sendto: Callable[[bytes, tuple[str | int, ...]], object] | None = None
        #: replies of the fast path the socket could not take, dropped (one-element list)
        self._unsent = responder.queries.unsent

    def drain_from(self, sock: socket.socket) -> None:
        """Read queued datagrams straight from `sock` after each one the loop delivers.

        Under load the socket holds many queries per wake-up; reading them in one
        Python call skips the event loop's per-datagram callback (GIL, context,
        address conversion, a Python frame): 7-10% of the CPU per query in a burst
        (docs/performance.md, DNS).
        IPv4 only: the loop and the socket module spell IPv6 scopes differently,
        and the view is looked up by that spelling.
        """
        if sock.family == socket.AF_INET:
            self._recvfrom = sock.recvfrom
            # The socket's own sendto too: asyncio's transport (a DNS worker's loop) adds
            # ~0.2 µs of Python per reply, and queues what the socket cannot take.
            self._sendto = sock.sendto

    @property
    def hits(self) -> int:
        """Queries this listener's scope answered on the fast path, from the cache."""
        return sum(self._hits)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not a subclass of asyncio's, though it is one in kind.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        assert self.transport is not None
        recvfrom = self._recvfrom
        if recvfrom is not None and self._quiet:
            # The last drain found the socket empty (light load): skip a few, as an
            # empty read is a syscall wasted.
            self._quiet -= 1
            recvfrom = None
        if answer_burst(
            data,
            addr,
            self._views,
            self._cache,
            self._hits,
            self._sendto or self.transport.sendto,
            recvfrom,
            self._slow,
            DRAIN_MAX,
            self._unsent,
        ):
            self._quiet = QUIET_SKIPS

    def _slow(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        assert self.transport is not None
        responder = self.responder
        try:
            reply = responder.respond(data, str(addr[0]), tcp=False, view=self.view)
        except Exception as exc:  # a bug must cost one query, never the server
            event(log, "dns_internal_error", logging.ERROR, error=repr(exc))
            reply = error_reply(data, SERVFAIL) if len(data) >= 12 else None
            responder.hit_slot, responder.miss_started = -1, perf_counter()
        if isinstance(reply, bytes):
            self.transport.sendto(reply, addr)
            slot = responder.hit_slot
            if slot >= 0:  # from the cache after all (a query not in canonical form):
                self._cached[slot] += 1  # synchronous, untimed, as the fast path's hits
            else:  # parsed: timed from the parse (the responder read the clock then)
                elapsed = perf_counter() - responder.miss_started
                self._queries.answered(self.scope, data, reply, elapsed)
        elif reply is Action.FORWARD:
            started = perf_counter()
            if len(self._pending) >= MAX_PENDING_FORWARDS:
                refused = error_reply(data, REFUSED)
                self.transport.sendto(refused, addr)
                self._queries.answered(self.scope, data, refused, perf_counter() - started)
                return
            task = asyncio.create_task(self._forward(data, addr, started))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _forward(self, data: bytes, addr: tuple[str | int, ...], started: float) -> None:
        reply = fit_udp(data, await forward_or_refuse(self.responder, self.forward, data, False))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)
            self._queries.answered(self.scope, data, reply, perf_counter() - started)

    def error_received(self, exc: Exception) -> None:  # ICMP errors of earlier sends
        pass

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()


class FixedViewUdpServer(UdpServer):
    """A UDP listener whose every asker has one view: a sandbox's 127.0.0.11.

    Its own class, so the host listener's hot path keeps its one dict lookup.
    """

    scope = SANDBOX

    def __init__(self, responder: Responder, forward: Forward, view: View) -> None:
        super().__init__(responder, forward)
        self.view = view

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        key = (self.view, False, data[2:])
        entry = self._cache.get(key)  # type: ignore[arg-type]
        if entry is not None and entry is not FORWARD_MARK:
            self._cache.move_to_end(key)  # type: ignore[arg-type]  # LRU: a hit goes last
            reply, slot = next(entry)
            self._hits[slot] += 1
            assert self.transport is not None
            self.transport.sendto(data[:2] + reply, addr)
            return
        self._slow(data, addr)


async def forward_or_refuse(
    responder: Responder, forward: Forward, data: bytes, tcp: bool
) -> bytes:
    """The forwarder's reply, FORMERR for what it cannot take, SERVFAIL for a bug of ours.

    The responder refuses malformed queries before they get here; this is
    the net under it, so that no query goes unanswered, nor logs per packet.
    """
    try:
        return await forward(data, tcp)
    except MalformedQuery:
        responder.stats["formerr"] += 1
        return error_reply(data, FORMERR)
    except Exception as exc:  # a bug must cost one query, never the server
        event(log, "dns_internal_error", logging.ERROR, error=repr(exc))
        return error_reply(data, SERVFAIL)


class TcpServer:
    def __init__(
        self,
        responder: Responder,
        forward: Forward,
        *,
        max_connections: int = MAX_TCP_CONNECTIONS,
        max_per_client: int = MAX_TCP_PER_CLIENT,
        idle_seconds: float = TCP_IDLE_SECONDS,
        view: View | None = None,
    ) -> None:
        self.responder = responder
        self.forward = forward
        self.view = view  # fixed (a sandbox's networks), or None: by the asker's address
        self.server: asyncio.Server | None = None
        self.slots = TcpSlots(max_connections, max_per_client)
        self.idle_seconds = idle_seconds
        self._ids = itertools.count()
        self._connections: dict[int, tuple[asyncio.Task[None], asyncio.StreamWriter]] = {}

    @property
    def stats(self) -> dict[str, int]:
        return {**self.slots.stats, "open": len(self.slots)}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername") or ("", 0)
        conn = next(self._ids)
        victims = None if task is None else self.slots.admit(conn, str(peer[0]))
        if task is None or victims is None:
            writer.close()
            return
        for victim in victims:  # idle: waiting on its client, owed nothing
            _, victim_writer = self._connections.pop(victim)
            victim_writer.close()  # its reader sees EOF; its task ends on its own
        self._connections[conn] = (task, writer)
        try:
            while True:
                self.slots.idle(conn)
                size = int.from_bytes(
                    await asyncio.wait_for(reader.readexactly(2), self.idle_seconds), "big"
                )
                data = await asyncio.wait_for(reader.readexactly(size), self.idle_seconds)
                self.slots.busy(conn)
                reply = await self._answer(data, str(peer[0]))
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await asyncio.wait_for(writer.drain(), self.idle_seconds)
        except TimeoutError:
            self.slots.stats["idle_timeouts"] += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.slots.release(conn)
            self._connections.pop(conn, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, data: bytes, source: str) -> bytes | None:
        started = perf_counter()
        reply: bytes | Action | None
        try:
            reply = self.responder.respond(data, source, tcp=True, view=self.view)
        except Exception as exc:
            event(log, "dns_internal_error", logging.ERROR, error=repr(exc))
            reply = error_reply(data, SERVFAIL) if len(data) >= 12 else None
        if reply is Action.FORWARD:
            reply = await forward_or_refuse(self.responder, self.forward, data, True)
        if reply is None or isinstance(reply, Action):  # dropped: the connection closes
            return None
        scope = NODE if self.view is None else SANDBOX
        self.responder.queries.answered(scope, data, reply, perf_counter() - started)
        return reply

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        tasks = [task for task, _ in self._connections.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


def udp_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound UDP socket; SO_REUSEPORT lets worker processes share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def spread(sock: socket.socket, reuse_group: int) -> None:
    """Spread the UDP queries of the `reuse_group` processes sharing the port at random
    (`dns.reuseport`), not by the asker's hash. A kernel that refuses the program
    leaves the hash, and the listener still serves."""
    try:
        spread_at_random(sock, reuse_group)
    except OSError as exc:
        event(log, "dns_reuseport_hash_only", logging.WARNING, error=repr(exc))


#: Tries to find a port free for both UDP and TCP when asked for any port (0).
ANY_PORT_TRIES = 20


async def serve(
    responder: Responder,
    forward: Forward,
    host: str,
    port: int,
    reuse_port: bool = False,
    reuse_group: int = 0,
) -> tuple[UdpServer, TcpServer, int]:
    """Start both listeners on host:port and return them with the port they are bound to.

    Port 0 asks for any port: the kernel picks one for UDP, and TCP must take the same
    one; another socket may hold it for TCP, so then the pair is tried again on a fresh
    port. A port that was asked for by number fails at once.
    """
    for _ in range(ANY_PORT_TRIES - 1 if port == 0 else 0):
        try:
            return await _serve_on(responder, forward, host, port, reuse_port, reuse_group)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    return await _serve_on(responder, forward, host, port, reuse_port, reuse_group)


async def _serve_on(
    responder: Responder,
    forward: Forward,
    host: str,
    port: int,
    reuse_port: bool,
    reuse_group: int,
) -> tuple[UdpServer, TcpServer, int]:
    loop = asyncio.get_running_loop()
    sock = udp_socket(host, port, reuse_port)
    if reuse_port and reuse_group > 1:
        spread(sock, reuse_group)
    port = sock.getsockname()[1]
    transport, udp = await loop.create_datagram_endpoint(
        lambda: UdpServer(responder, forward), sock=sock
    )
    # Hold the transport now: uvloop calls connection_made a tick later, and a
    # transport nobody references by then is collected, closing the socket.
    udp.transport = transport
    udp.drain_from(sock)
    tcp = TcpServer(responder, forward)
    try:
        tcp.server = await asyncio.start_server(
            tcp.handle, host, port, reuse_address=True, reuse_port=reuse_port
        )
    except OSError:
        await udp.close()
        raise
    return udp, tcp, port


async def serve_sockets(
    responder: Responder,
    forward: Forward,
    udp_sock: socket.socket,
    tcp_sock: socket.socket,
    view: View,
) -> tuple[UdpServer, TcpServer]:
    """Serve already bound sockets (made inside a sandbox) with a fixed view.

    The sockets are the caller's until this returns; then the listeners own them.
    """
    loop = asyncio.get_running_loop()
    udp_sock.setblocking(False)
    tcp_sock.setblocking(False)
    transport, udp = await loop.create_datagram_endpoint(
        lambda: FixedViewUdpServer(responder, forward, view), sock=udp_sock
    )
    udp.transport = transport  # held now, as in serve()
    tcp = TcpServer(responder, forward, view=view)
    try:
        tcp.server = await asyncio.start_server(tcp.handle, sock=tcp_sock)
    except OSError:
        await udp.close()
        raise
    return udp, tcp

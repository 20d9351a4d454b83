"""The HTTPS listener: TLS terminated with a certificate chosen by SNI, or passed through.

Each accepted connection's ClientHello is *peeked* (MSG_PEEK, so the bytes
stay in the kernel) and its server name read (`sni.server_name`). Then:

- a `sni://` passthrough route for that name exactly: the raw TLS stream is
  spliced to a task, which terminates TLS itself;
- else a certificate for the name (or any certificate, as the default): TLS
  is terminated here (`ssl.SSLContext.sni_callback` picks the certificate by
  the same name) and the requests go through the HTTP router as `https`;
- else the `sni://` catch-all route if there is one; else the connection is closed.

Certificates are given as `HOST=CERTFILE,KEYFILE` (`--tls-cert`, repeatable);
HOST may be `*.example.com`; the first one given is the default for a client
that names no known host.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from lb.fds import is_fd_shortage
from lb.http.budget import PER_CLIENT
from lb.http.pipe import splice
from lb.http.proxy import ClientConnection
from lb.http.router import Router, listen_socket
from lb.http.routes import Match
from lb.http.sni import MAX_HELLO, NeedMore, NotClientHello, server_name
from mesh.core.logs import event

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CertSpec:
    host: str  # lower-case; may start with "*."
    cert: str
    key: str

    @classmethod
    def parse(cls, text: str) -> CertSpec:
        """`HOST=CERTFILE,KEYFILE`; ValueError says what is wrong."""
        host, sep, files = text.partition("=")
        cert, comma, key = files.partition(",")
        if not sep or not comma or not host.strip() or not cert.strip() or not key.strip():
            raise ValueError(f"tls-cert {text!r}: expected HOST=CERTFILE,KEYFILE")
        return cls(host.strip().lower().rstrip("."), cert.strip(), key.strip())

    def __str__(self) -> str:
        return f"{self.host}={self.cert},{self.key}"


def server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


class CertStore:
    """One SSLContext per certificate; the default one switches by SNI."""

    def __init__(self, specs: Sequence[CertSpec]) -> None:
        if not specs:
            raise ValueError("no certificates")
        self._by_host: dict[str, ssl.SSLContext] = {}
        for spec in specs:
            context = server_context()
            try:
                context.load_cert_chain(spec.cert, spec.key)
            except (OSError, ssl.SSLError) as error:
                raise ValueError(f"tls-cert {spec}: cannot load: {error}") from None
            self._by_host.setdefault(spec.host, context)
        self.default = server_context()
        self.default.load_cert_chain(specs[0].cert, specs[0].key)
        self.default.sni_callback = self._choose

    def lookup(self, name: str) -> ssl.SSLContext | None:
        found = self._by_host.get(name)
        if found is None and "." in name:
            found = self._by_host.get("*." + name.split(".", 1)[1])
        return found

    def _choose(self, sock: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        if name:
            chosen = self.lookup(name.lower().rstrip("."))
            if chosen is not None:
                sock.context = chosen


class _Hold(asyncio.Protocol):
    """Holds a passthrough client's bytes until the task's connection is spliced on."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.data += data


class TlsListener:
    def __init__(self, router: Router, certs: CertStore | None) -> None:
        self.router = router
        self.certs = certs
        self._loop = router.loop
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def listen(self, host: str, port: int, reuse_port: bool) -> int:
        self._sock = listen_socket(host, port, reuse_port)
        self._acceptor = self._loop.create_task(self._accept(self._sock))
        self.router.start()
        return int(self._sock.getsockname()[1])

    async def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = await self._loop.sock_accept(sock)
            except OSError as error:  # out of descriptors, say: wait rather than spin
                event(log, "https_accept_failed", logging.WARNING, error=str(error))
                await asyncio.sleep(0.1)
                continue
            if self.router.budget.held + PER_CLIENT > self.router.budget.limit:
                # The descriptor budget is full: refuse now rather than hold the socket
                # through a handshake (a terminated one would be refused after it anyway).
                self.router.stats.over_budget += 1
                self.router.stats.reject(503)
                client.close()
                continue
            task = self._loop.create_task(self._handle(client))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, client: socket.socket) -> None:
        client.setblocking(False)
        try:
            name = await self._peek_name(client)
        except (TimeoutError, OSError, NotClientHello) as error:
            self.router.stats.tls_outcomes["refused"] += 1
            event(log, "https_hello_refused", logging.DEBUG, error=str(error) or "timeout")
            client.close()
            return
        table = self.router.table
        match = table.match_sni(name) if name else table.match_sni("")
        exact = match is not None and match.route.host == (name or "")
        try:
            if match is not None and exact:
                await self._pass(client, match)
            elif self.certs is not None:
                await self._terminate(client, name)
            elif match is not None:
                await self._pass(client, match)
            else:
                self.router.stats.tls_outcomes["refused"] += 1
                client.close()
        except (OSError, ssl.SSLError, TimeoutError) as error:
            event(log, "https_connection_failed", logging.DEBUG, error=str(error))
            client.close()
        except Exception as error:  # a bug must cost this connection, never the listener
            event(log, "https_internal_error", logging.ERROR, error=repr(error))
            client.close()

    async def _peek_name(self, client: socket.socket) -> str | None:
        deadline = self._loop.time() + self.router.settings.header_timeout
        seen = -1
        while True:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise TimeoutError
            await asyncio.wait_for(self._readable(client), remaining)
            data = client.recv(MAX_HELLO + 64, socket.MSG_PEEK)
            if not data:
                raise ConnectionResetError("closed before its ClientHello")
            try:
                return server_name(data)
            except NeedMore:
                if len(data) == seen:  # the rest is not here yet: the socket stays readable
                    await asyncio.sleep(0.005)
                seen = len(data)

    async def _readable(self, client: socket.socket) -> None:
        ready = self._loop.create_future()
        fd = client.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            self._loop.remove_reader(fd)

    async def _terminate(self, client: socket.socket, name: str | None) -> None:
        assert self.certs is not None
        router = self.router
        try:
            await self._loop.connect_accepted_socket(
                lambda: ClientConnection(router, "https"),
                client,
                ssl=self.certs.default,
                ssl_handshake_timeout=router.settings.header_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError):
            router.stats.tls_outcomes["failed"] += 1
            raise
        router.stats.tls_handshakes += 1
        # the certificate the SNI callback chose, by the same lookup (a dict get or two)
        if not name:
            outcome = "no_sni"
        elif self.certs.lookup(name) is not None:
            outcome = "certificate"
        else:
            outcome = "default_certificate"
        router.stats.tls_outcomes[outcome] += 1

    async def _pass(self, client: socket.socket, match: Match) -> None:
        router = self.router
        balancer = router.balancer
        tried: list[str] = []
        while (endpoint := balancer.pick(match, exclude=tried)) is not None:
            tried.append(endpoint.task_id)
            try:
                upstream, upstream_hold = await asyncio.wait_for(
                    self._loop.create_connection(_Hold, endpoint.address, endpoint.port),
                    router.settings.connect_timeout,
                )
            except OSError as error:
                if is_fd_shortage(error):  # the router's trouble, not the task's
                    router.stats.fd_shortage += 1
                    break
                router.stats.connect_failures += 1
                balancer.connect_failed(endpoint.task_id)
                event(
                    log,
                    "https_passthrough_connect_failed",
                    logging.WARNING,
                    task=endpoint.task_id,
                    error=str(error),
                )
                continue
            except TimeoutError as error:
                router.stats.connect_failures += 1
                balancer.connect_failed(endpoint.task_id)
                event(
                    log,
                    "https_passthrough_connect_failed",
                    logging.WARNING,
                    task=endpoint.task_id,
                    error=str(error) or "timeout",
                )
                continue
            transport, hold = await self._loop.connect_accepted_socket(_Hold, client)
            router.stats.passthrough += 1
            router.stats.tls_outcomes["passthrough"] += 1
            budget = router.budget
            if not budget.take(PER_CLIENT):  # (it was free a moment ago: rarely)
                router.stats.over_budget += 1
                transport.abort()
                upstream.abort()
                return
            splice(
                transport,
                upstream,
                left_pending=bytes(hold.data),
                right_pending=bytes(upstream_hold.data),
                on_close=functools.partial(budget.give, PER_CLIENT),
            )
            return
        router.stats.tls_outcomes["refused"] += 1  # no task took it
        client.close()

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acceptor
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()

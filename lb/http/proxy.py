"""One client connection of the router: the asyncio shell around an `exchange.Exchange`.

The HTTP logic (framing, keep-alive, pipelining, upgrade, the router's own
answers, relaying the task's response) is the sans-IO `Exchange`; this class
only moves bytes and owns what needs the event loop: the descriptor budget at
accept, the router's connection set, connecting to tasks (a pooled
connection, or a new one in a task of its own, with its timeout), handing
connections back to the pool, and the splice after a 101.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from lb.fds import is_fd_shortage
from lb.http.exchange import Exchange, Upstream
from lb.http.heads import local_response
from lb.http.pipe import splice
from lb.http.routes import Endpoint
from lb.http.upstream import UpstreamConnection
from mesh.core.logs import event

if TYPE_CHECKING:
    from lb.http.router import Router

log = logging.getLogger(__name__)


class _NotConnected:
    """The client side before `connection_made`: nothing is written to it."""

    def write(self, data: bytes) -> None:
        raise AssertionError("a write before the connection was made")

    def writelines(self, data: Sequence[bytes]) -> None:
        raise AssertionError("a write before the connection was made")

    def close(self) -> None:
        pass

    abort = pause_reading = resume_reading = close


_NOT_YET = _NotConnected()


class ClientConnection(asyncio.Protocol):
    """Feeds the client's bytes to its `Exchange` and does the I/O the exchange asks for."""

    def __init__(self, router: Router, proto: str = "http") -> None:
        self.router = router
        self.transport: asyncio.Transport | None = None
        self.exchange = Exchange(router.shared, self, _NOT_YET, "", proto)
        self._connecting: asyncio.Task[None] | None = None
        self._done = False  # counted out of the router (lost, refused or upgraded)
        # The client's bytes go straight to the exchange: no call in between, per read
        # (bound now: uvloop takes the method when the transport is made).
        self.data_received = self.exchange.receive  # type: ignore[method-assign]
        # The pool's own methods: per request, no call in between.
        self.acquire = router.pool.acquire  # type: ignore[method-assign]
        self.release = router.pool.release  # type: ignore[method-assign,assignment]

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, though they are ones in kind
        self.transport = client = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        router = self.router
        exchange = self.exchange
        if not router.admit():
            # A flood must not take every descriptor of the process: the API and the
            # health checks keep theirs (RouterSettings.fd_reserve).
            self._done = True
            exchange.lost()  # reads nothing more
            client.write(local_response(503, "too many connections", keep_alive=False))
            client.close()
            return
        exchange.client = client
        exchange.peer_ip = str(peer[0]) if peer else ""
        router.opened(exchange)  # first: a parked ticker refreshes the clock it reads
        exchange.opened()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done:
            return
        self._done = True
        self.router.closed(self.exchange)
        self.exchange.lost()

    def eof_received(self) -> bool | None:
        if self.exchange.eof():
            return True  # a half-close after a whole request: still answer it
        return None

    def pause_writing(self) -> None:
        upstream = self.exchange.upstream
        if upstream is not None:
            upstream.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.exchange.upstream
        if upstream is not None:
            upstream.resume_reading()

    # -- exchange.Shell ---------------------------------------------------------------

    def acquire(self, key: tuple[str, int]) -> Upstream | None:
        return self.router.pool.acquire(key)  # (replaced by the pool's method in __init__)

    def connect(self, endpoint: Endpoint) -> None:
        self._connecting = self.router.loop.create_task(self._open(endpoint))

    def cancel_connect(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None

    def release(self, upstream: Upstream) -> None:
        # (replaced by the pool's method in __init__)
        self.router.pool.release(cast(UpstreamConnection, upstream))

    def upgrade(self, upstream: Upstream, client_rest: bytes, upstream_rest: bytes) -> None:
        conn = cast(UpstreamConnection, upstream)
        assert conn.transport is not None and self.transport is not None
        router = self.router
        router.pool.forget(conn)
        if not self._done:
            self._done = True
            router.closed(self.exchange, keep_budget=True)
        # The client's two descriptors are the pipe's now, until it closes.
        splice(
            self.transport,
            conn.transport,
            left_pending=client_rest,
            right_pending=upstream_rest,
            on_close=router.pipe_closed,
        )

    async def _open(self, endpoint: Endpoint) -> None:
        exchange = self.exchange
        router = self.router
        pool = router.pool
        timed_out = False
        try:
            conn = await asyncio.wait_for(
                pool.open((endpoint.address, endpoint.port)), router.settings.connect_timeout
            )
        except TimeoutError:
            timed_out = True
        except OSError as error:
            self._connecting = None
            if is_fd_shortage(error):
                exchange.fd_shortage()
                return
            event(
                log,
                "http_connect_failed",
                logging.WARNING,
                task=endpoint.task_id,
                address=f"{endpoint.address}:{endpoint.port}",
                error=error.strerror or error,
            )
        else:
            self._connecting = None
            if not exchange.waiting:
                pool.release(conn)
                return
            try:
                exchange.upstream_attached(conn, reused=False)
            except Exception as error:  # a bug must cost this request, never the task's log
                event(log, "http_internal_error", logging.ERROR, error=repr(error))
                if self.transport is not None:
                    conn.close()
                    self.transport.abort()
            return
        self._connecting = None
        if timed_out:
            event(
                log,
                "http_connect_timeout",
                logging.WARNING,
                task=endpoint.task_id,
                address=f"{endpoint.address}:{endpoint.port}",
            )
        exchange.connect_failed(timed_out)

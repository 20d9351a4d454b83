"""One process's router: the route table, the balancer, the pool, the counters and a ticker.

Every client and task connection keeps its deadline as a number; the ticker
(one per router, every `settings.tick()` seconds) refreshes `now` and ends
the connections whose deadline passed. That keeps timers off the hot path:
a request reads `now` instead of arming a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from lb.accesslog import AccessLog, AccessLogSettings
from lb.fds import open_fds, open_file_limit
from lb.http.balance import Balancer
from lb.http.budget import PER_CLIENT, FdBudget
from lb.http.exchange import Exchange, Shared
from lb.http.proxy import ClientConnection
from lb.http.routes import RouteTable
from lb.http.settings import RouterSettings
from lb.http.stats import RouterStats
from lb.http.upstream import Pool
from mesh.core import upkeep
from mesh.core.logs import event

log = logging.getLogger(__name__)


class Router:
    def __init__(
        self,
        table: RouteTable,
        settings: RouterSettings,
        budget: FdBudget | None = None,
        *,
        balancer: Balancer | None = None,
        stats: RouterStats | None = None,
        access: AccessLog | None = None,
    ) -> None:
        """`budget`, `balancer`, `stats` and `access` are given to share them with another router
        of the process (HTTPS beside HTTP: one round robin, one ejection list)."""
        self.table = table
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.balancer = (
            Balancer(self.loop.time, settings.eject_seconds) if balancer is None else balancer
        )
        self.stats = RouterStats() if stats is None else stats
        if budget is None:
            budget = FdBudget(settings.fd_budget(open_file_limit(), open_fds()))
            event(
                log, "http_fd_budget", descriptors=budget.limit, open_file_limit=open_file_limit()
            )
        #: shared by the HTTP and HTTPS routers of one process
        self.budget = budget
        self.pool = Pool(
            self.loop,
            size=settings.pool_size,
            idle_timeout=settings.pool_idle_timeout,
            upstream_timeout=settings.upstream_timeout,
            budget=budget,
        )
        #: what every exchange reads (the table, the balancer, the counters, the time)
        if access is None:
            access = AccessLog(
                AccessLogSettings(
                    settings.access_log_path, settings.access_log_rate, settings.access_log_format
                )
            )
            access.start()
        #: the process's access log (shared by its HTTP and HTTPS routers)
        self.access = access
        self.shared = Shared(
            table, settings, self.loop.time, self.balancer, self.stats, budget, access
        )
        self.conns: set[Exchange] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._ticker: asyncio.Task[None] | None = None
        #: set while the ticker is parked: no client connection and no upstream one, so
        #: no deadline to sweep; the next client connection wakes it
        self._parked: asyncio.Future[None] | None = None

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain data, for the metrics export."""
        return (
            self.stats.snapshot(dict(self.balancer.routes))
            | {
                "ejected": self.balancer.ejected(),
                "ejections": self.balancer.ejections,
                "fd_budget": self.budget.limit,
                "fds_held": self.budget.held,
            }
            | self.access.counters()
        )

    # -- the client connections' accounting (proxy.ClientConnection calls these) --------

    def opened(self, exchange: Exchange) -> None:
        parked = self._parked
        if parked is not None:  # the clock of the deadlines stood still while parked
            self.shared.now = self.loop.time()
            self._parked = None
            if not parked.done():
                parked.set_result(None)
        self.conns.add(exchange)
        self.stats.connections_open += 1
        self.stats.connections_total += 1

    def closed(self, exchange: Exchange, keep_budget: bool = False) -> None:
        """A client connection is gone (or, `keep_budget`, became an upgraded pipe,
        which gives its descriptors back when it closes)."""
        self.conns.discard(exchange)
        self.stats.connections_open -= 1
        if not keep_budget:
            self.budget.give(PER_CLIENT)

    def admit(self) -> bool:
        """Take a new client's descriptors (its own and its task's), or count it refused."""
        if self.budget.take(PER_CLIENT):
            return True
        self.stats.reject(503)
        self.stats.over_budget += 1
        return False

    def pipe_closed(self) -> None:
        """An upgraded client's pipe closed: its two descriptors are free again."""
        self.budget.give(PER_CLIENT)

    def start(self) -> None:
        if self._ticker is None:
            self._ticker = self.loop.create_task(self._tick())

    async def _tick(self) -> None:
        interval = self.settings.tick()
        while True:
            if not self.conns and not self.pool.live:
                # Nothing has a deadline: an idle router takes no wake-ups of its own
                # (the upstream pool's connections all count in `live`).
                self._parked = self.loop.create_future()
                await self._parked
            # rides a wake-up the loop takes anyway (mesh.core.upkeep): 3/4 of an
            # interval to one apart, so a deadline is still found no later than before
            await upkeep.sleep(interval)
            now = self.shared.now = self.loop.time()
            try:
                for conn in [c for c in self.conns if c.deadline and c.deadline <= now]:
                    conn.on_deadline()
                self.pool.sweep(now)
            except Exception as error:  # a bug must cost a connection, never the timeouts
                event(log, "http_tick_failed", logging.ERROR, error=repr(error))

    async def listen_http(self, host: str, port: int, reuse_port: bool) -> int:
        """Serve plain HTTP on host:port; returns the bound port."""
        sock = listen_socket(host, port, reuse_port)
        server = await self.loop.create_server(
            lambda: ClientConnection(self, "http"), sock=sock, backlog=4096
        )
        self._servers.append(server)
        self.start()
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self.conns):
            conn.client.close()
        self.pool.close()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        self.access.stop()


def listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening TCP socket; SO_REUSEPORT lets worker processes share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(4096)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock

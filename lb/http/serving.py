"""The HTTP routing mesh as the agent runs it: in its own loop, or in worker processes.

`--http-workers 0` serves in the agent's event loop (an `HttpService` fed the
in-process change feed). `--http-workers N` starts N `lb.http.worker`
processes sharing the port with SO_REUSEPORT, each fed over the feed socket;
the agent then keeps only a bound, non-listening socket on the port, so that
a port in use fails the agent's start with its reason, and a port of 0 is
chosen once for every worker. The kernel sends connections only to listening
sockets, so the reservation takes none.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from lb.http.service import HttpEndpoints, HttpService
from lb.http.settings import RouterSettings
from lb.http.stats import LATENCY_BOUNDS
from lb.http.worker import worker_argv
from mesh.core.model import Change, Record
from mesh.core.workers import WorkerPool


def reserve(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class HttpMesh:
    def __init__(
        self, endpoints: HttpEndpoints, settings: RouterSettings, workers: int, log_level: str
    ) -> None:
        self.endpoints = endpoints
        self.settings = settings
        self.workers = workers
        self.log_level = log_level
        try:
            # Certificates load first, so that a bad one fails the agent with its reason.
            service = HttpService(endpoints, settings)
        except ValueError as error:
            raise OSError(str(error)) from None
        #: the router of the agent's loop; None when worker processes serve
        self.service = None if workers else service
        self.pool: WorkerPool | None = None
        self._reserved: list[socket.socket] = []
        #: each live worker's last report, by pid
        self._reports: dict[int, dict[str, Any]] = {}
        #: set once the router answers: in this loop once started; with workers, once each
        #: has reported (a worker's first report follows its listen by a second)
        self.serving = asyncio.Event()
        #: what the workers that are gone counted (their gauges zeroed), one merged snapshot
        self._retired: dict[str, Any] | None = None

    def load(self, records: Iterable[Record]) -> None:
        if self.service is not None:
            self.service.load(records)

    def on_change(self, change: Change) -> None:
        if self.service is not None:
            self.service.on_change(change)

    def on_report(self, message: dict[str, Any]) -> None:
        """A worker's counters, as it reports them over the feed socket every second."""
        pid, stats = message.get("http_worker"), message.get("stats")
        if isinstance(pid, int) and isinstance(stats, dict):
            self._reports[pid] = stats
            if len(self._reports) >= self.workers:
                self.serving.set()

    def on_gone(self, message: dict[str, Any]) -> None:
        """A worker's feed connection ended (`message`: its last report): what it counted
        moves into the retired total, so that the sum never goes backwards when its
        replacement starts again from zero, and a dead pid holds no memory."""
        pid = message.get("http_worker")
        if not isinstance(pid, int):
            return
        last = self._reports.pop(pid, None)
        if last is None:
            return
        gone = {**last, **{gauge: 0 for gauge in GAUGES}, "ejected": []}
        merged = merge_snapshots([gone] if self._retired is None else [self._retired, gone])
        self._retired = merged

    def snapshot(self) -> dict[str, Any]:
        """The router's counters: the agent's own, or the sum of the workers' last reports
        and of what the workers that are gone counted (`workers`: those alive)."""
        if self.service is not None:
            return self.service.snapshot()
        reports = list(self._reports.values())
        total = merge_snapshots(reports if self._retired is None else [self._retired, *reports])
        total["workers"] = len(reports)
        return total

    async def start(self, feed_socket: Callable[[], Awaitable[str]]) -> None:
        """Listen (in this loop, the service `load` fed), or start the workers."""
        if self.service is not None:
            await self.service.start()
            self.serving.set()
            return
        ends = self.endpoints
        http = reserve(ends.host, ends.port)
        self._reserved.append(http)
        https_port = ends.https_port
        if ends.https_host is not None:
            https = reserve(ends.https_host, ends.https_port)
            self._reserved.append(https)
            https_port = https.getsockname()[1]
        shared = HttpEndpoints(
            host=ends.host,
            port=http.getsockname()[1],
            https_host=ends.https_host,
            https_port=https_port,
            certs=ends.certs,
            reuse_port=True,
        )
        argv = worker_argv(await feed_socket(), shared, self.settings, self.log_level)
        self.pool = WorkerPool("http", argv, self.workers)
        self.pool.start()

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.stop()
        if self.service is not None:
            await self.service.stop()
        for sock in self._reserved:
            sock.close()


#: what a worker holds now rather than has counted: a gone worker's go to zero
GAUGES = ("connections_open", "fd_budget", "fds_held")


def merge_snapshots(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum `Router.snapshot()`s of several processes: counters add, routes merge by key."""
    total: dict[str, Any] = {
        "workers": len(snapshots),
        "rejected": {},
        "tls_outcomes": {},
        "routes": [],
        "ejected": [],
    }
    routes: dict[tuple[str, str, str], dict[str, Any]] = {}
    for snap in snapshots:
        for key, value in snap.items():
            if key in ("rejected", "tls_outcomes"):  # counts by a closed set of keys
                into_counts = total[key]
                for name, count in value.items():
                    into_counts[name] = into_counts.get(name, 0) + count
            elif key == "ejected":
                total["ejected"] = sorted(set(total["ejected"]) | set(value))
            elif key == "routes":
                for route in value:
                    name = (route["service"], route["host"], route["path_prefix"])
                    into = routes.setdefault(
                        name,
                        {
                            **route,
                            "requests": {},
                            "latency_sum": 0.0,
                            "latency_count": 0,
                            "latency_buckets": [0] * (len(LATENCY_BOUNDS) + 1),
                            "retries": 0,
                        },
                    )
                    for status, count in route["requests"].items():
                        into["requests"][status] = into["requests"].get(status, 0) + count
                    for field in ("latency_sum", "latency_count", "retries"):
                        into[field] += route[field]
                    buckets = into["latency_buckets"]
                    for i, count in enumerate(route.get("latency_buckets", ())[: len(buckets)]):
                        buckets[i] += count
            elif isinstance(value, int | float):
                total[key] = total.get(key, 0) + value
    total["routes"] = list(routes.values())
    return total

"""The HTTP routing mesh of one process: route table, router and listeners, fed the changes.

The agent builds one (serving in its own loop) or none (when `--http-workers`
puts the router in worker processes, each of which builds one: `lb.http.worker`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lb.http.router import Router
from lb.http.routes import RouteTable
from lb.http.settings import RouterSettings
from lb.http.tls import CertSpec, CertStore, TlsListener
from mesh.core.logs import event
from mesh.core.model import Change, Record

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HttpEndpoints:
    host: str
    port: int
    https_host: str | None = None
    https_port: int = 0
    certs: Sequence[CertSpec] = field(default_factory=tuple)
    reuse_port: bool = False


class HttpService:
    def __init__(self, endpoints: HttpEndpoints, settings: RouterSettings) -> None:
        self.endpoints = endpoints
        self.settings = settings
        self.table = RouteTable()
        # Certificates load now, so that a bad one fails the start with its reason.
        self.certs = CertStore(endpoints.certs) if endpoints.certs else None
        self.router: Router | None = None
        self.tls: TlsListener | None = None
        self.port = endpoints.port
        self.https_port = endpoints.https_port

    def load(self, records: Iterable[Record]) -> None:
        self.table.load(records)

    def on_change(self, change: Change) -> None:
        self.table.on_change(change)

    def snapshot(self) -> dict[str, Any]:
        return {} if self.router is None else self.router.snapshot()

    async def start(self) -> None:
        ends = self.endpoints
        self.router = Router(self.table, self.settings)
        self.port = await self.router.listen_http(ends.host, ends.port, ends.reuse_port)
        if ends.https_host is not None:
            # one budget, one round robin, one ejection list, one set of counters
            https = Router(
                self.table,
                dataclasses.replace(self.settings, proto="https"),
                budget=self.router.budget,
                balancer=self.router.balancer,
                stats=self.router.stats,
                access=self.router.access,
            )
            self.tls = TlsListener(https, self.certs)
            self.https_port = await self.tls.listen(
                ends.https_host, ends.https_port, ends.reuse_port
            )
        event(
            log,
            "http_listening",
            address=f"{ends.host}:{self.port}",
            https=f"{ends.https_host}:{self.https_port}" if ends.https_host else "off",
            certificates=len(ends.certs),
        )

    async def stop(self) -> None:
        if self.tls is not None:
            await self.tls.close()
            await self.tls.router.close()
        if self.router is not None:
            await self.router.close()

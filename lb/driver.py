"""The agent's side of L4: the view follows the change feed, the backend follows the view.

`LbDriver` is a view of the change feed (`mesh.core.view.View`): `load` takes
the snapshot, and `start` starts the backend with the table the view gives
then; from then on `on_change` (called synchronously in feed order) turns each
change into ops and queues them (changes made while the backend starts wait
in the queue), and
one task applies the queued batches in order, so the backend sees exactly the
sequence the view emitted. A `BackendError` is logged and counted, never fatal:
one entry the kernel refuses must not stop the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from lb.backend import Backend, BackendError
from lb.table import Op, Table
from lb.view import LbView
from mesh.core.logs import event
from mesh.core.model import Change, Record

log = logging.getLogger("lb")


class LbDriver:
    def __init__(
        self,
        view: LbView,
        backend: Backend,
        reason: str = "",
        desired: Callable[[], Table] | None = None,
    ) -> None:
        self.view = view
        #: the table the state wants, built from scratch (not by the view): `mesh doctor`
        #: compares it with what the backend has programmed
        self._desired = desired or view.table
        self.backend = backend
        self.reason = reason
        self.errors = 0
        self._queue: asyncio.Queue[list[Op]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def load(self, records: Iterable[Record]) -> None:
        self.view.load(records)

    async def start(self) -> None:
        desired = self.view.table()
        try:
            await self.backend.start(desired)
        except BackendError as exc:
            self._failed("start", exc)
        self._worker = asyncio.get_running_loop().create_task(self._apply_forever())
        event(
            log,
            "lb_started",
            backend=self.backend.name,
            services=len(desired),
            reals=sum(len(s.reals) for s in desired.values()),
        )

    def on_change(self, change: Change) -> None:
        ops = self.view.on_change(change)
        if ops:
            self._idle.clear()
            self._queue.put_nowait(ops)

    async def _apply_forever(self) -> None:
        while True:
            ops = await self._queue.get()
            try:
                await self.backend.apply(ops)
            except BackendError as exc:
                self._failed("apply", exc)
            except Exception as exc:  # a backend bug: log it, keep the agent serving
                log.exception("lb backend %s failed", self.backend.name)
                self._failed("apply", exc)
            if self._queue.empty():
                self._idle.set()

    def _failed(self, stage: str, exc: Exception) -> None:
        self.errors += 1
        event(
            log,
            "lb_backend_error",
            logging.WARNING,
            backend=self.backend.name,
            stage=stage,
            error=str(exc),
            errors=self.errors,
        )

    async def settled(self) -> None:
        """Wait until every queued op has been applied."""
        await self._idle.wait()

    async def describe(self) -> dict[str, Any]:
        """The table as programmed (read back from the backend), for `GET /v1/lb`."""
        table: Table = await self.backend.read()
        stats = getattr(self.backend, "stats", None)
        unbound = getattr(self.backend, "unbound", None)
        return {
            "backend": self.backend.name,
            "reason": self.reason,
            "errors": self.errors,
            "pending": self._queue.qsize(),
            "stats": stats() if callable(stats) else {},
            "unbound": unbound() if callable(unbound) else {},
            "services": render(table),
            "desired": render(self._desired()),
        }

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        try:
            await self.backend.close()
        except BackendError as exc:
            self._failed("close", exc)


def render(table: Table) -> list[dict[str, Any]]:
    """A table as `GET /v1/lb` shows it."""
    return [
        {
            "protocol": key.protocol,
            "address": key.address,
            "port": key.port,
            "scheduler": str(service.options.scheduler),
            "proxy_protocol": service.options.proxy_protocol,
            "reals": [
                {"address": real.address, "port": real.port, "weight": service.reals[real]}
                for real in sorted(service.reals)
            ],
        }
        for key, service in sorted(table.items())
    ]

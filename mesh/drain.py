"""Removes drained tasks when their grace period ends.

Fed by the change feed: a task this node put into `draining` is queued with
its deadline; when the deadline passes the task is removed (if it is still
draining). A restart re-queues the draining tasks found in the state, so a
drain interrupted by a restart still completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable, Iterable

from mesh.control import Control
from mesh.core.logs import event
from mesh.core.model import Change, Record, Task, TaskState
from mesh.errors import MeshError

log = logging.getLogger(__name__)


class DrainReaper:
    def __init__(self, control: Control, wall_clock: Callable[[], float]) -> None:
        self._control = control
        self._wall_clock = wall_clock
        self._due: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _consider(self, record: Record) -> None:
        if (
            isinstance(record, Task)
            and not record.deleted
            and record.state is TaskState.DRAINING
            and record.version.node == self._control.store.node
        ):
            heapq.heappush(self._due, (record.drain_until or 0.0, record.id))
            self._wake.set()

    def on_change(self, change: Change) -> None:
        self._consider(change.after)

    def load(self, records: Iterable[Record]) -> None:
        for record in records:
            self._consider(record)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="drain-reaper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            if not self._due:
                await self._wake.wait()
                continue
            delay = self._due[0][0] - self._wall_clock()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            _, task_id = heapq.heappop(self._due)
            await self._remove(task_id)

    async def _remove(self, task_id: str) -> None:
        store = self._control.store
        task = store.get_task(task_id)
        if task is None or task.state is not TaskState.DRAINING:
            return
        if (task.drain_until or 0.0) > self._wall_clock():  # drained again later: re-queued
            return
        try:
            await self._control.apply(lambda now: store.remove_task(task_id, now))
        except MeshError as exc:
            event(log, "drain_remove_failed", logging.WARNING, task=task_id, error=exc.message)
            return
        event(
            log,
            "task_removed",
            task=task_id,
            name=task.name,
            service=task.service,
            reason="drained",
        )

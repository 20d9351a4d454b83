"""Reaps tombstones once they are older than the reap interval.

A delete is kept as a tombstone so that a late copy of the old record (from a
node that was away) cannot bring it back; after the reap interval (30 min by
default, as Swarm's NetworkDB) it is dropped from memory and disk. The age is
counted from when this node first saw the tombstone (a restart starts the
count again, which only keeps a tombstone longer). A node away for longer
than the interval can still resurrect a record: the usual price of reaping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from mesh.control import Control
from mesh.core.logs import event
from mesh.core.model import Change, Kind, Record

log = logging.getLogger(__name__)


class TombstoneReaper:
    def __init__(self, control: Control, wall_clock: Callable[[], float], interval: float) -> None:
        self._store = control.store
        self._control = control
        self._wall_clock = wall_clock
        self.interval = interval
        self._seen: dict[tuple[Kind, str], float] = {}
        self._task: asyncio.Task[None] | None = None

    def load(self, records: Iterable[Record]) -> None:
        """The tombstones of the state: their age counts from now."""
        now = self._wall_clock()
        for key in self._store.tombstones():
            self._seen.setdefault(key, now)

    def on_change(self, change: Change) -> None:
        key = (change.kind, change.key)
        if change.after.deleted:
            self._seen.setdefault(key, self._wall_clock())
        else:
            self._seen.pop(key, None)

    def reap(self) -> list[tuple[Kind, str]]:
        """Forget the tombstones past the interval; returns what was forgotten."""
        cutoff = self._wall_clock() - self.interval
        due = [key for key, seen in self._seen.items() if seen <= cutoff]
        forgotten = []
        for key in due:
            del self._seen[key]
            if self._store.forget(*key):
                forgotten.append(key)
        if forgotten:
            self._control.forget(forgotten)
            event(log, "tombstones_reaped", count=len(forgotten))
        return forgotten

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tombstone-reaper")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.interval / 10))
            self.reap()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

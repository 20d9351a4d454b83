"""`View`: what every follower of the change feed is, to the feed.

A view holds some picture of the state (DNS names, the L4 table, the route
table, the health checks, the drain and tombstone deadlines, a worker's copy,
an event stream...). It is brought up to date once from a snapshot
(`load`), then kept there one change at a time (`on_change`), in feed order,
synchronously. `ChangeFeed.follow(view)` does both with nothing between
them, so no change falls in the gap: it is the one way to follow the feed.

Both calls come from the feed, inside a write: a view does its own work
quickly and never awaits (an asyncio shell queues what must wait).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from mesh.core.model import Change, Record


class View(Protocol):
    def load(self, records: Iterable[Record]) -> None:
        """Take the state as the feed shows it now (tombstones included; networks,
        then services, then tasks), read before returning: it is read lazily."""

    def on_change(self, change: Change) -> None:
        """Take one change, as the feed shows it, after everything loaded or taken before."""


class Shown(Protocol):
    """What the views see of the store, where it differs (`mesh.liveness`: tasks of a
    down node read as removed): applied by the feed to snapshots and changes alike."""

    def transform(self, change: Change) -> Change: ...

    def hide(self, record: Record) -> Record: ...


class AsStored:
    """The views see the store as it is."""

    def transform(self, change: Change) -> Change:
        return change

    def hide(self, record: Record) -> Record:
        return record

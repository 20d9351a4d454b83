"""The one way the state changes on this node: mutate the store, publish, make durable.

A mutation runs synchronously against the store (so two concurrent requests
can never both take the same name, port or VIP), its changes go out on the
change feed at once, and the caller is answered only once the writer has them
on disk. If the disk fails, the request answers 503 and the agent stops: what
was answered 2xx is on disk, and what was not is gone with the process, so a
restart never shows a change that was reported as failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from mesh.core.feed import ChangeFeed
from mesh.core.logs import event
from mesh.core.model import Change, Kind
from mesh.errors import Unavailable
from mesh.state.persist import PersistError, StateWriter
from mesh.state.store import Store

log = logging.getLogger(__name__)

Mutation = Callable[[float], list[Change]]


class Control:
    def __init__(
        self,
        store: Store,
        feed: ChangeFeed,
        writer: StateWriter,
        wall_clock: Callable[[], float],
        on_fatal: Callable[[str], None],
    ) -> None:
        self.store = store
        self.feed = feed
        self._writer = writer
        self._wall_clock = wall_clock
        self._on_fatal = on_fatal

    def now(self) -> float:
        return self._wall_clock()

    def apply_sync(self, mutation: Mutation) -> list[Change]:
        """Apply a change nobody waits on (a merge from gossip): publish now, persist behind.

        Nothing was promised to a caller, so there is no answer to hold back;
        a failed write still stops the agent, as in `apply`.
        """
        if self._writer.failed is not None:
            return []
        changes = mutation(self._wall_clock())
        if changes:
            self.feed.publish(changes)
            self._watch(self._writer.write([c.after for c in changes], self.store.clock))
        return changes

    def forget(self, keys: Sequence[tuple[Kind, str]]) -> None:
        """Delete reaped tombstones from disk (already gone from the store)."""
        self._watch(
            self._writer.write(
                [], self.store.clock, forget=[(kind.value, key) for kind, key in keys]
            )
        )

    def _watch(self, done: asyncio.Future[None]) -> None:
        """A failed write stops the agent: what it reported may no longer be on disk."""

        def check(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is not None:
                event(log, "state_unavailable", logging.CRITICAL, error=done.exception())
                self._on_fatal(str(done.exception()))

        done.add_done_callback(check)

    async def apply(self, mutation: Mutation) -> list[Change]:
        """Run `mutation(now)`; return its changes once they are durable."""
        if self._writer.failed is not None:
            raise Unavailable("the agent cannot write its state; see its log")
        changes = mutation(self._wall_clock())
        if not changes:
            return changes
        self.feed.publish(changes)
        done = self._writer.write([c.after for c in changes], self.store.clock)
        self._watch(done)
        try:
            await done
        except PersistError:
            raise Unavailable("the agent could not make the change durable") from None
        for change in changes:
            event(
                log,
                f"{change.kind.value}_{_verb(change)}",
                key=change.key,
                version=change.after.version.clock,
            )
        return changes


def _verb(change: Change) -> str:
    if change.after.deleted:
        return "removed"
    return "created" if change.before is None or change.before.deleted else "updated"

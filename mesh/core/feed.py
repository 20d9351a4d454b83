"""The change feed: every change to the state, numbered, for the views to follow.

Views (`mesh.core.view.View`: DNS, LB, HRM, health checks, the reapers, the
cluster, the feed socket's workers, the event stream) follow it with
`follow(view)`: a snapshot loaded, then every later change, with nothing in
between. `seq` numbers the changes; `since(seq)` gives every change after it
while it is still in the ring buffer. A follower that fell further behind than
the buffer holds is told so (`Gap`) and takes a new snapshot; it never
silently misses a change.

Views are called synchronously, in order, as changes are published, which is
what keeps them exactly in step with the store.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mesh.core.model import Change, Record
from mesh.core.view import AsStored, Shown, View

log = logging.getLogger(__name__)

Listener = Callable[[Change], None]
DEFAULT_HISTORY = 10_000


class Gap(Exception):
    """The changes after `seq` are no longer kept: take a new snapshot."""


@dataclass(frozen=True, slots=True)
class Numbered:
    seq: int
    change: Change


class ChangeFeed:
    def __init__(
        self,
        snapshot: Callable[[], Iterable[Record]],
        history: int = DEFAULT_HISTORY,
        *,
        shown: Shown | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._history: collections.deque[Numbered] = collections.deque(maxlen=history)
        self._listeners: list[Listener] = []
        self.seq = 0
        # What the views see may differ from the store (tasks of a down node
        # read as removed): one filter, applied to snapshots and deltas alike.
        shown = shown or AsStored()
        self._show_change = shown.transform
        self._show_record = shown.hide

    def __repr__(self) -> str:
        return (
            f"<ChangeFeed seq={self.seq} kept={len(self._history)} "
            f"listeners={len(self._listeners)}>"
        )

    def publish(self, changes: Iterable[Change], *, shown: bool = False) -> None:
        """Number and deliver changes; `shown` ones are already as the views see them."""
        for raw in changes:
            change = raw if shown else self._show_change(raw)
            self.seq += 1
            self._history.append(Numbered(self.seq, change))
            for listener in list(self._listeners):
                try:
                    listener(change)
                except Exception:
                    # A view's bug must not stop the others, nor the write that follows.
                    log.exception(
                        "change feed listener %r failed on %s %s", listener, change.kind, change.key
                    )

    def follow(self, view: View) -> Callable[[], None]:
        """Load `view` with the snapshot, then give it every later change; returns the
        function that stops it. Nothing runs in between, so the view misses no change."""
        # Lazily: a view that starts elsewhere (the event stream) takes nothing.
        view.load(self._show_record(r) for r in self._snapshot())
        listener = view.on_change
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def snapshot(self) -> tuple[int, list[Record]]:
        return self.seq, [self._show_record(r) for r in self._snapshot()]

    def since(self, seq: int) -> list[Numbered]:
        if seq >= self.seq:
            return []
        oldest = self._history[0].seq if self._history else self.seq + 1
        if seq + 1 < oldest:
            raise Gap(f"changes after {seq} are gone; the oldest kept is {oldest}")
        return [n for n in self._history if n.seq > seq]

"""Tasks of nodes that are down: hidden from every view, kept in the state.

When gossip declares a node failed (or it leaves), its tasks must leave DNS,
the load balancers and the router at once, but not be forgotten: Swarm
deleted them and lost them for good after a transient partition (moby issue
53141). So the store keeps them, and this filter sits between the store and
the change feed: for a node that is down, every task of it is shown to the
feed's subscribers as removed; when the node comes back, as present again.
The feed takes it as its `Shown` filter; `node_down`/`node_up` return the
changes the views must see, for the caller to publish (already shown).
A node's `Node` record (its VTEP and overlay addresses) is hidden likewise, so
the overlay peers withdraw its entries. The API still lists those tasks, each
with its node's status (`node_status`).
"""

from __future__ import annotations

import dataclasses

from mesh.core.model import Change, Kind, Node, Record, Task
from mesh.state.store import Store


class Liveness:
    def __init__(self, store: Store) -> None:
        self._store = store
        self.down: set[str] = set()
        #: why each down node is down ("dead" or "left"): the gossip layer forgets a
        #: member some time after it died, the tasks it left behind still need a status
        self.why: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<Liveness down={sorted(self.down)}>"

    def hide(self, record: Record) -> Record:
        """The record as the views see it: a down node's task reads as removed."""
        if isinstance(record, Task) and not record.deleted and record.node in self.down:
            return dataclasses.replace(record, deleted=True)
        if isinstance(record, Node) and not record.deleted and record.name in self.down:
            # its VTEP and overlay addresses: the overlay peers withdraw the node's entries
            return dataclasses.replace(record, deleted=True)
        return record

    def transform(self, change: Change) -> Change:
        before = None if change.before is None else self.hide(change.before)
        return Change(change.kind, change.key, before, self.hide(change.after))

    def node_down(self, node: str, why: str = "dead") -> list[Change]:
        """Hide the node's tasks; returns the changes that take them out of the views."""
        if node == self._store.node:
            return []
        if node in self.down:
            self.why[node] = why
            return []
        self.why[node] = why
        tasks = self._store.tasks(node=node)
        self.down.add(node)
        changes = [Change(Kind.TASK, t.id, t, self.hide(t)) for t in tasks]
        if (record := self._store.node_record(node)) is not None:
            changes.append(Change(Kind.NODE, node, record, self.hide(record)))
        return changes

    def node_up(self, node: str) -> list[Change]:
        """Show the node's tasks again; returns the changes that bring them back."""
        if node not in self.down:
            return []
        self.down.discard(node)
        self.why.pop(node, None)
        tasks = self._store.tasks(node=node)
        changes = [Change(Kind.TASK, t.id, dataclasses.replace(t, deleted=True), t) for t in tasks]
        if (record := self._store.node_record(node)) is not None:
            changes.append(
                Change(Kind.NODE, node, dataclasses.replace(record, deleted=True), record)
            )
        return changes

"""Failover on a suspect node: its reals leave the programmed table before gossip's verdict.

A node that dies whole takes its tasks with it, but gossip declares it dead only
after the suspicion timeout (about 5.5 s on the lan profile with three nodes).
Until then the kernel keeps DNATing new connections to its tasks, and they hang.
SWIM's SUSPECT state comes seconds earlier; a suspicion that is false is refuted
by the suspect itself within a few gossip rounds. So `SuspectFilter` sits
between the view (`lb/view.py`, which follows the state) and the backend: a node
suspected for `hold` seconds without refuting is *hidden*, and every real on it
is left out of the table handed to the backend, as long as the virtual service
keeps a real taking new connections (weight > 0) on a node that is not hidden.
The last ones are never removed: a suspect is better than nothing. A refutation
(or a rejoin) puts them back; a verdict (dead, left) hides them for good through
the state (`mesh/liveness.py`), and the filter forgets the node.

A removed real's conntrack entries are flushed by the backend (nftables: the
flows DNATed to it; IPVS: `expire_nodest_conn`), so a client's retransmitted SYN,
or its next packet on a connection to the dead task, is balanced anew instead of
waiting for the verdict.

The hold is what keeps a false suspicion (a lost ping on a lossy network,
refuted a few hundred ms later) from touching the table; `nodes_hidden` counts
every hiding and `hidden_refuted` the hidings a refutation ended: a false
removal.

Sans-IO: the caller passes the time and schedules `tick` at `next_due()`.
Which node a real is on comes from the task records (`track`): a real's address
is a task's address or endpoint; an address no task of a known node has (or
that tasks of several nodes share, not all hidden) is never hidden.

The same path hides the reals passive outlier detection ejects (lb/outlier.py:
`eject`, `restore`), one real at a time, under the same rule: never the last
ones of weight > 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from lb.table import (
    DeleteService,
    Op,
    PutReal,
    PutService,
    Real,
    ServiceOptions,
    Table,
    VirtualKey,
    VirtualService,
    diff,
)
from mesh.core.model import Change, Record, Task

#: Seconds a node stays suspect before its reals are hidden, in probe intervals of
#: the gossip profile (the agent multiplies, `suspect_hold`): a false suspicion is
#: refuted once the suspect hears of it (the next probe of it carries the Suspect,
#: gossip rounds too) and its Alive comes back. Measured under 20 % loss (four
#: nodes, lan, 60 s: tests/e2e/test_faults.py): on a quiet machine 35 suspicions,
#: the longest refuted after 0.24 s; in a CI run on a loaded machine 32, the longest
#: 0.65 s, which outlasted the half interval this was (5 false removals). A whole
#: interval (1 s on lan) leaves half as much again over that; the early ejection
#: of a dead node's tasks is passive outlier detection's work (lb/outlier.py). One CI
#: run later saw a refutation take 3.8 s at 20 % loss (3 false removals: every other
#: node hid the one suspect), longer than any hold worth having short of the verdict;
#: the e2e test holds the hold to issue 19's goal, 0 false removals at 10 % loss.
HOLD_PROBE_INTERVALS = 1.0
#: ... and never less than this (the `local` profile's 0.2 s probes on a busy machine)
HOLD_FLOOR = 0.25


def suspect_hold(probe_interval: float) -> float:
    """The hold for a gossip profile's probe interval."""
    return max(HOLD_FLOOR, HOLD_PROBE_INTERVALS * probe_interval)


@dataclass(frozen=True, slots=True)
class FailoverCounts:
    suspects: int  # nodes suspect now
    hidden: list[str]  # nodes whose reals are hidden now
    reals_hidden: int  # (virtual service, real) pairs left out of the table now
    nodes_hidden: int  # times a node's reals were hidden since start
    hidden_refuted: int  # of those, ended by a refutation: false removals
    kept_last: int  # virtual services now keeping a hidden node's reals: nothing else left
    refuted_longest: float  # seconds the longest suspicion that was refuted lasted


def _addresses(task: Task) -> set[str]:
    return {task.address, *task.addresses.values()}


class _NodesByAddress:
    """address -> the nodes with a task at it, counted. Most addresses hold one task, so
    a single node with one task is kept as the node's name itself: a Counter each would
    cost ~1 MB at 10,000 tasks."""

    __slots__ = ("_by_address",)

    def __init__(self) -> None:
        self._by_address: dict[str, str | Counter[str]] = {}

    def add(self, address: str, node: str) -> None:
        held = self._by_address.get(address)
        if held is None:
            self._by_address[address] = node
        elif isinstance(held, str):
            self._by_address[address] = Counter((held, node))
        else:
            held[node] += 1

    def remove(self, address: str, node: str) -> None:
        held = self._by_address.get(address)
        if held is None:
            return
        if isinstance(held, str):
            if held == node:
                del self._by_address[address]
            return
        held[node] -= 1
        if held[node] <= 0:
            del held[node]
        if not held:
            del self._by_address[address]
        elif len(held) == 1 and held.total() == 1:
            self._by_address[address] = next(iter(held))

    def nodes(self, address: str) -> Collection[str]:
        held = self._by_address.get(address)
        if held is None:
            return ()
        return (held,) if isinstance(held, str) else held


class SuspectFilter:
    """The table the view wants, less the reals of nodes suspect for `hold` seconds."""

    def __init__(self, hold: float) -> None:
        if hold < 0:
            raise ValueError("hold must be >= 0")
        self.hold = hold
        self._options: dict[VirtualKey, ServiceOptions] = {}
        self._desired: dict[VirtualKey, dict[Real, int]] = {}
        # What is programmed is what is desired, key for key, but where a hidden node's
        # or an ejected real is left out: only those keys keep their programmed reals
        # here. (A full second copy of the table was ~1.4 MB at 10,000 tasks, and an
        # update of it per op.) The programmed options are always the desired ones.
        self._programmed_apart: dict[VirtualKey, dict[Real, int]] = {}
        #: bumped by every change of the programmed table or of the task records, so a
        #: reader polling it (lb/outlier_watch.py) rebuilds its indexes only then
        self.generation = 0
        # address -> node -> tasks of that node with that address
        self._nodes_of = _NodesByAddress()
        self._suspect_since: dict[str, float] = {}
        self._hidden: set[str] = set()
        #: reals outlier detection ejected (lb/outlier.py), hidden as a hidden node's are
        self._ejected: set[Real] = set()
        self.nodes_hidden = 0
        self.hidden_refuted = 0
        #: the longest suspicion a refutation ended, seconds: what the hold must outlast
        self.refuted_longest = 0.0

    def __repr__(self) -> str:
        return (
            f"<SuspectFilter hold={self.hold} suspects={sorted(self._suspect_since)} "
            f"hidden={sorted(self._hidden)}>"
        )

    # -- which node a real is on -------------------------------------------------------

    def track_records(self, records: Iterable[Record]) -> None:
        for record in records:
            if isinstance(record, Task) and not record.deleted:
                self._count(record, 1)

    def track(self, change: Change) -> None:
        self.generation += 1
        """Follow one change of the feed (before the view's ops for it are applied)."""
        if isinstance(change.before, Task) and not change.before.deleted:
            self._count(change.before, -1)
        if isinstance(change.after, Task) and not change.after.deleted:
            self._count(change.after, 1)

    def _count(self, task: Task, delta: int) -> None:
        count = self._nodes_of.add if delta > 0 else self._nodes_of.remove
        for address in _addresses(task):
            count(address, task.node)

    def _out(self, real: Real) -> bool:
        """Whether `real` is to be left out (kept only as a service's last)."""
        return real in self._ejected or self._on_hidden_node(real)

    def is_remote(self, real: Real, local_node: str) -> bool:
        """Whether `real` is on a node other than `local_node` (or on none we know of)."""
        nodes = self._nodes_of.nodes(real.address)
        return not nodes or any(node != local_node for node in nodes)

    def _on_hidden_node(self, real: Real) -> bool:
        if not self._hidden:
            return False
        nodes = self._nodes_of.nodes(real.address)
        if not nodes:
            return False  # on no node we know of: never hidden
        return all(node in self._hidden for node in nodes)

    # -- the table ---------------------------------------------------------------------

    def load(self, table: Mapping[VirtualKey, VirtualService]) -> Table:
        """Take the view's whole table (at start); the table to program."""
        self._options = {key: service.options for key, service in table.items()}
        self._desired = {key: dict(service.reals) for key, service in table.items()}
        self._programmed_apart = {}
        for key in self._desired:
            self._program(key, self._visible(key))
        self.generation += 1
        return self.table()

    def _programmed(self, key: VirtualKey) -> dict[Real, int] | None:
        """The reals programmed for `key` (None: the key is not programmed)."""
        apart = self._programmed_apart.get(key)
        return apart if apart is not None else self._desired.get(key)

    def _program(self, key: VirtualKey, reals: dict[Real, int]) -> None:
        """Record `reals` as programmed for `key`, a desired key."""
        if reals == self._desired[key]:
            self._programmed_apart.pop(key, None)
        else:
            self._programmed_apart[key] = reals

    def table(self) -> Table:
        """The table as the ops so far have programmed it (a copy)."""
        return {
            key: VirtualService(key, self._options[key], dict(self._programmed(key) or {}))
            for key in self._desired
        }

    def visible(self, table: Mapping[VirtualKey, VirtualService]) -> Table:
        """Any table (the state's, built from scratch) as this filter would program it now."""
        out: Table = {}
        for key, service in table.items():
            reals = self._hide(service.reals)
            out[key] = VirtualService(key, service.options, reals)
        return out

    def apply(self, ops: Iterable[Op]) -> list[Op]:
        """The view's ops; the ops that bring the backend to the filtered table."""
        ops = list(ops)
        if not self._hidden and not self._ejected and not self._programmed_apart:
            # Nothing hidden: what is programmed is what is wanted, op for op.
            for op in ops:
                self._take(op)
            self.generation += len(ops)
            return ops
        # What each touched key has programmed now, before the ops change what it wants.
        before: dict[VirtualKey, tuple[dict[Real, int], ServiceOptions] | None] = {}
        for op in ops:
            if op.key not in before:
                reals = self._programmed(op.key)
                before[op.key] = None if reals is None else (dict(reals), self._options[op.key])
        for op in ops:
            self._take(op)
        out: list[Op] = []
        for key, programmed in before.items():
            out += self._reconcile(key, programmed)
        return out

    def _take(self, op: Op) -> None:
        if isinstance(op, PutService):
            self._options[op.key] = op.options
            self._desired.setdefault(op.key, {})
        elif isinstance(op, DeleteService):
            self._desired.pop(op.key, None)
            self._options.pop(op.key, None)
        elif isinstance(op, PutReal):
            self._desired[op.key][op.real] = op.weight
        elif op.key in self._desired:
            self._desired[op.key].pop(op.real, None)

    def _hide(self, reals: Mapping[Real, int]) -> dict[Real, int]:
        if not self._hidden and not self._ejected:
            return dict(reals)
        keep = {real: weight for real, weight in reals.items() if not self._out(real)}
        if len(keep) == len(reals) or not any(weight > 0 for weight in keep.values()):
            return dict(reals)  # never the last ones that take new connections
        return keep

    def _visible(self, key: VirtualKey) -> dict[Real, int]:
        return self._hide(self._desired[key])

    def _reconcile(
        self, key: VirtualKey, programmed: tuple[dict[Real, int], ServiceOptions] | None
    ) -> list[Op]:
        """The ops from what `key` had `programmed` to what it is to have now."""
        self.generation += 1
        found: Table = {}
        if programmed is not None:
            reals, options = programmed
            found[key] = VirtualService(key, options, reals)
        if key in self._desired:
            want = self._visible(key)
            ops = diff(found, {key: VirtualService(key, self._options[key], want)})
            self._program(key, want)
        else:
            ops = diff(found, {})
            self._programmed_apart.pop(key, None)
        return ops

    def _reconcile_all(self) -> list[Op]:
        out: list[Op] = []
        for key in sorted(self._desired):
            programmed = self._programmed(key)
            assert programmed is not None  # a desired key is programmed
            out += self._reconcile(key, (programmed, self._options[key]))
        return out

    # -- reals ejected by outlier detection ----------------------------------------------

    def reals(self) -> set[Real]:
        """Every real the view wants, in any virtual service."""
        return {real for reals in self._desired.values() for real in reals}

    def can_eject(self, real: Real) -> bool:
        """Whether ejecting `real` would take it out of some virtual service: one that
        keeps another real of weight > 0 that is not hidden or ejected."""
        for reals in self._desired.values():
            if real in reals and any(
                weight > 0 and other != real and not self._out(other)
                for other, weight in reals.items()
            ):
                return True
        return False

    def eject(self, real: Real) -> list[Op]:
        """Leave `real` out of the table (where it is not a service's last); the ops."""
        if real in self._ejected:
            return []
        self._ejected.add(real)
        return self._reconcile_all()

    def restore(self, real: Real) -> list[Op]:
        """Put an ejected `real` back; the ops."""
        if real not in self._ejected:
            return []
        self._ejected.discard(real)
        return self._reconcile_all()

    @property
    def ejected(self) -> frozenset[Real]:
        return frozenset(self._ejected)

    @property
    def hidden_nodes(self) -> frozenset[str]:
        """The nodes whose reals are hidden now."""
        return frozenset(self._hidden)

    # -- member states -----------------------------------------------------------------

    def suspect(self, node: str, now: float) -> None:
        """Gossip suspects `node`; hidden at `now + hold` unless cleared (see `tick`)."""
        self._suspect_since.setdefault(node, now)

    def clear(self, node: str, *, refuted: bool, now: float | None = None) -> list[Op]:
        """`node` is no longer suspect: refuted (alive again: its reals come back) or
        declared dead or left (the state hides its tasks: nothing comes back)."""
        since = self._suspect_since.pop(node, None)
        if refuted and since is not None and now is not None:
            self.refuted_longest = max(self.refuted_longest, now - since)
        if node not in self._hidden:
            return []
        self._hidden.discard(node)
        if refuted:
            self.hidden_refuted += 1
        return self._reconcile_all()

    def tick(self, now: float) -> list[Op]:
        """Hide the nodes suspect for `hold` seconds by `now`; the ops that do it."""
        due = [
            node
            for node, since in self._suspect_since.items()
            if node not in self._hidden and now >= since + self.hold
        ]
        if not due:
            return []
        self._hidden.update(due)
        self.nodes_hidden += len(due)
        return self._reconcile_all()

    def next_due(self) -> float | None:
        """When `tick` has something to do next (None: nothing pending)."""
        pending = [
            since + self.hold
            for node, since in self._suspect_since.items()
            if node not in self._hidden
        ]
        return min(pending) if pending else None

    def counts(self) -> FailoverCounts:
        reals_hidden = 0
        kept_last = 0
        for key, desired in self._desired.items():
            programmed = self._programmed(key) or {}
            reals_hidden += len(desired) - len(programmed)
            if any(self._out(real) for real in programmed):
                kept_last += 1
        return FailoverCounts(
            suspects=len(self._suspect_since),
            hidden=sorted(self._hidden),
            reals_hidden=reals_hidden,
            nodes_hidden=self.nodes_hidden,
            hidden_refuted=self.hidden_refuted,
            kept_last=kept_last,
            refuted_longest=round(self.refuted_longest, 3),
        )

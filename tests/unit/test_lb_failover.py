"""Failover on a suspect node (lb/failover.py): which reals leave the programmed table."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from lb.failover import SuspectFilter, _NodesByAddress
from lb.table import DeleteReal, PutReal, Real, Table, apply_ops
from lb.view import LbView
from mesh.core.model import Change, Health, Record, Service, Task, TaskState
from tests.unit.test_lb_view import PUBLISHED, VIP_FRONT, delete, put, service, task

HOLD = 1.0


class Rig:
    """A view, the filter behind it and the table the backend would hold, fed as the
    driver feeds them."""

    def __init__(self, records: list[Record], hold: float = HOLD) -> None:
        self.view = LbView("n3")
        self.filter = SuspectFilter(hold)
        self.view.load(records)
        self.filter.track_records(records)
        self.backend: Table = self.filter.load(self.view.table())
        self.emitted: list[object] = []

    def _take(self, ops: list[object]) -> list[object]:
        apply_ops(self.backend, ops)  # type: ignore[arg-type]
        self.emitted += ops
        return ops

    def change(self, change: Change) -> list[object]:
        self.filter.track(change)
        return self._take(list(self.filter.apply(self.view.on_change(change))))

    def tick(self, now: float) -> list[object]:
        return self._take(list(self.filter.tick(now)))

    def clear(self, node: str, refuted: bool = True) -> list[object]:
        return self._take(list(self.filter.clear(node, refuted=refuted)))

    def reals(self, key: object = PUBLISHED) -> dict[Real, int]:
        return dict(self.backend[key].reals)  # type: ignore[index]

    def consistent(self) -> None:
        """What the backend holds is what the filter says, and the view's table filtered."""
        assert self.backend == self.filter.table()
        assert self.backend == self.filter.visible(self.view.table())


def three_nodes() -> tuple[Service, list[Task]]:
    web = service()
    tasks = [
        task("a", "10.0.1.11", node="n1"),
        task("b", "10.0.1.12", node="n1"),
        task("c", "10.0.1.21", node="n2"),
    ]
    return web, tasks


def test_a_suspect_nodes_reals_leave_after_the_hold_and_come_back_on_refutation() -> None:
    web, tasks = three_nodes()
    rig = Rig([web, *tasks])
    everyone = rig.reals()
    assert len(everyone) == 3
    rig.filter.suspect("n1", now=10.0)
    assert rig.filter.next_due() == 10.0 + HOLD
    assert rig.tick(10.5) == []  # a false suspicion is refuted well within the hold
    ops = rig.tick(11.0)
    assert {op.real.address for op in ops if isinstance(op, DeleteReal)} == {
        "10.0.1.11",
        "10.0.1.12",
    }
    assert all(isinstance(op, DeleteReal) for op in ops)
    assert rig.reals() == {Real("10.0.1.21", 80): 1}
    assert rig.reals(VIP_FRONT) == {Real("10.0.1.21", 80): 1}
    rig.consistent()
    assert rig.filter.counts().hidden == ["n1"]
    assert rig.filter.counts().reals_hidden == 6  # two reals under three virtual services
    back = rig.clear("n1", refuted=True)
    assert all(isinstance(op, PutReal) for op in back) and len(back) == 6
    assert rig.reals() == everyone
    counts = rig.filter.counts()
    assert (counts.nodes_hidden, counts.hidden_refuted, counts.suspects) == (1, 1, 0)
    rig.consistent()


def test_a_suspicion_refuted_within_the_hold_changes_nothing() -> None:
    web, tasks = three_nodes()
    rig = Rig([web, *tasks])
    rig.filter.suspect("n1", now=0.0)
    assert rig.filter.clear("n1", refuted=True, now=0.4) == []
    assert rig.tick(5.0) == []
    assert rig.filter.counts().refuted_longest == 0.4
    assert rig.filter.counts().nodes_hidden == 0
    assert rig.filter.next_due() is None


def test_the_last_reals_taking_connections_are_never_removed() -> None:
    web = service()
    on_suspect = task("a", "10.0.1.11", node="n1")
    draining = task("b", "10.0.1.21", node="n2", state=TaskState.DRAINING)
    rig = Rig([web, on_suspect, draining])
    rig.filter.suspect("n1", now=0.0)
    assert rig.tick(HOLD) == []  # the other real drains (weight 0): nothing else takes new ones
    assert rig.reals() == {Real("10.0.1.11", 80): 1, Real("10.0.1.21", 80): 0}
    assert rig.filter.counts().kept_last == 3
    # A healthy task elsewhere arrives: now the suspect's real can go.
    other = task("c", "10.0.1.31", node="n3")
    ops = rig.change(put(None, other))
    assert DeleteReal(PUBLISHED, Real("10.0.1.11", 80)) in ops
    assert rig.reals() == {Real("10.0.1.21", 80): 0, Real("10.0.1.31", 80): 1}
    rig.consistent()
    # ... and when it goes again, the suspect's real is back (the last one).
    ops = rig.change(delete(other))
    assert PutReal(PUBLISHED, Real("10.0.1.11", 80), 1) in ops
    rig.consistent()


def test_changes_while_hidden_keep_the_suspects_reals_out() -> None:
    web, tasks = three_nodes()
    rig = Rig([web, *tasks])
    rig.filter.suspect("n1", now=0.0)
    rig.tick(HOLD)
    late = task("d", "10.0.1.13", node="n1")  # a task of the suspect registered meanwhile
    assert rig.change(put(None, late)) == []
    unhealthy = dataclasses.replace(tasks[0], health=Health.UNHEALTHY)
    assert rig.change(put(tasks[0], unhealthy)) == []  # not programmed: nothing to remove
    rig.consistent()
    back = rig.clear("n1")
    assert {op.real.address for op in back if isinstance(op, PutReal)} == {
        "10.0.1.12",
        "10.0.1.13",
    }
    rig.consistent()


def test_a_verdict_hides_through_the_state_and_nothing_comes_back() -> None:
    web, tasks = three_nodes()
    rig = Rig([web, *tasks])
    rig.filter.suspect("n1", now=0.0)
    rig.tick(HOLD)
    # Declared dead: `Liveness` shows its tasks removed, then the node's suspicion ends.
    for t in tasks[:2]:
        assert rig.change(delete(t)) == []
    assert rig.clear("n1", refuted=False) == []
    assert rig.filter.counts().hidden_refuted == 0
    assert rig.reals() == {Real("10.0.1.21", 80): 1}
    rig.consistent()


def test_an_address_shared_with_a_live_node_is_never_hidden() -> None:
    web = service()
    rig = Rig(
        [
            web,
            task("a", "10.0.1.11", node="n1"),
            task("b", "10.0.1.11", node="n2", ports={80: 81}),
            task("c", "10.0.1.21", node="n2"),
        ]
    )
    rig.filter.suspect("n1", now=0.0)
    rig.tick(HOLD)
    assert Real("10.0.1.11", 80) in rig.reals()  # n2 has a task at that address too
    rig.consistent()


def test_nothing_suspect_passes_the_views_ops_through_unchanged() -> None:
    web, tasks = three_nodes()
    rig = Rig([web])
    view_ops = []
    for t in tasks:
        rig.filter.track(put(None, t))
        ops = rig.view.on_change(put(None, t))
        view_ops.append(ops)
        assert rig.filter.apply(ops) == ops


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_random_histories_keep_the_backend_equal_to_the_filtered_view(seed: int) -> None:
    rng = random.Random(seed)
    nodes = ["n1", "n2", "n3"]
    services = [service("web"), service("api", vips=())]
    live: dict[str, Task] = {}
    rig = Rig(list(services))
    now = 0.0
    for step in range(60):
        now += rng.choice([0.2, 0.5, 1.0])
        action = rng.random()
        if action < 0.45:
            tid = f"t{rng.randrange(12)}"
            before = live.get(tid)
            if before is not None and rng.random() < 0.3:
                rig.change(delete(before))
                del live[tid]
            else:
                after = task(
                    tid,
                    f"10.0.{rng.randrange(2)}.{int(tid[1:]) + 10}",
                    svc=rng.choice(["web", "api"]),
                    node=rng.choice(nodes) if before is None else before.node,
                    health=rng.choice([Health.HEALTHY, Health.HEALTHY, Health.UNHEALTHY]),
                    state=rng.choice([TaskState.RUNNING] * 4 + [TaskState.DRAINING]),
                )
                if before is not None and before.service != after.service:
                    after = dataclasses.replace(after, service=before.service, name=before.name)
                rig.change(put(before, after))
                live[tid] = after
        elif action < 0.6:
            rig.filter.suspect(rng.choice(nodes), now)
        elif action < 0.72:
            rig.clear(rng.choice(nodes), refuted=rng.random() < 0.5)
        elif action < 0.8:  # outlier detection ejects a real, or puts one back
            reals = sorted(rig.filter.reals() | rig.filter.ejected)
            if reals:
                real = rng.choice(reals)
                if real in rig.filter.ejected:
                    rig._take(rig.filter.restore(real))
                else:
                    rig._take(rig.filter.eject(real))
        else:
            rig.tick(now)
        rig.consistent()
        for key, svc in rig.backend.items():
            wanted = rig.view.table()[key].reals
            if any(w > 0 for w in wanted.values()):
                assert any(w > 0 for w in svc.reals.values()), (step, key)
    for node in nodes:
        rig.clear(node, refuted=True)
    for real in sorted(rig.filter.ejected):
        rig._take(rig.filter.restore(real))
    assert rig.backend == rig.view.table()


@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from(["10.0.0.1", "10.0.0.2"]), st.sampled_from("abc")),
        max_size=40,
    )
)
def test_nodes_by_address_counts_as_a_counter_would(steps: list[tuple[bool, str, str]]) -> None:
    """The compact address -> nodes index (a lone node kept as its name) answers as a
    Counter per address did, through adds and removes in any order, unmatched ones too."""
    index = _NodesByAddress()
    oracle: dict[str, Counter[str]] = {}
    for add, address, node in steps:
        counter = oracle.setdefault(address, Counter())
        if add:
            index.add(address, node)
            counter[node] += 1
        else:
            index.remove(address, node)
            counter[node] -= 1
            if counter[node] <= 0:
                del counter[node]
        if not counter:
            del oracle[address]
        for each in ("10.0.0.1", "10.0.0.2"):
            assert sorted(index.nodes(each)) == sorted(oracle.get(each, ()))
    assert len(index._by_address) == len(oracle)

"""Tasks of a down node leave the views (as the feed shows them) and come back."""

from __future__ import annotations

import random
from collections.abc import Iterable

from gossip.members import (
    MemberAlive,
    MemberFailed,
    MemberInfo,
    MemberJoined,
    MemberLeft,
    MemberSuspected,
    MemberUpdated,
)
from gossip.messages import MemberState
from mesh.cluster import NodeWatch
from mesh.core.feed import ChangeFeed
from mesh.core.model import Change, Record, Task
from mesh.ipam import Ipam, parse_pool
from mesh.liveness import Liveness
from mesh.state.specs import ServiceSpec, TaskSpec
from mesh.state.store import Store


class Seen(list[Change]):
    def load(self, records: Iterable[Record]) -> None:
        assert list(records) == []

    def on_change(self, change: Change) -> None:
        self.append(change)


def test_down_node_tasks_hidden_then_shown() -> None:
    remote = Store("b", Ipam(parse_pool("127.64.0.0/12")), random.Random(1))
    local = Store("a", Ipam(parse_pool("127.64.0.0/12")), random.Random(2))
    liveness = Liveness(local)
    feed = ChangeFeed(local.all_records, shown=liveness)
    seen = Seen()
    feed.follow(seen)
    for change in remote.create_service(ServiceSpec(name="web"), 0):
        feed.publish(local.merge(change.after))
    task = remote.add_task(TaskSpec(service="web", address="127.0.0.5"), 0)[0].after
    assert isinstance(task, Task)
    feed.publish(local.merge(task))
    assert not seen[-1].after.deleted

    feed.publish(down := liveness.node_down("b"), shown=True)
    assert len(down) == 1
    assert seen[-1].before is not None and not seen[-1].before.deleted
    assert seen[-1].after.deleted
    assert all(r.deleted for r in feed.snapshot()[1] if isinstance(r, Task))
    assert local.tasks() != []  # kept aside, not forgotten

    feed.publish(up := liveness.node_up("b"), shown=True)
    assert len(up) == 1
    assert seen[-1].before is not None and seen[-1].before.deleted
    assert not seen[-1].after.deleted


def test_a_down_node_keeps_why_it_went_down_until_it_is_back() -> None:
    """The API's node_status of a node gossip has forgotten comes from here."""
    local = Store("a", Ipam(parse_pool("127.64.0.0/12")), random.Random(2))
    liveness = Liveness(local)
    liveness.node_down("b", "left")
    liveness.node_down("c")
    assert liveness.why == {"b": "left", "c": "dead"}
    liveness.node_down("b", "dead")  # a left node later declared dead says so
    assert liveness.why["b"] == "dead"
    liveness.node_up("b")
    assert liveness.why == {"c": "dead"}
    assert liveness.node_down("a") == [] and "a" not in liveness.why  # never this node


def test_node_watch_matches_gossip_events_by_type() -> None:
    """Failed/left hide a node's tasks, joined/alive show them, the rest only log."""
    remote = Store("b", Ipam(parse_pool("127.64.0.0/12")), random.Random(1))
    local = Store("a", Ipam(parse_pool("127.64.0.0/12")), random.Random(2))
    liveness = Liveness(local)
    feed = ChangeFeed(local.all_records, shown=liveness)
    seen = Seen()
    feed.follow(seen)
    for change in remote.create_service(ServiceSpec(name="web"), 0):
        local.merge(change.after)
    local.merge(remote.add_task(TaskSpec(service="web", address="127.0.0.5"), 0)[0].after)
    watch = NodeWatch(liveness, feed)
    b = MemberInfo(name="b", addr=("127.0.0.2", 7946), state=MemberState.ALIVE, incarnation=1)

    watch.on_event(MemberSuspected(b, by="c"))
    watch.on_event(MemberUpdated(b))
    assert seen == [] and liveness.down == set()
    watch.on_event(MemberLeft(b))
    assert liveness.why == {"b": "left"} and [c.after.deleted for c in seen] == [True]
    watch.on_event(MemberAlive(b))
    assert liveness.down == set() and [c.after.deleted for c in seen] == [True, False]
    watch.on_event(MemberFailed(b))
    assert liveness.why == {"b": "dead"} and len(seen) == 3
    watch.on_event(MemberJoined(b))
    assert liveness.down == set() and not seen[-1].after.deleted


class Suspects:
    def __init__(self, seen: list[Change]) -> None:
        self.calls: list[tuple[str, str, bool | None, int]] = []
        self._seen = seen

    def node_suspected(self, node: str) -> None:
        self.calls.append(("suspected", node, None, len(self._seen)))

    def node_cleared(self, node: str, *, refuted: bool) -> None:
        self.calls.append(("cleared", node, refuted, len(self._seen)))


def test_node_watch_tells_suspicions_and_their_end_to_the_load_balancer() -> None:
    """A suspicion goes to the L4 driver (lb/failover.py); its end too: refuted or back
    (alive, joined), or a verdict, told only after the views have hidden the tasks."""
    local = Store("a", Ipam(parse_pool("127.64.0.0/12")), random.Random(2))
    liveness = Liveness(local)
    feed = ChangeFeed(local.all_records, shown=liveness)
    seen = Seen()
    feed.follow(seen)
    remote = Store("b", Ipam(parse_pool("127.64.0.0/12")), random.Random(1))
    for change in remote.create_service(ServiceSpec(name="web"), 0):
        local.merge(change.after)
    local.merge(remote.add_task(TaskSpec(service="web", address="127.0.0.5"), 0)[0].after)
    suspects = Suspects(seen)
    watch = NodeWatch(liveness, feed, suspects=suspects)
    b = MemberInfo(name="b", addr=("127.0.0.2", 7946), state=MemberState.ALIVE, incarnation=1)
    watch.on_event(MemberSuspected(b, by="c"))
    watch.on_event(MemberAlive(b))
    watch.on_event(MemberSuspected(b, by="c"))
    watch.on_event(MemberFailed(b))
    watch.on_event(MemberJoined(b))
    assert suspects.calls == [
        ("suspected", "b", None, 0),
        ("cleared", "b", True, 0),
        ("suspected", "b", None, 0),
        ("cleared", "b", False, 1),  # after the task was hidden
        ("cleared", "b", True, 2),
    ]

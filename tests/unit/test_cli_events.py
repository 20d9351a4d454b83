"""`mesh events`: the SSE reading, the lines printed, and the reconnecting loop (a fake
stream opener: what it is asked with is what a reconnect sends as Last-Event-ID)."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pytest

from mesh.cli.errors import Unreachable
from mesh.cli.events import Event, as_json, follow, parse_sse, readable


def _frame(seq: int, kind: str, key: str, op: str = "upsert", **obj: object) -> list[str]:
    data = {"op": op, "kind": kind, "key": key, "object": obj}
    return [f"id: {seq}", f"event: {kind}", f"data: {json.dumps(data)}", ""]


def test_parse_sse_skips_comments_and_joins_data_lines() -> None:
    lines = [": connected", "", "id: 7", "event: task", "data: {", "data: }", "", ": keep-alive"]
    lines += ["", "event: gap", "data: {}", ""]
    events = list(parse_sse(lines))
    assert [(e.id, e.kind, e.data) for e in events] == [
        ("7", "task", ["{", "}"]),
        (None, "gap", ["{}"]),
    ]


def test_readable_line_of_a_change_and_of_a_gap() -> None:
    [event] = parse_sse(_frame(12, "task", "web.1", service="web", node="n1", health="healthy"))
    assert readable(event) == "#12 upsert task web.1 service=web node=n1 health=healthy"
    [gone] = parse_sse(_frame(13, "service", "web", op="delete", name="web"))
    assert readable(gone) == "#13 delete service web"
    assert "gap" in readable(Event(kind="gap", data=["{}"]))


def test_json_line_keeps_the_data_with_its_number() -> None:
    [event] = parse_sse(_frame(5, "network", "front", subnet="10.0.0.0/24"))
    obj = json.loads(as_json(event))
    assert obj["id"] == 5 and obj["event"] == "network" and obj["key"] == "front"
    assert obj["object"]["subnet"] == "10.0.0.0/24"


class FakeStreams:
    """Each call gives the next connection's lines (or raises); records the ids asked."""

    def __init__(self, *connections: list[str] | Exception) -> None:
        self.connections = list(connections)
        self.asked: list[str | None] = []

    def __call__(self, last: str | None) -> Iterable[str]:
        self.asked.append(last)
        connection = self.connections.pop(0)
        if isinstance(connection, Exception):
            raise connection
        return iter(connection)


def test_reconnects_from_the_last_number_seen() -> None:
    streams = FakeStreams(
        [": connected", "", *_frame(1, "service", "a"), *_frame(2, "task", "a.1")],
        Unreachable("connection refused"),  # the agent is restarting
        [": connected", "", *_frame(3, "service", "b")],
    )
    seen: list[str] = []
    notices: list[str] = []
    sleeps: list[float] = []
    follow(
        streams,
        lambda e: seen.append(str(e.id)),
        since="0",
        notice=notices.append,
        sleep=sleeps.append,
        attempts=3,
    )
    assert streams.asked == ["0", "2", "2"]
    assert seen == ["1", "2", "3"]
    assert len(notices) == 3 and "#2" in notices[0] and "connection refused" in notices[1]
    assert sleeps == [0.5, 1.0]  # backing off while it fails


def test_only_the_kinds_asked_for_but_always_a_gap() -> None:
    streams = FakeStreams(
        [*_frame(1, "service", "a"), *_frame(2, "task", "a.1"), "event: gap", "data: {}", ""]
    )
    seen: list[str] = []
    follow(streams, lambda e: seen.append(e.kind), kinds=frozenset({"task"}), attempts=1)
    assert seen == ["task", "gap"]


def test_the_first_connection_failing_is_an_error() -> None:
    with pytest.raises(Unreachable):
        follow(FakeStreams(Unreachable("no agent")), lambda e: None, attempts=3)


def test_the_agent_resumes_by_its_run_and_number() -> None:
    from mesh.api.events import _resume
    from mesh.core.feed import ChangeFeed
    from mesh.core.model import Change

    feed = ChangeFeed(lambda: [])
    feed.publish([Change.__new__(Change) for _ in range(3)], shown=True)  # numbered 1..3
    base = 1_000_000
    numbers = lambda kept: [n.seq for n in kept]  # noqa: E731
    backlog, gap = _resume(feed, base, str(base + 1))
    assert numbers(backlog) == [2, 3] and not gap
    backlog, gap = _resume(feed, base, str(base - 5))  # from an earlier run of the agent
    assert numbers(backlog) == [1, 2, 3] and gap
    assert _resume(feed, base, str(base + 9)) == ([], True)  # never given
    assert _resume(feed, base, "x") == ([], False)

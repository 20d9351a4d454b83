"""The record codec round-trips exactly; the change feed numbers and replays changes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import zlib
from collections.abc import Iterable
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.cluster import encode_records
from mesh.core.codec import record_from_dict, record_json, record_to_dict
from mesh.core.feed import ChangeFeed, Gap
from mesh.core.model import (
    Change,
    Endpoint,
    Health,
    HealthCheck,
    Kind,
    Network,
    PortConfig,
    Record,
    Sandbox,
    Service,
    Task,
    TaskState,
    Version,
    Vip,
)
from mesh.feedserver import _Follower, encode_line

text = st.text(max_size=8)
versions = st.builds(Version, st.integers(0, 2**40), text)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
labels = st.dictionaries(text, text, max_size=3)
networks = st.builds(
    Network,
    name=text,
    id=text,
    driver=text,
    subnet=text,
    gateway=text,
    labels=labels,
    created_at=floats,
    version=versions,
    deleted=st.booleans(),
    scope=st.sampled_from(["swarm", "local"]),
    node=text,
    internal=st.booleans(),
    attachable=st.booleans(),
    ip_range=st.one_of(st.none(), text),
    aux_addresses=labels,
    options=labels,
)
checks = st.builds(
    HealthCheck,
    type=st.sampled_from(["http", "tcp", "ttl"]),
    port=st.one_of(st.none(), st.integers(1, 65535)),
    path=text,
    interval=floats,
    timeout=floats,
    retries=st.integers(1, 9),
    start_period=floats,
    ttl=floats,
)
services = st.builds(
    Service,
    name=text,
    id=text,
    networks=st.lists(text, max_size=3).map(tuple),
    endpoint_mode=st.sampled_from(["vip", "dnsrr"]),
    ports=st.lists(
        st.builds(
            PortConfig,
            protocol=st.sampled_from(["tcp", "udp"]),
            target_port=st.integers(1, 65535),
            published_port=st.integers(1, 65535),
            publish_mode=st.sampled_from(["ingress", "host"]),
        ),
        max_size=3,
    ).map(tuple),
    labels=labels,
    vips=st.lists(st.builds(Vip, network=text, address=text), max_size=3).map(tuple),
    health_check=st.one_of(st.none(), checks),
    created_at=floats,
    updated_at=floats,
    version=versions,
    deleted=st.booleans(),
    aliases=st.dictionaries(text, st.lists(text, max_size=3).map(tuple), max_size=3),
)
sandboxes = st.builds(
    Sandbox,
    netns=text,
    adopted=st.booleans(),
    endpoints=st.lists(
        st.builds(Endpoint, network=text, address=text, mac=text, interface=text), max_size=3
    ).map(tuple),
)
tasks = st.builds(
    Task,
    id=text,
    name=text,
    service=text,
    slot=st.integers(1, 999),
    node=text,
    address=text,
    ports=st.dictionaries(st.integers(1, 65535), st.integers(1, 65535), max_size=3),
    state=st.sampled_from(TaskState),
    health=st.sampled_from(Health),
    health_output=text,
    drain_until=st.one_of(st.none(), floats),
    created_at=floats,
    updated_at=floats,
    version=versions,
    deleted=st.booleans(),
    sandbox=st.one_of(st.none(), sandboxes),
)


@given(st.one_of(networks, services, tasks))
def test_codec_round_trips_through_json(record: Network | Service | Task) -> None:
    assert record_from_dict(json.loads(json.dumps(record_to_dict(record)))) == record


#: Records as an agent before issue 15 wrote them (on disk and in gossip): no scope,
#: aliases or sandbox. They must still load, with those fields at their defaults.
OLD_NETWORK = {
    "version": [3, "a"],
    "deleted": False,
    "kind": "network",
    "name": "front",
    "id": "x",
    "driver": "overlay",
    "subnet": "10.0.1.0/24",
    "gateway": "10.0.1.1",
    "labels": {},
    "created_at": 1.0,
}
OLD_SERVICE = {
    "version": [4, "a"],
    "deleted": False,
    "kind": "service",
    "name": "web",
    "id": "y",
    "networks": ["front"],
    "endpoint_mode": "vip",
    "ports": [],
    "labels": {},
    "vips": [{"network": "front", "address": "10.0.1.2"}],
    "health_check": None,
    "created_at": 1.0,
    "updated_at": 1.0,
}
OLD_TASK = {
    "version": [5, "a"],
    "deleted": False,
    "kind": "task",
    "id": "t",
    "name": "web.1.t",
    "service": "web",
    "slot": 1,
    "node": "a",
    "address": "127.0.0.1",
    "ports": {"80": 8080},
    "state": "running",
    "health": "healthy",
    "health_output": "",
    "drain_until": None,
    "created_at": 1.0,
    "updated_at": 1.0,
}


@given(st.lists(st.one_of(networks, services, tasks), min_size=1, max_size=4))
def test_record_json_is_the_compact_json_of_the_dict_and_feeds_every_encoding(
    records: list[Network | Service | Task],
) -> None:
    compact = [json.dumps(record_to_dict(r), separators=(",", ":")) for r in records]
    assert [record_json(r) for r in records] == compact
    # Gossip's payload and a worker's feed line: the bytes the dicts' encoding gave.
    listed = json.dumps([record_to_dict(r) for r in records], separators=(",", ":")).encode()
    assert encode_records(records) in (b"j" + listed, b"z" + zlib.compress(listed, 6))
    feed = ChangeFeed(lambda: [])
    written: list[bytes] = []
    follower = _Follower(feed, cast(asyncio.StreamWriter, _Sink(written)))
    feed.follow(follower)
    feed.publish([Change(Kind.TASK, "k", None, r) for r in records])
    assert written[1:] == [
        encode_line({"seq": seq, "record": record_to_dict(r)})
        for seq, r in enumerate(records, start=1)
    ]


def test_record_json_encodes_a_version_once_and_keeps_a_few() -> None:
    first = Task(id="t1", name="web.1.t1", service="web", slot=1, node="n1", address="10.0.0.1")
    text = record_json(first)
    assert record_json(first) is text  # kept: not encoded again
    equal = dataclasses.replace(first)  # an equal version, another object: its own entry
    assert record_json(equal) == text and record_json(equal) is not text
    for n in range(300):  # more versions than are kept: the first one's text goes
        record_json(dataclasses.replace(first, slot=n + 2))
    again = record_json(first)
    assert again == text and again is not text


class _Sink:
    """What `_Follower` uses of an asyncio.StreamWriter."""

    def __init__(self, written: list[bytes]) -> None:
        self.written = written
        self.transport = self

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_records_written_before_sandboxes_load_with_the_new_fields_at_their_defaults() -> None:
    network = record_from_dict(OLD_NETWORK)
    assert isinstance(network, Network)
    assert (network.scope, network.node, network.internal, network.attachable) == (
        "swarm",
        "",
        False,
        False,
    )
    assert (network.ip_range, network.aux_addresses, network.options) == (None, {}, {})
    service = record_from_dict(OLD_SERVICE)
    assert isinstance(service, Service) and service.aliases == {}
    task = record_from_dict(OLD_TASK)
    assert isinstance(task, Task)
    assert task.sandbox is None and task.addresses == {} and task.ports == {80: 8080}
    # and written again, the new fields are there for the next reader
    assert record_to_dict(task)["sandbox"] is None
    assert record_to_dict(network)["scope"] == "swarm"


def test_a_sandboxed_task_round_trips_with_its_endpoints_in_order() -> None:
    sandbox = Sandbox(
        netns="/run/netns/mp-abcdef-t",
        endpoints=(
            Endpoint(network="a", address="10.0.1.2", mac="02:42:0a:00:01:02", interface="eth0"),
            Endpoint(network="b", address="10.0.2.2", mac="02:42:0a:00:02:02", interface="eth1"),
        ),
    )
    task = Task(
        id="t", name="web.1.t", service="web", slot=1, node="a", address="10.0.1.2", sandbox=sandbox
    )
    again = record_from_dict(json.loads(json.dumps(record_to_dict(task))))
    assert again == task
    assert isinstance(again, Task) and again.addresses == {"a": "10.0.1.2", "b": "10.0.2.2"}


def _change(key: str) -> Change:
    return Change(
        Kind.NETWORK, key, None, Network(name=key, id=key, driver="overlay", subnet="", gateway="")
    )


class Keys(list[str]):
    """A view that notes the keys it is given."""

    def load(self, records: Iterable[Record]) -> None:
        self.extend(f"loaded {r.key}" for r in records)

    def on_change(self, change: Change) -> None:
        self.append(change.key)


class Broken(Keys):
    def on_change(self, change: Change) -> None:
        raise RuntimeError("a view's bug")


def test_feed_numbers_changes_and_calls_views_in_order() -> None:
    feed = ChangeFeed(lambda: [])
    seen = Keys()
    unfollow = feed.follow(seen)
    feed.publish([_change("a"), _change("b")])
    unfollow()
    feed.publish([_change("c")])
    assert seen == ["a", "b"]
    assert feed.seq == 3
    assert [n.change.key for n in feed.since(1)] == ["b", "c"]
    assert feed.since(3) == []


def test_feed_reports_a_gap_when_history_is_gone() -> None:
    feed = ChangeFeed(lambda: [], history=2)
    feed.publish([_change(k) for k in "abcd"])
    assert [n.seq for n in feed.since(2)] == [3, 4]
    with pytest.raises(Gap):
        feed.since(1)


def test_a_failing_listener_does_not_stop_the_others() -> None:
    feed = ChangeFeed(lambda: [])
    seen = Keys()
    feed.follow(Broken())
    feed.follow(seen)
    feed.publish([_change("a")])
    assert seen == ["a"]


def test_follow_loads_the_snapshot_as_shown_then_every_later_change() -> None:
    """One way to follow the feed: the snapshot (through the feed's filter) and the
    subscription with nothing between them."""
    records: list[Record] = [_change("a").after]

    class Renamed:
        def transform(self, change: Change) -> Change:
            return Change(change.kind, change.key.upper(), change.before, change.after)

        def hide(self, record: Record) -> Record:
            return dataclasses.replace(record, name=record.key.upper())

    feed = ChangeFeed(lambda: records, shown=Renamed())
    seen = Keys()
    feed.follow(seen)
    feed.publish([_change("b")])
    assert seen == ["loaded A", "B"]

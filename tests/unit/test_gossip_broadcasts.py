"""The transmit-limited broadcast queue (memberlist queue.go semantics)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.broadcasts import BroadcastQueue
from gossip.codec import part_size
from gossip.messages import Alive, Message, Suspect, User


def _user(payload: bytes) -> User:
    return User(payload=payload)


def _push(queue: BroadcastQueue, key: object, message: Message) -> None:
    queue.push(key, message, part_size(message))


def test_each_broadcast_is_sent_limit_times_then_dropped() -> None:
    queue = BroadcastQueue(max_depth=10)
    _push(queue, "a", _user(b"a"))
    sent = [queue.take(1000, limit=3, max_items=10) for _ in range(5)]
    assert sent == [[_user(b"a")]] * 3 + [[], []]
    assert len(queue) == 0


def test_a_floor_keeps_a_broadcast_past_a_lower_limit_but_not_a_higher_one() -> None:
    queue = BroadcastQueue(max_depth=10)
    queue.push("floored", _user(b"f"), part_size(_user(b"f")), floor=5)
    _push(queue, "plain", _user(b"p"))
    sent = [queue.take(1000, limit=3, max_items=10) for _ in range(6)]
    assert [len(s) for s in sent] == [2, 2, 2, 1, 1, 0]  # plain 3 times, floored 5
    queue.push("floored", _user(b"g"), part_size(_user(b"g")), floor=2)
    sent = [queue.take(1000, limit=3, max_items=10) for _ in range(4)]
    assert [len(s) for s in sent] == [1, 1, 1, 0]  # a limit above the floor wins


def test_fewest_transmits_first_then_larger_then_newer() -> None:
    queue = BroadcastQueue(max_depth=10)
    _push(queue, "old", _user(b"o"))
    assert queue.take(1000, limit=5, max_items=1) == [_user(b"o")]
    _push(queue, "small", _user(b"s"))
    _push(queue, "big", _user(b"b" * 50))
    _push(queue, "small2", _user(b"t"))
    assert queue.take(1000, limit=5, max_items=4) == [
        _user(b"b" * 50),
        _user(b"t"),
        _user(b"s"),
        _user(b"o"),
    ]


def test_room_is_respected_and_smaller_ones_fill_the_gap() -> None:
    queue = BroadcastQueue(max_depth=10)
    big, small = _user(b"x" * 100), _user(b"y")
    _push(queue, 1, big)
    _push(queue, 2, small)
    assert queue.take(part_size(small) + 10, limit=3, max_items=10) == [small]
    assert queue.take(0, limit=3, max_items=10) == []
    assert queue.take(1000, limit=3, max_items=10) == [big, small]


def test_a_newer_broadcast_with_the_same_key_invalidates_the_older() -> None:
    queue = BroadcastQueue(max_depth=10)
    alive = Alive(incarnation=1, node="b", addr=("h", 1))
    suspect = Suspect(incarnation=1, node="b", sender="a")
    _push(queue, ("node", "b"), alive)
    _push(queue, ("node", "c"), Alive(incarnation=1, node="c", addr=("h", 2)))
    _push(queue, ("node", "b"), suspect)
    assert len(queue) == 2
    assert suspect in queue.messages() and alive not in queue.messages()


def test_depth_is_bounded_dropping_the_most_sent_oldest() -> None:
    queue = BroadcastQueue(max_depth=2)
    _push(queue, 1, _user(b"1"))
    queue.take(1000, limit=9, max_items=10)
    _push(queue, 2, _user(b"2"))
    _push(queue, 3, _user(b"3"))
    assert queue.messages() == [_user(b"2"), _user(b"3")]
    assert queue.dropped == 1
    assert "2 queued, 1 dropped" in repr(queue)


class _SortAndScan:
    """The queue's selection rule in its plainest form: sort everything by
    (transmits, larger, newer) and take what fits. The real queue must pick the same."""

    def __init__(self, max_depth: int) -> None:
        self.entries: dict[object, list[int]] = {}  # key -> [transmits, size, order]
        self.order = 0
        self.max_depth = max_depth

    def push(self, key: object, size: int) -> None:
        self.entries.pop(key, None)
        self.order += 1
        self.entries[key] = [0, size, self.order]
        if len(self.entries) > self.max_depth:
            worst = max(self.entries, key=lambda k: (self.entries[k][0], -self.entries[k][2]))
            del self.entries[worst]

    def take(self, room: int, limit: int, max_items: int) -> list[object]:
        chosen = []
        for key in sorted(
            self.entries,
            key=lambda k: (self.entries[k][0], -self.entries[k][1], -self.entries[k][2]),
        ):
            if len(chosen) >= max_items or room <= 0:
                break
            if self.entries[key][1] <= room:
                chosen.append(key)
                room -= self.entries[key][1]
        for key in chosen:
            self.entries[key][0] += 1
            if self.entries[key][0] >= limit:
                del self.entries[key]
        return chosen


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.integers(0, 12), st.integers(1, 40)),
            st.tuples(st.just("take"), st.integers(-5, 120), st.integers(1, 6)),
        ),
        max_size=80,
    )
)
@settings(max_examples=300, deadline=None)
def test_buckets_pick_exactly_what_sort_and_scan_picks(ops: list[tuple[str, int, int]]) -> None:
    queue, reference = BroadcastQueue(max_depth=8), _SortAndScan(max_depth=8)
    for op, a, b in ops:
        if op == "push":  # a: key, b: payload length
            message = _user(bytes([a]) * b)
            _push(queue, a, message)
            reference.push(a, part_size(message))
        else:  # a: room, b: max items
            got = queue.take(a, limit=3, max_items=b)
            want = reference.take(a, limit=3, max_items=b)
            assert [m.payload[0] if isinstance(m, User) else None for m in got] == want
        assert len(queue) == len(reference.entries)


def test_a_full_queue_drops_what_the_scan_dropped_over_long_runs() -> None:
    """A full queue (a node without peers holds every broadcast) drops the most sent,
    then the oldest, from its buckets' heaps rather than by a scan of the queue: over a
    long run, heaps rebuilt as they fill with entries that left, it drops the same."""
    rng = random.Random(20)
    queue, reference = BroadcastQueue(max_depth=40), _SortAndScan(max_depth=40)
    last: dict[object, bytes] = {}
    for _ in range(6000):
        if rng.random() < 0.85:
            key = rng.randrange(400)
            message = _user(bytes([key % 256]) + key.to_bytes(2, "big") * rng.randint(1, 8))
            _push(queue, key, message)
            reference.push(key, part_size(message))
            last[key] = message.payload
        else:
            room, items = rng.randint(0, 200), rng.randint(1, 6)
            got = queue.take(room, limit=5, max_items=items)
            want = reference.take(room, limit=5, max_items=items)
            assert len(got) == len(want)
        held = sorted(m.payload for m in queue.messages() if isinstance(m, User))
        assert held == sorted(last[k] for k in reference.entries)

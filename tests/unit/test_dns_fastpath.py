"""The UDP fast path (`dns.fastpath.answer_burst`) on its own: what it answers from the
cache, what it hands to the slow path, how far it drains, and what it does when the
socket cannot take a reply. The same tests run on the compiled build (.ci/run)."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any

from dns.cache import FORWARD_MARK, Entry, Key
from dns.fastpath import RECV_MAX, answer_burst

ASKER = ("127.0.0.1", 5353)
QUERY = b"\x12\x34" + b"question-after-the-id"


class Socket:
    """Queued datagrams to read, and what was sent; `full` makes sendto fail as a
    non-blocking socket does when its send buffer is full."""

    def __init__(self, queued: list[tuple[bytes, tuple[str, int]]], full: bool = False) -> None:
        self.queued = list(queued)
        self.sent: list[tuple[bytes, Any]] = []
        self.reads = 0
        self.full = full

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        assert size == RECV_MAX
        self.reads += 1
        if not self.queued:
            raise BlockingIOError
        return self.queued.pop(0)

    def sendto(self, data: bytes, addr: Any) -> int:
        if self.full:
            raise BlockingIOError
        self.sent.append((data, addr))
        return len(data)


def cache_with(query: bytes, reply: bytes, slot: int = 3) -> OrderedDict[Key, Entry]:
    cache: OrderedDict[Key, Entry] = OrderedDict()
    cache[("host", False, query[2:])] = itertools.cycle([(reply, slot)])
    cache[("host", False, b"other")] = FORWARD_MARK
    return cache


def burst(sock: Socket, cache: OrderedDict[Key, Entry], drain: bool, budget: int = 64) -> Any:
    hits, unsent, slow = [0] * 8, [0], []
    empty = answer_burst(
        QUERY,
        ASKER,
        {"127.0.0.1": "host"},
        cache,
        hits,
        sock.sendto,
        sock.recvfrom if drain else None,
        lambda data, addr: slow.append((data, addr)),
        budget,
        unsent,
    )
    return empty, hits, unsent, slow


def test_a_cached_query_gets_the_reply_with_its_own_id_and_is_counted() -> None:
    sock = Socket([])
    empty, hits, unsent, slow = burst(sock, cache_with(QUERY, b"REPLY"), drain=False)
    assert sock.sent == [(b"\x12\x34REPLY", ASKER)]
    assert hits[3] == 1 and unsent == [0] and slow == [] and not empty
    assert sock.reads == 0  # no drain asked: nothing read


def test_what_the_cache_cannot_answer_goes_to_the_slow_path() -> None:
    stranger = (b"\x00\x01" + b"question-after-the-id", ("127.0.0.9", 1))  # no view
    forwarded = (b"\x00\x02other", ASKER)  # the forward mark
    unknown = (b"\x00\x03unknown", ASKER)
    sock = Socket([stranger, forwarded, unknown])
    empty, hits, _, slow = burst(sock, cache_with(QUERY, b"R"), drain=True)
    assert slow == [stranger, forwarded, unknown]
    assert hits[3] == 1 and len(sock.sent) == 1 and not empty
    assert sock.reads == 4  # three datagrams, then the empty read that ends the burst


def test_the_drain_stops_at_its_budget_and_reports_an_empty_socket() -> None:
    queued = [(b"\x00" + bytes([i]) + QUERY[2:], ASKER) for i in range(10)]
    sock = Socket(queued)
    empty, hits, _, _ = burst(sock, cache_with(QUERY, b"R"), drain=True, budget=4)
    assert hits[3] == 5 and sock.reads == 4 and len(sock.queued) == 6 and not empty
    assert [data[:2] for data, _ in sock.sent] == [b"\x12\x34", *(q[0][:2] for q in queued[:4])]
    empty, *_ = burst(Socket([]), cache_with(QUERY, b"R"), drain=True)
    assert empty  # the first read found nothing: the caller skips a few drains


def test_a_reply_the_socket_cannot_take_is_dropped_counted_and_the_burst_goes_on() -> None:
    queued = [(QUERY, ASKER)] * 3
    sock = Socket(queued, full=True)
    _, hits, unsent, _ = burst(sock, cache_with(QUERY, b"R"), drain=True)
    assert unsent == [4] and hits[3] == 4 and sock.sent == [] and sock.reads == 4

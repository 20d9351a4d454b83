"""UDP queries spread over every socket of the DNS port's reuseport group (issue 20, DNS).

Real kernel sockets on loopback: one asker's socket (one flow, so one hash)
sends to a port two SO_REUSEPORT sockets share; with the group's program each
gets about half, where the hash alone gives one of them everything.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from dns.reuseport import spread_at_random
from dns.server import udp_socket

DATAGRAMS = 400


@pytest.fixture
def group() -> Iterator[list[socket.socket]]:
    first = udp_socket("127.0.0.1", 0, reuse_port=True)
    second = udp_socket("127.0.0.1", first.getsockname()[1], reuse_port=True)
    yield [first, second]
    first.close()
    second.close()


def _received(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(512)
        except BlockingIOError:
            return count
        count += 1


def _send_from_one_socket(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as asker:
        for _ in range(DATAGRAMS):
            asker.sendto(b"q", ("127.0.0.1", port))


def test_one_askers_queries_spread_over_the_group(group: list[socket.socket]) -> None:
    spread_at_random(group[0], len(group))
    _send_from_one_socket(group[0].getsockname()[1])
    counts = [_received(sock) for sock in group]
    print(f"one asker, two sockets: {counts[0]} and {counts[1]} of {DATAGRAMS}")
    assert sum(counts) == DATAGRAMS  # loopback: nothing lost
    assert min(counts) > DATAGRAMS // 4  # ~half each; the hash alone gives one all


def test_a_group_short_of_its_size_falls_back_to_the_hash(
    group: list[socket.socket],
) -> None:
    spread_at_random(group[1], 4)  # two of four sockets bound: indexes 2 and 3 do not exist
    _send_from_one_socket(group[0].getsockname()[1])
    counts = [_received(sock) for sock in group]
    print(f"program for four, two sockets: {counts[0]} and {counts[1]} of {DATAGRAMS}")
    assert sum(counts) == DATAGRAMS  # nothing lost to a missing socket


def test_a_group_of_nothing_is_refused() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
        pytest.raises(ValueError, match="at least one"),
    ):
        spread_at_random(sock, 0)

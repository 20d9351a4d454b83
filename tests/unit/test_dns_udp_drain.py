"""The UDP listener reads queued queries straight from its socket (issue 20, DNS).

Under load a wake-up of the event loop finds many queries queued; the listener
answers them in one callback instead of one event-loop callback each (fewer
Python-level operations per query). These tests use a real listener from
`dns.server.serve` on loopback, a real client socket, and count the callbacks.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from dnslib import DNSRecord

from dns.server import DRAIN_MAX, QUIET_SKIPS, UdpServer, serve
from tests.unit.test_dns_responder import World


async def _no_forward(query: bytes, tcp: bool) -> bytes:
    raise AssertionError("nothing is forwarded here")


def _world() -> World:
    world = World(domain="mesh")
    world.service("web", networks=("front",))
    world.task("web", "10.1.0.10", {80: 31001})
    return world


@pytest.fixture
def client() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def _count_callbacks(udp: UdpServer) -> list[int]:
    """Wrap the listener's callback: how many times the event loop called it."""
    calls = [0]
    original = udp.datagram_received

    def counted(data: bytes, addr: Any) -> None:
        calls[0] += 1
        original(data, addr)

    udp.datagram_received = counted  # type: ignore[method-assign]
    return calls


async def _burst(client: socket.socket, port: int, queries: list[bytes]) -> list[bytes]:
    """Queue every query at once (the loop is not running meanwhile), then read every reply."""
    for data in queries:
        client.sendto(data, ("127.0.0.1", port))
    replies = []
    loop = asyncio.get_running_loop()
    for _ in queries:
        replies.append(await loop.run_in_executor(None, client.recv, 4096))
    return replies


async def test_queued_queries_are_answered_in_one_callback(client: socket.socket) -> None:
    world = _world()
    udp, tcp, port = await serve(world.responder, _no_forward, "127.0.0.1", 0)
    try:
        calls = _count_callbacks(udp)
        ids = range(40)
        queries = [bytes(DNSRecord.question("web.mesh", "A").pack()) for _ in ids]
        queries = [i.to_bytes(2, "big") + q[2:] for i, q in zip(ids, queries, strict=True)]
        replies = await _burst(client, port, queries)
        # every query answered, each with its own ID and the service's address (its VIP)
        assert sorted(int.from_bytes(r[:2], "big") for r in replies) == list(ids)
        assert {str(DNSRecord.parse(r).a.rdata) for r in replies} == {"10.1.0.2"}
        print(f"40 queued queries answered in {calls[0]} event-loop callback(s)")
        assert calls[0] < 10  # one each without the drain: 40
    finally:
        await udp.close()
        await tcp.close()


async def test_a_drain_is_bounded_so_the_loop_runs_other_callbacks(
    client: socket.socket,
) -> None:
    world = _world()
    udp, tcp, port = await serve(world.responder, _no_forward, "127.0.0.1", 0)
    try:
        calls = _count_callbacks(udp)
        query = bytes(DNSRecord.question("web.mesh", "A").pack())
        count = 3 * (DRAIN_MAX + 1)
        replies = await _burst(client, port, [query] * count)
        assert len(replies) == count
        print(f"{count} queued queries answered in {calls[0]} event-loop callbacks")
        assert calls[0] >= 3  # at most DRAIN_MAX + 1 per callback
    finally:
        await udp.close()
        await tcp.close()


async def test_an_empty_drain_pauses_draining_at_light_load(client: socket.socket) -> None:
    world = _world()
    udp, tcp, port = await serve(world.responder, _no_forward, "127.0.0.1", 0)
    try:
        query = bytes(DNSRecord.question("web.mesh", "A").pack())
        await _burst(client, port, [query])  # one query, nothing behind it: an empty read
        assert udp._quiet == QUIET_SKIPS
        await _burst(client, port, [query])
        assert udp._quiet == QUIET_SKIPS - 1  # answered without trying to read more
    finally:
        await udp.close()
        await tcp.close()

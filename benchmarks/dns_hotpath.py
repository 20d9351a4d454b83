"""The DNS server's Python per query, in process: CPU time of `UdpServer.datagram_received`.

`dns_bench.py` measures the whole agent with dnsperf over loopback, where a shared
machine's load makes every figure noisy. This feeds the UDP listener datagrams
directly, with a real UDP transport of uvloop (the agent's loop) or, with `--loop
asyncio`, of asyncio's own loop (a DNS worker's), so `sendto` is the real syscall, to a
socket nobody reads; and reports the best CPU time per query over a few passes:

- `canonical`: a stub's A query (no EDNS), found in the reply cache by its bytes
  (the fast path);
- `cookie`: the same with an EDNS cookie, found once the responder has brought it
  to canonical form;
- `miss`: the stub's A query when the cache holds nothing (the first query of a
  name, or the first after a change dropped its reply): built from wire templates
  (`dns.templates`) where the tree has them, else parsed and packed with dnslib;
- `queued`: 500 stub queries queued on the listener's socket by a real client
  socket, then answered by the event loop (the listener drains the socket in one
  callback where the tree has `UdpServer.drain_from`, else one callback each).

Every name is asked once first, so each timed query is a cache hit. To compare two
commits, run it alternately from two trees, one pinned core each time:

    PYTHONPATH=. taskset -c 0 .venv/bin/python benchmarks/dns_hotpath.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import sys
import time
from pathlib import Path

import uvloop
from dnslib import EDNS0, DNSRecord, EDNSOption

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dns.responder import DnsConfig, Responder
from dns.server import UdpServer
from dns.table import NameTable
from mesh.ipam import Ipam, parse_pool
from mesh.state.specs import NetworkSpec, ServiceSpec
from mesh.state.store import Store


def responder(names: int) -> Responder:
    """A responder that knows `names` services (svc0 ...) on one network."""
    store = Store("n1", Ipam(parse_pool("10.0.0.0/8")), random.Random(1))
    answer = Responder(NameTable("mesh"), DnsConfig(ttl=5, domain="mesh"), random.Random(2))
    changes = store.ensure_ingress()
    changes += store.create_network(NetworkSpec(name="front", subnet="10.1.0.0/16"), 1.0)
    for i in range(names):
        changes += store.create_service(ServiceSpec(name=f"svc{i}", networks=("front",)), 1.0)
    for change in changes:
        answer.on_change(change)
    return answer


def query(name: str, cookie: bool) -> bytes:
    record = DNSRecord.question(name, "A")
    if cookie:
        record.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(10, b"12345678")]))
    return bytes(record.pack())


async def measure(names: int, calls: int, passes: int, cookie: bool, miss: bool = False) -> float:
    """Best CPU seconds per query over `passes` of `calls` queries (`miss`: of `names`
    queries, each name once, into an empty cache)."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)

    async def no_forward(data: bytes, tcp: bool) -> bytes:
        raise AssertionError("every name is the mesh's")

    loop = asyncio.get_running_loop()
    answer = responder(names)
    transport, udp = await loop.create_datagram_endpoint(
        lambda: UdpServer(answer, no_forward), sock=sock
    )
    udp.transport = transport
    addr = sink.getsockname()
    queries = [query(f"svc{i}", cookie) for i in range(names)]
    for data in queries:  # each name once: every timed query is a hit
        udp.datagram_received(data, addr)
    receive = udp.datagram_received
    best = float("inf")
    try:
        for _ in range(passes):
            if miss:
                answer.cache.clear()
                started = time.process_time()
                for data in queries:
                    receive(data, addr)
                best = min(best, (time.process_time() - started) / names)
                continue
            started = time.process_time()
            for i in range(calls):
                receive(queries[i % names], addr)
            best = min(best, (time.process_time() - started) / calls)
    finally:
        transport.close()
        sink.close()
    return best


async def measure_queued(names: int, burst: int, passes: int) -> float:
    """Best CPU seconds per query for `burst` queries queued on the socket at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    client.bind(("127.0.0.1", 0))
    client.setblocking(False)

    async def no_forward(data: bytes, tcp: bool) -> bytes:
        raise AssertionError("every name is the mesh's")

    loop = asyncio.get_running_loop()
    transport, udp = await loop.create_datagram_endpoint(
        lambda: UdpServer(responder(names), no_forward), sock=sock
    )
    udp.transport = transport
    if hasattr(udp, "drain_from"):  # issue 20's listener; older trees have one callback each
        udp.drain_from(sock)
    queries = [query(f"svc{i}", False) for i in range(names)]
    for data in queries:  # each name once: every timed query is a hit
        udp.datagram_received(data, client.getsockname())
    target = sock.getsockname()
    best = float("inf")
    try:
        for _ in range(passes):
            answered = udp.hits + burst
            for i in range(burst):
                client.sendto(queries[i % names], target)
            started = time.process_time()
            deadline = time.monotonic() + 10
            # polled, not awaited on an Event: the listener has no hook to set one
            while udp.hits < answered and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0)
            best = min(best, (time.process_time() - started) / burst)
            with contextlib.suppress(BlockingIOError):
                while True:
                    client.recv(4096)
    finally:
        transport.close()
        client.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--names", type=int, default=200)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the event loop: the agent's (uvloop) or a DNS worker's (asyncio's own)",
    )
    args = parser.parse_args()
    run = uvloop.run if args.loop == "uvloop" else asyncio.run
    for label, cookie, miss in (
        ("canonical", False, False),
        ("cookie", True, False),
        ("miss", False, True),
    ):
        seconds = run(measure(args.names, args.calls, args.passes, cookie, miss))
        print(f"{label:<10} {seconds * 1e9:6.0f} ns CPU per query")
    seconds = run(measure_queued(args.names, 500, 10 * args.passes))
    print(f"{'queued':<10} {seconds * 1e9:6.0f} ns CPU per query")


if __name__ == "__main__":
    main()

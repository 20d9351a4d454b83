"""The router's Python per request, without sockets: a profile aid, not a comparison.

`http_bench.py` measures the router against nginx over loopback, where the
kernel's TCP path and the machine's other load make every figure noisy. This
drives one `ClientConnection` (its `Exchange`) and its pooled `UpstreamConnection` with
in-memory transports: a keep-alive GET (as wrk sends it) goes in, the request
head the task would get is captured, a response like the benchmark's nginx
backends' comes back, and the client's answer is captured. What it times is
only the router's own Python (llhttp callbacks, routing, the balancer, the
pool, both heads), so a change on the hot path shows as a steady number of
microseconds. It checks the bytes that came out, so a faster wrong answer fails.

    .venv/bin/python benchmarks/http_hotpath.py              # 200k requests, best of 5
    .venv/bin/python benchmarks/http_hotpath.py --profile    # cProfile of one pass
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lb.http.proxy import ClientConnection
from lb.http.router import Router
from lb.http.routes import RouteTable
from lb.http.settings import RouterSettings
from lb.http.upstream import UpstreamConnection
from mesh.core.model import Health, Service, Task

REQUEST = b"GET / HTTP/1.1\r\nHost: svc0.bench\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 15:30:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 8\r\nConnection: keep-alive\r\n\r\n"
    b"svc0-t1\n"
)


class MemoryTransport:
    """Just enough of a transport: keeps the last bytes written."""

    def __init__(self) -> None:
        self.last: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.last.append(data)

    def writelines(self, parts: Sequence[bytes]) -> None:
        self.last.extend(parts)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise AssertionError("the router closed a connection in the steady state")

    abort = close


def router_with_one_route() -> Router:
    table = RouteTable()
    table.load(
        [
            Service(
                name="svc0",
                id="id-svc0",
                labels={"mesh.http.hosts": "svc0.bench", "mesh.http.port": "80"},
            ),
            Task(
                id="t1",
                name="svc0.1.t1",
                service="svc0",
                slot=1,
                node="n",
                address="127.0.0.1",
                ports={80: 40001},
                health=Health.HEALTHY,
            ),
            Task(
                id="t2",
                name="svc0.2.t2",
                service="svc0",
                slot=2,
                node="n",
                address="127.0.0.1",
                ports={80: 40002},
                health=Health.HEALTHY,
            ),
        ]
    )
    return Router(table, RouterSettings())


def run(router: Router, requests: int) -> float:
    """Seconds of CPU for `requests` keep-alive exchanges on one client connection."""
    client = ClientConnection(router, "http")
    client_transport = MemoryTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    upstreams: dict[int, tuple[UpstreamConnection, MemoryTransport]] = {}
    for port in (40001, 40002):
        conn = UpstreamConnection(router.pool, ("127.0.0.1", port))
        transport = MemoryTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        router.pool.live.add(conn)
        router.pool.release(conn)
        upstreams[port] = (conn, transport)
    first = True
    started = time.process_time()
    for _ in range(requests):
        client.data_received(REQUEST)
        conn = client.exchange.upstream
        assert conn is not None and conn.transport is not None
        conn.data_received(RESPONSE)
        if first:  # the bytes are right (checked once: the loop is the same after)
            first = False
            sent = b"".join(upstreams[conn.key[1]][1].last)
            assert sent.startswith(b"GET / HTTP/1.1\r\nHost: svc0.bench\r\n"), sent
            assert b"X-Forwarded-For: 127.0.0.1\r\n" in sent, sent
            answer = b"".join(client_transport.last)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
            assert answer.endswith(b"Content-Length: 8\r\n\r\nsvc0-t1\n"), answer
            assert b"Connection" not in answer, answer
        client_transport.last.clear()
        upstreams[conn.key[1]][1].last.clear()
    elapsed = time.process_time() - started
    assert router.stats.requests >= requests
    return elapsed


async def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--passes", type=int, default=5, help="best of this many")
    parser.add_argument("--profile", action="store_true", help="cProfile one pass instead")
    args = parser.parse_args(argv)
    router = router_with_one_route()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run(router, args.requests)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return 0
    times = [run(router, args.requests) for _ in range(args.passes)]
    best = min(times)
    print(
        f"{best / args.requests * 1e6:.2f} us of Python per request "
        f"(best of {args.passes} x {args.requests}; all: "
        + ", ".join(f"{t / args.requests * 1e6:.2f}" for t in times)
        + ")"
    )
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main(sys.argv[1:])))  # as the agent runs: loop.time is uvloop's

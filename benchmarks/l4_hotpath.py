"""The userspace L4 proxy's Python per connection and per request, in process.

`l4_bench.py` measures the proxy against HAProxy with wrk and nginx, where a shared
machine's load makes every figure noisy. This runs the proxy (`lb.userspace`, on
uvloop) in the main thread, and a blocking client and a blocking backend in two
other threads, over loopback, and reports for the proxy's thread alone:

- `calls`: Python-level calls per connection or request (functions, and the C
  functions they call; `sys.setprofile` events, in a separate counted pass);
- `CPU us`: the proxy thread's CPU time (`time.thread_time`, user + system, so the
  system calls are in it) per connection or request, in an uncounted pass.

Two modes: `conn`, one TCP connection per exchange (accept, connect to the
backend, 64 bytes each way, the backend closes, the close is passed on), and
`keep-alive`, 64-byte exchanges over one open connection. The client and the
backend hold the GIL only between their blocking calls, so the proxy thread's
CPU time is its own. The proxy is imported from PYTHONPATH's tree when it is
set, so one copy of this script compares two commits (alternate the runs):

    PYTHONPATH=. taskset -c 0 .venv/bin/python benchmarks/l4_hotpath.py
    PYTHONPATH=/tmp/base taskset -c 0 .venv/bin/python benchmarks/l4_hotpath.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop

# The proxy under test: PYTHONPATH's tree when given (another commit's checkout),
# else this one's.
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lb.table import PutReal, PutService, Real, VirtualKey
from lb.userspace import UserspaceBackend

HOST = "127.0.0.1"
MESSAGE = b"x" * 64


def backend(listener: socket.socket, stop: threading.Event) -> None:
    """Answer each 64-byte message with 64 bytes; a b"C" message also closes."""
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def serve(conn: socket.socket) -> None:
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(MESSAGE)
            if data.startswith(b"C"):
                return  # the proxy passes this close on to the client


def client_conns(port: int, count: int) -> None:
    for _ in range(count):
        with socket.create_connection((HOST, port)) as sock:
            sock.sendall(b"C" + MESSAGE[1:])
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
            assert got == MESSAGE, got


def client_keepalive(port: int, count: int) -> None:
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            sock.sendall(MESSAGE)
            got = b""
            while len(got) < len(MESSAGE):
                got += sock.recv(65536)


class CallCounter:
    def __init__(self) -> None:
        self.calls = 0
        self.where: Counter[str] = Counter()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            self.calls += 1
            code = frame.f_code
            self.where[f"{Path(code.co_filename).name}:{code.co_name}"] += 1
        elif event == "c_call":
            self.calls += 1
            self.where[f"C {getattr(arg, '__qualname__', arg)}"] += 1


async def run(args: argparse.Namespace) -> None:
    listener = socket.create_server((HOST, 0), backlog=512)
    real_port = listener.getsockname()[1]
    stop = threading.Event()
    threading.Thread(target=backend, args=(listener, stop), daemon=True).start()
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    proxy = UserspaceBackend()
    key = VirtualKey("tcp", HOST, port)
    await proxy.start({})
    await proxy.apply([PutService(key), PutReal(key, Real(HOST, real_port), 1)])
    loop = asyncio.get_running_loop()

    async def timed(work: Callable[[int, int], None], count: int) -> float:
        done = asyncio.Event()

        def client() -> None:
            try:
                work(port, count)
            finally:
                loop.call_soon_threadsafe(done.set)

        start = time.thread_time()
        threading.Thread(target=client).start()
        await done.wait()
        return time.thread_time() - start

    print(f"{'mode':<11} {'count':>6} {'calls':>7} {'CPU us':>8}  (best of {args.passes})")
    for mode, work, count in (
        ("conn", client_conns, args.connections),
        ("keep-alive", client_keepalive, args.requests),
    ):
        await timed(work, count // 10)  # warm-up
        best = min([await timed(work, count) for _ in range(args.passes)])
        counter = CallCounter()
        sys.setprofile(counter)
        await timed(work, count // 10)
        sys.setprofile(None)
        per = counter.calls / (count // 10)
        print(f"{mode:<11} {count:>6} {per:>7.1f} {best / count * 1e6:>8.1f}")
        if args.top:
            for where, calls in counter.where.most_common(args.top):
                print(f"    {calls / (count // 10):6.2f}  {where}")
    await proxy.close()
    stop.set()
    listener.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--top", type=int, default=0, help="list the most frequent calls")
    args = parser.parse_args()
    print(f"proxy: {Path(sys.modules['lb.userspace'].__file__ or '?').parent}")
    uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

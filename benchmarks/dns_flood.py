"""DNS padded-query flood: how much a running agent's memory grows under hostile queries.

Sends `--queries` UDP queries, each a valid question followed by `--padding`
bytes of trailing garbage that differ from query to query (a counter and
random bytes), and reads the agent's resident set size (`VmRSS` in
/proc/PID/status) before and after. A DNS server must treat the bytes after
the question as nothing (issue 13, defect 4): its caches key on the parsed
question, so the growth stays small whatever the padding.

Two kinds of name, one or both (`--kind`):

- `mesh`: a name the agent owns (a service it answers itself);
- `forward`: a name it does not own, forwarded to an upstream and cached by
  the forwarder (a local fake upstream in `--spawn` mode).

With `--distinct-names` every query asks another name as well (`tasks.nI`,
NXDOMAIN in the mesh's space, or `nI.<forward name>`, NXDOMAIN upstream and
cached negatively): that fills the caches to their bounds, and shows what
those bounds cost in memory.

Queries are sent with a bounded window of outstanding queries (`--window`),
from one socket, and the run stops after `--max-seconds` whatever is left;
everything goes to loopback.

Against a running agent (its DNS address, the PID to read RSS from, and the
names to ask; the mesh name must exist, the forwarded one must resolve):

    .venv/bin/python benchmarks/dns_flood.py --pid 1234 --dns 127.0.0.1:5353 \
        --mesh-name web --forward-name www.example.test

Or let it start its own agent (a `mesh agent` on free loopback ports, a
service `web`, and a fake upstream that answers `www.example.test`):

    .venv/bin/python benchmarks/dns_flood.py --spawn [--queries 100000] [--padding 300]

It prints one line per kind (queries sent and answered, seconds, RSS before,
after and growth in MB), and the agent's DNS counters when the agent shows
them (`GET /v1/dns`, `stats`). Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import socket
import struct
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MAX_QUERIES = 1_000_000
MAX_PADDING = 60_000
SETTLE_SECONDS = 1.0  # after the flood, before reading RSS: let the agent finish its backlog


def rss_kib(pid: int) -> int:
    """The process's resident set size in KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def question(name: str, qid: int, qtype: int = 1) -> bytes:
    """A plain recursive query (RD set, no EDNS) for `name`, as a stub resolver sends it."""
    labels = b"".join(
        len(part).to_bytes(1, "big") + part.encode() for part in name.rstrip(".").split(".") if part
    )
    return (
        struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\x00"
        + struct.pack("!HH", qtype, 1)
    )


def padded(base: bytes, index: int, padding: int, rng: random.Random) -> bytes:
    """`base` with `padding` bytes after it, distinct for every `index`."""
    if padding <= 0:
        return base
    tail = index.to_bytes(8, "big") + rng.randbytes(max(0, padding - 8))
    return base + tail[:padding]


@dataclass
class Flood:
    kind: str
    sent: int
    answered: int
    seconds: float
    rss_before_kib: int
    rss_after_kib: int

    @property
    def growth_mb(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / 1024

    def line(self) -> str:
        return (
            f"{self.kind:8} sent={self.sent} answered={self.answered} "
            f"seconds={self.seconds:.1f} rss_before={self.rss_before_kib / 1024:.1f}MB "
            f"rss_after={self.rss_after_kib / 1024:.1f}MB growth={self.growth_mb:+.1f}MB"
        )


def flood(
    address: tuple[str, int],
    pid: int,
    kind: str,
    name: str,
    *,
    queries: int,
    padding: int,
    window: int,
    max_seconds: float,
    seed: int = 13,
    distinct_names: bool = False,
) -> Flood:
    """Send `queries` padded queries for `name`, at most `window` unanswered at a time.

    With `distinct_names`, query I asks `tasks.nI` (mesh) or `nI.<name>` (forward).
    """
    rng = random.Random(seed)
    before = rss_kib(pid)
    sent = answered = 0
    start = time.monotonic()
    deadline = start + max_seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.connect(address)
        sock.setblocking(False)
        outstanding = 0
        last_answer = time.monotonic()
        while (sent < queries or outstanding) and time.monotonic() < deadline:
            while sent < queries and outstanding < window:
                asked = name
                if distinct_names:
                    asked = f"tasks.n{sent}" if kind == "mesh" else f"n{sent}.{name}"
                base = question(asked, sent & 0xFFFF)
                try:
                    sock.send(padded(base, sent, padding, rng))
                except BlockingIOError:
                    break
                sent += 1
                outstanding += 1
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                while True:
                    try:
                        sock.recv(65535)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    answered += 1
                    outstanding -= 1
                last_answer = time.monotonic()
            elif time.monotonic() - last_answer > 1.0:
                outstanding = 0  # lost in a full buffer: give up on them, send more
                last_answer = time.monotonic()
    seconds = time.monotonic() - start
    time.sleep(SETTLE_SECONDS)
    return Flood(kind, sent, answered, seconds, before, rss_kib(pid))


def dns_stats(api: str | None) -> dict[str, int] | None:
    if api is None:
        return None
    try:
        with urllib.request.urlopen(f"http://{api}/v1/dns", timeout=5) as resp:
            stats: dict[str, int] | None = json.loads(resp.read()).get("stats")
            return stats
    except OSError:
        return None


@contextmanager
def spawned_agent() -> Iterator[tuple[tuple[str, int], int, str]]:
    """A fresh agent with a service `web` and a fake upstream answering www.example.test."""
    from tests.helpers.agent import AgentProcess
    from tests.helpers.dns_upstream import FakeUpstream

    with (
        tempfile.TemporaryDirectory(prefix="dns-flood-") as root,
        FakeUpstream({"www.example.test": ["192.0.2.1"]}) as upstream,
    ):
        agent = AgentProcess(
            Path(root) / "data", extra=["--dns-upstream", f"127.0.0.1:{upstream.port}"]
        )
        agent.start()
        try:
            status, _ = agent.request(
                "POST", "/v1/networks", {"name": "front", "subnet": "127.81.0.0/24"}
            )
            assert status == 201, status
            status, _ = agent.request(
                "POST", "/v1/services", {"name": "web", "networks": ["front"]}
            )
            assert status == 201, status
            assert agent.proc is not None
            yield ("127.0.0.1", agent.dns_port), agent.proc.pid, agent.api
        finally:
            agent.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spawn", action="store_true", help="start an agent and an upstream")
    parser.add_argument("--pid", type=int, help="the agent's PID (without --spawn)")
    parser.add_argument("--dns", default="127.0.0.1:5353", help="the agent's DNS ADDR:PORT")
    parser.add_argument("--api", help="the agent's API ADDR:PORT, to print its DNS counters")
    parser.add_argument("--mesh-name", default="web")
    parser.add_argument("--forward-name", default="www.example.test")
    parser.add_argument("--kind", choices=("mesh", "forward", "both"), default="both")
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--padding", type=int, default=300)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument(
        "--distinct-names",
        action="store_true",
        help="another name in every query: fills the caches to their bounds",
    )
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per kind")
    args = parser.parse_args(argv)
    if not 0 < args.queries <= MAX_QUERIES:
        parser.error(f"--queries must be 1..{MAX_QUERIES}")
    if not 0 <= args.padding <= MAX_PADDING:
        parser.error(f"--padding must be 0..{MAX_PADDING}")
    if not 0 < args.max_seconds <= 600:
        parser.error("--max-seconds must be at most 600")
    kinds = ["mesh", "forward"] if args.kind == "both" else [args.kind]
    names = {"mesh": args.mesh_name, "forward": args.forward_name}

    def run(address: tuple[str, int], pid: int, api: str | None) -> None:
        print(
            f"flood: {args.queries} queries x {args.padding} bytes of padding, "
            f"{'distinct names, ' if args.distinct_names else ''}"
            f"window {args.window}, pid {pid}, dns {address[0]}:{address[1]}"
        )
        for kind in kinds:
            result = flood(
                address,
                pid,
                kind,
                names[kind],
                queries=args.queries,
                padding=args.padding,
                window=args.window,
                max_seconds=args.max_seconds,
                distinct_names=args.distinct_names,
            )
            print(result.line(), flush=True)
        stats = dns_stats(api)
        if stats is not None:
            print("dns stats:", " ".join(f"{k}={v}" for k, v in sorted(stats.items())))

    if args.spawn:
        with spawned_agent() as (address, pid, api):
            run(address, pid, api)
        return 0
    if args.pid is None or not os.path.exists(f"/proc/{args.pid}"):
        parser.error("--pid of a running agent is required without --spawn")
    host, _, port = args.dns.rpartition(":")
    run((host, int(port)), args.pid, args.api)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

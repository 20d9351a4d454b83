"""L4 benchmark: the userspace proxy against HAProxy (mode tcp), side by side in one run.

Every path reaches the same backend, one nginx worker on 127.0.0.1 serving a
small response (`/small`, 6 bytes) and a 1 GiB sparse file (`/big`, sendfile):

- `direct`: the client talks to nginx itself (the ceiling);
- `haproxy`: HAProxy in TCP mode, one thread (`nbthread 1`);
- `userspace`: meshplane's userspace backend (`lb.userspace`) on uvloop, one
  event loop, in a process of its own with one virtual service;
- `nftables`: the nftables backend, when `lb.nft` is part of the build and the
  benchmark runs as root (its own table, DNAT on a 127.x address).

Both proxies are pinned to the same CPU (`--proxy-cpu`), nginx and the clients
to another (`--client-cpu`), with `taskset`. Per path, one run each of:

- `req/s`: wrk, keep-alive, 50 connections, small responses;
- `conn/s`: wrk with `Connection: close`: one TCP connection per request;
- `MB/s`: one 1 GiB transfer with curl (`/big`).

and the proxy's CPU time per request (utime + stime from /proc, µs). Ratios
are against HAProxy. One run on a shared machine is noisy: read the ratios,
not the absolute figures.

    .venv/bin/python benchmarks/l4_bench.py [--seconds 5] [--proxy-cpu 1] [--client-cpu 0]

Needs wrk, curl, nginx, haproxy and taskset (Debian: `apt-get install wrk curl
nginx-light haproxy util-linux`). A default run takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
BIG = 1 << 30
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


@contextlib.contextmanager
def process(
    argv: list[str], cpu: int, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", str(cpu), *argv], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def nginx_config(work: Path, port: int) -> Path:
    big = work / "big"
    with big.open("wb") as handle:
        handle.truncate(BIG)  # sparse: reads cost no disk
    config = work / "nginx.conf"
    config.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
{"user root;" if os.geteuid() == 0 else ""}
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen {HOST}:{port} backlog=4096;
        location = /small {{ return 200 "hello\\n"; }}
        location = /big {{ alias {big}; }}
    }}
}}
""")
    return config


def haproxy_config(work: Path, port: int, backend: int) -> Path:
    config = work / "haproxy.cfg"
    config.write_text(f"""
global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend front
    bind {HOST}:{port}
    default_backend back
backend back
    server s1 {HOST}:{backend}
""")
    return config


def serve_userspace(listen: int, backend: int) -> None:
    """The userspace proxy alone: one virtual service, one real, uvloop (as the agent)."""
    import uvloop

    from lb.table import PutReal, PutService, Real, VirtualKey
    from lb.userspace import UserspaceBackend

    async def run() -> None:
        proxy = UserspaceBackend()
        key = VirtualKey("tcp", HOST, listen)
        await proxy.start({})
        await proxy.apply([PutService(key), PutReal(key, Real(HOST, backend), 1)])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await proxy.close()

    uvloop.run(run())


@dataclass
class Row:
    path: str
    pid: int | None = None  # the proxy's, for its CPU time
    requests: float = 0.0  # keep-alive requests answered, over all rounds
    request_seconds: float = 0.0
    connections: float = 0.0  # connection-per-request requests, over all rounds
    connection_seconds: float = 0.0
    transferred: float = 0.0  # bytes of the 1 GiB transfers
    transfer_seconds: float = 0.0
    cpu_requests: float = 0.0  # the proxy's CPU seconds during the keep-alive runs
    cpu_connections: float = 0.0
    rounds: list[float] = field(default_factory=list)  # req/s per round

    @property
    def rps(self) -> float:
        return self.requests / self.request_seconds if self.request_seconds else 0.0

    @property
    def cps(self) -> float:
        return self.connections / self.connection_seconds if self.connection_seconds else 0.0

    @property
    def mbps(self) -> float:
        return self.transferred / self.transfer_seconds / 1e6 if self.transfer_seconds else 0.0

    def cpu_us(self, kind: str) -> str:
        if self.pid is None:
            return "-"
        cpu, count = (
            (self.cpu_requests, self.requests)
            if kind == "req"
            else (self.cpu_connections, self.connections)
        )
        return f"{cpu / count * 1e6:.1f}" if count else "-"


def wrk(url: str, seconds: int, cpu: int, close: bool) -> float:
    """Requests per second (wrk, one thread, 50 connections)."""
    argv = ["taskset", "-c", str(cpu), "wrk", "-t1", "-c50", f"-d{seconds}s", url]
    if close:
        argv[5:5] = ["-H", "Connection: close"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"wrk failed: {done.stdout}{done.stderr}")
    errors = re.search(r"Socket errors: (.*)", done.stdout)
    if errors:
        print(f"  wrk {url} {'close' if close else 'keep-alive'}: socket errors {errors[1]}")
    return float(found[1])


def transfer(url: str, cpu: int) -> tuple[float, float]:
    """One 1 GiB download with curl: (bytes, seconds)."""
    done = subprocess.run(
        [
            "taskset",
            "-c",
            str(cpu),
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "120",
            "-w",
            "%{size_download} %{time_total}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=130,
        check=False,
    )
    size, seconds = done.stdout.split()
    if int(float(size)) != BIG:
        raise RuntimeError(f"curl fetched {size} bytes of {BIG}: {done.stderr}")
    return float(size), float(seconds)


def measure(row: Row, port: int, seconds: int, cpu: int, *, bulk: bool) -> None:
    """One round on one path: keep-alive req/s, connections/s, and (bulk) a 1 GiB transfer."""
    base = f"http://{HOST}:{port}"
    before = cpu_seconds(row.pid) if row.pid else 0.0
    rps = wrk(f"{base}/small", seconds, cpu, close=False)
    row.rounds.append(rps)
    row.requests += rps * seconds
    row.request_seconds += seconds
    if row.pid:
        row.cpu_requests += cpu_seconds(row.pid) - before
        before = cpu_seconds(row.pid)
    cps = wrk(f"{base}/small", seconds, cpu, close=True)
    row.connections += cps * seconds
    row.connection_seconds += seconds
    if row.pid:
        row.cpu_connections += cpu_seconds(row.pid) - before
    if bulk:
        size, took = transfer(f"{base}/big", cpu)
        row.transferred += size
        row.transfer_seconds += took


def report(rows: list[Row]) -> None:
    peer = next((r for r in rows if r.path == "haproxy"), None)
    print(
        f"\n{'path':<14} {'req/s':>8} {'(range)':>15} {'conn/s':>8} {'MB/s':>7} "
        f"{'CPU us/req':>10} {'us/conn':>8}   vs haproxy: req/s conn/s MB/s"
    )
    for row in rows:
        ratios = ""
        if peer is not None:
            mbps = f"{row.mbps / peer.mbps:.2f}x" if peer.mbps else "-"
            ratios = f"{row.rps / peer.rps:.2f}x  {row.cps / peer.cps:.2f}x  {mbps}"
        spread = f"{min(row.rounds):.0f}-{max(row.rounds):.0f}"
        print(
            f"{row.path:<14} {row.rps:>8.0f} {spread:>15} {row.cps:>8.0f} {row.mbps:>7.0f} "
            f"{row.cpu_us('req'):>10} {row.cpu_us('conn'):>8}   {ratios}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=4, help="wrk seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all paths")
    parser.add_argument(
        "--transfers", type=int, default=1, help="rounds that also time a 1 GiB transfer per path"
    )
    parser.add_argument("--proxy-cpu", type=int, default=1)
    parser.add_argument(
        "--base",
        type=Path,
        metavar="TREE",
        help="another checkout (e.g. `git worktree add /tmp/base <commit>`): its userspace "
        "proxy gets a row of its own, `userspace@base`, in the same run",
    )
    parser.add_argument("--client-cpu", type=int, default=0, help="CPU of nginx, wrk and curl")
    parser.add_argument(
        "--serve-userspace",
        nargs=2,
        type=int,
        metavar=("LISTEN", "BACKEND"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.serve_userspace:
        serve_userspace(*args.serve_userspace)
        return 0
    if not 1 <= args.seconds <= 60:
        parser.error("--seconds must be between 1 and 60")
    missing = [t for t in ("wrk", "curl", "nginx", "haproxy", "taskset") if not shutil.which(t)]
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="l4-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        nginx_port = free_port()
        haproxy_port, userspace_port = free_port(), free_port()
        serve = [sys.executable, str(Path(__file__).resolve()), "--serve-userspace"]
        haproxy = ["haproxy", "-db", "-f", str(haproxy_config(work, haproxy_port, nginx_port))]
        # name -> (argv, PYTHONPATH): each userspace proxy imports `lb` from its own tree
        # (not whatever the venv has installed).
        commands: dict[str, tuple[list[str], Path | None]] = {
            "haproxy": (haproxy, None),
            "userspace": ([*serve, str(userspace_port), str(nginx_port)], REPO),
        }
        ports = {"direct": nginx_port, "haproxy": haproxy_port, "userspace": userspace_port}
        if args.base is not None:
            base_port = free_port()
            commands["userspace@base"] = (
                [*serve, str(base_port), str(nginx_port)],
                args.base.resolve(),
            )
            ports["userspace@base"] = base_port
        with contextlib.ExitStack() as stack:
            nginx = stack.enter_context(
                process(
                    ["nginx", "-c", str(nginx_config(work, nginx_port))],
                    args.client_cpu,
                    work / "nginx.log",
                )
            )
            proxies = {
                name: stack.enter_context(
                    process(
                        argv,
                        args.proxy_cpu,
                        work / f"{name}.log",
                        None if tree is None else {**os.environ, "PYTHONPATH": str(tree)},
                    )
                )
                for name, (argv, tree) in commands.items()
            }
            for name, port in ports.items():
                try:
                    wait_port(port, 30)
                except RuntimeError:
                    log = work / f"{'nginx' if name == 'direct' else name}.log"
                    print(log.read_text(), file=sys.stderr)
                    raise
            assert nginx.poll() is None
            print(
                f"backend nginx on {HOST}:{nginx_port} (cpu {args.client_cpu}, with wrk and "
                f"curl); proxies on cpu {args.proxy_cpu}; {args.rounds} rounds of "
                f"{args.seconds}s per wrk run, paths alternating; load average "
                f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
            )
            rows = [Row(name, proxies[name].pid if name in proxies else None) for name in ports]
            for row in rows:  # warm-up, untimed
                wrk(f"http://{HOST}:{ports[row.path]}/small", 1, args.client_cpu, close=False)
            for index in range(args.rounds):
                for row in rows:
                    measure(
                        row,
                        ports[row.path],
                        args.seconds,
                        args.client_cpu,
                        bulk=index < args.transfers,
                    )
            if importlib.util.find_spec("lb.nft") is None:
                print("nftables: skipped (lb.nft is not part of this build)")
        report(rows)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""API at scale: task registration and task listing of a real agent holding N tasks.

A real `mesh agent` (pinned with `taskset` to one CPU, the client to another) gets
one network, `--services` vip services on it (each with a TCP port, so the DNS and
L4 views have work to do) and `--tasks` tasks registered one after another through
`POST /v1/services/{name}/tasks` over one keep-alive connection, round-robin over
the services (the default, one service, is the hardest case: every sibling scan
of a registration is a scan of all tasks). Each registration is timed by the
client, from the request's first byte to the last byte of its 201.

Reported: registration latency (mean, p50, p99, max) over all tasks and over the
last 1,000 (where a scan per registration shows), the agent's CPU time per
registration, `GET /v1/tasks?limit=500` (first page) and the full `GET /v1/tasks`
(time and size, best and median of `--rounds`), and the agent's RSS (all its
processes) before and after. `--repo` runs the agent of another tree (the base
commit, from `git archive`), so base and after are measured in one sitting:

    .venv/bin/python benchmarks/api_scale_bench.py                     # this tree
    .venv/bin/python benchmarks/api_scale_bench.py --repo /tmp/base    # another tree
    .venv/bin/python benchmarks/api_scale_bench.py --tasks 2000 --services 10
    .venv/bin/python benchmarks/api_scale_bench.py --ttl-check 3600   # checked tasks

Every step is bounded: `--budget` seconds for the registrations (default 300;
whatever was registered by then is reported), 10 s per request. Traffic stays on
127.0.0.1; the agent runs without CAP_SYS_ADMIN (no sandboxes, no kernel objects).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import HOST, cpu_seconds, free_port, process_tree, stop, wait_for_api, without_sandboxes

REPO = Path(__file__).resolve().parents[1]
POOL = "127.64.0.0/12"
SUBNET = "127.65.0.0/20"
PAGE = 500


def start_agent(
    repo: Path, work: Path, cpu: int, python: str
) -> tuple[subprocess.Popen[bytes], int]:
    api_port = free_port()
    flags = [
        *["--node-name", "bench", "--data-dir", str(work / "data")],
        *["--api", f"{HOST}:{api_port}", "--dns", f"{HOST}:{free_port()}"],
        *["--http", f"{HOST}:{free_port()}", "--advertise", f"{HOST}:{free_port()}"],
        *["--address-pool", POOL, "--lb", "userspace", "--log-level", "warning"],
        *["--dns-upstream", f"{HOST}:{free_port()}"],
    ]
    argv = [*without_sandboxes(), "taskset", "-c", str(cpu), python, "-m", "mesh", "agent", *flags]
    log = (work / "agent.log").open("wb")
    proc = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    if not wait_for_api(proc, api_port):
        raise RuntimeError(f"the agent did not start:\n{(work / 'agent.log').read_text()[-3000:]}")
    return proc, api_port


def request(
    conn: http.client.HTTPConnection, method: str, path: str, body: Any = None
) -> tuple[int, bytes, float]:
    """(status, body, seconds) over the kept-alive connection."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    start = time.perf_counter()
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    return resp.status, raw, time.perf_counter() - start


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def latency_row(label: str, samples: list[float]) -> str:
    if not samples:
        return f"{label:<24} (none)"
    ordered = sorted(samples)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"{label:<24} {len(samples):>6} {ms(statistics.fmean(samples)):>8} {ms(p50):>8} "
        f"{ms(p99):>8} {ms(ordered[-1]):>8}"
    )


def timed_gets(
    conn: http.client.HTTPConnection, path: str, rounds: int
) -> tuple[list[float], int, int]:
    """(seconds per round, body bytes, items) of GET path."""
    times, size, items = [], 0, 0
    for _ in range(rounds):
        status, raw, took = request(conn, "GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {raw[:300]!r}")
        times.append(took)
        size = len(raw)
        body = json.loads(raw)
        items = len(body["items"] if isinstance(body, dict) else body)
    return times, size, items


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timed GETs of each list")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for registrations")
    parser.add_argument("--repo", type=Path, default=REPO, help="the tree whose agent runs")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="where the agent's data dir goes (default: the system's temp dir); "
        "/dev/shm takes the disk's fsync out of each registration's time",
    )
    parser.add_argument(
        "--ttl-check",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give every service a ttl health check of SECONDS (no probes run): each task "
        "registered here then has a health tracker on this node, as a checked service's do",
    )
    parser.add_argument("--server-cpu", type=int, default=None)
    parser.add_argument("--client-cpu", type=int, default=None)
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu = cpus[0] if args.server_cpu is None else args.server_cpu
    client_cpu = cpus[-1] if args.client_cpu is None else args.client_cpu
    os.sched_setaffinity(0, {client_cpu})
    if not 1 <= args.tasks <= 50_000 or not 1 <= args.services <= 100:
        parser.error("--tasks is 1..50000, --services 1..100")

    work = Path(tempfile.mkdtemp(prefix="api-scale-", dir=args.data_root))
    proc = None
    try:
        proc, port = start_agent(args.repo.resolve(), work, server_cpu, args.python)
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        status, raw, _ = request(conn, "POST", "/v1/networks", {"name": "bench", "subnet": SUBNET})
        if status != 201:
            raise RuntimeError(f"network: {status} {raw!r}")
        services = [f"svc{i}" for i in range(args.services)]
        for name in services:
            spec: dict[str, Any] = {
                "name": name,
                "networks": ["bench"],
                "ports": [{"protocol": "tcp", "target_port": 8080}],
            }
            if args.ttl_check is not None:
                spec["health_check"] = {"type": "ttl", "ttl": args.ttl_check}
            status, raw, _ = request(conn, "POST", "/v1/services", spec)
            if status != 201:
                raise RuntimeError(f"service {name}: {status} {raw!r}")
        pids = process_tree(proc.pid)
        rss_before = rss_kib(pids)

        latencies: list[float] = []
        cpu_start = cpu_seconds(process_tree(proc.pid))
        deadline = time.monotonic() + args.budget
        for i in range(args.tasks):
            if time.monotonic() > deadline:
                print(f"budget of {args.budget:.0f} s spent after {i} registrations")
                break
            # a distinct address per task: 10.x.y.z, any address a node can reach
            address = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
            body = {"address": address}
            status, raw, took = request(
                conn, "POST", f"/v1/services/{services[i % len(services)]}/tasks", body
            )
            if status != 201:
                raise RuntimeError(f"task {i}: {status} {raw!r}")
            latencies.append(took)
        cpu_used = cpu_seconds(process_tree(proc.pid)) - cpu_start
        pids = process_tree(proc.pid)
        rss_after = rss_kib(pids)

        page_times, page_size, page_items = timed_gets(conn, f"/v1/tasks?limit={PAGE}", args.rounds)
        full_times, full_size, full_items = timed_gets(conn, "/v1/tasks", args.rounds)
        conn.close()

        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
        print(
            f"API at scale: {len(latencies)} tasks over {args.services} service(s), agent on CPU "
            f"{server_cpu}, client on CPU {client_cpu}; tree {args.repo}; data in {work}; "
            f"ttl check {args.ttl_check}; load {load}"
        )
        print(f"{'registration (ms)':<24} {'n':>6} {'mean':>8} {'p50':>8} {'p99':>8} {'max':>8}")
        print("-" * 67)
        print(latency_row("all", latencies))
        print(latency_row("first 1,000", latencies[:1000]))
        print(latency_row("last 1,000", latencies[-1000:]))
        n = max(1, len(latencies))
        print(f"agent CPU per registration: {cpu_used / n * 1e6:.0f} us")
        print()
        print(f"{'list':<28} {'items':>6} {'bytes':>10} {'best ms':>8} {'median ms':>10}")
        print("-" * 66)
        for label, times, size, items in (
            (f"GET /v1/tasks?limit={PAGE}", page_times, page_size, page_items),
            ("GET /v1/tasks", full_times, full_size, full_items),
        ):
            print(
                f"{label:<28} {items:>6} {size:>10} {ms(min(times)):>8} "
                f"{ms(statistics.median(times)):>10}"
            )
        print()
        print(
            f"agent RSS ({len(pids)} processes): {rss_before / 1024:.1f} MiB with the services, "
            f"{rss_after / 1024:.1f} MiB with {len(latencies)} tasks"
        )
        return 0
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

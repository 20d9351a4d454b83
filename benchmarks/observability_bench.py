"""Observability overhead: HRM and DNS throughput with metrics and access logs on vs off.

One run, side by side, the same load on agents that differ only in what they observe:

- `on`: the agent as it is, the access log at its default sample rate
  (`--access-log-sample` 0.01, JSON lines, to a file) and `GET /metrics` scraped once a
  second during every timed segment (a thread here, as Prometheus would);
- `off`: the access log off (`--access-log-sample 0`) and nothing scraped; the counters
  themselves are kept (they are plain integers on the hot paths, not a switch);
- `base` (with `--base-ref REF`, e.g. `main`): the agent of another commit, run from a
  `git worktree` of it, with the flags of `off` it knows: its throughput includes the
  cost of the counters this branch added.

HRM: `wrk` (one thread, `--connections` keep-alive connections) through the agent's
router (`--http-workers 0` unless `--http-workers N`) to `--routes` services of two tasks
each, an nginx answering a fixed body behind them (http_bench.py's load and backends).
DNS: `dnsperf` (4 sockets) asking `--names` A records of the agent's own services
(dns_bench.py's approach). Every agent is pinned to `--server-cpu`, wrk, dnsperf and the
backends to `--client-cpu`. After a warm-up, each round times every agent (alternating
order) for `--seconds` of HRM load and then `--seconds` of DNS load; the figures of each
round and the median over rounds of each variant's ratio to `off` are printed.

    .venv/bin/python benchmarks/observability_bench.py --rounds 5 --seconds 4
    .venv/bin/python benchmarks/observability_bench.py --rounds 5 --seconds 4 --base-ref main

Needs wrk, nginx, dnsperf, dig and taskset, two CPUs. Everything listens on 127.0.0.1;
every process started is stopped by its pid, the worktree removed on the way out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import dns_bench
import http_bench
from common import (
    HOST,
    START_TIMEOUT,
    api,
    cpu_seconds,
    free_port,
    process_tree,
    stop,
    wait_for_api,
    without_sandboxes,
)

REPO = Path(__file__).resolve().parents[1]
POOL = "127.64.0.0/12"
SUBNET = "127.65.0.0/20"
SCRAPE_EVERY = 1.0  # seconds, as a Prometheus scrape_interval of 1s would


@dataclass
class Variant:
    label: str  # on, off, base
    source: Path  # the checkout whose `mesh` runs
    access_log: bool
    scrape: bool
    proc: subprocess.Popen[bytes] | None = None
    api_port: int = 0
    http_port: int = 0
    dns_port: int = 0
    log: Path | None = None
    rps: list[float] = field(default_factory=list)
    qps: list[float] = field(default_factory=list)
    http_cpu_us: list[float] = field(default_factory=list)  # agent CPU per request
    dns_cpu_us: list[float] = field(default_factory=list)
    failed: int = 0
    scrapes: int = 0
    scrape_seconds: float = 0.0
    scrape_failures: int = 0
    scrape_cpu: float = 0.0  # the agent's CPU seconds per scrape, measured idle


class Scraper:
    """GET /metrics once a second in a thread, while a segment runs."""

    def __init__(self, variant: Variant) -> None:
        self.variant = variant
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        url = f"http://{HOST}:{self.variant.api_port}/metrics"
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    response.read()
                self.variant.scrapes += 1
                self.variant.scrape_seconds += time.monotonic() - started
            except OSError:
                self.variant.scrape_failures += 1
            self.stopping.wait(max(0.0, SCRAPE_EVERY - (time.monotonic() - started)))

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join(10)


def agent_help(source: Path, python: str) -> str:
    return subprocess.run(
        [python, "-m", "mesh", "agent", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=source,
        env={**os.environ, "PYTHONPATH": str(source)},
        check=False,
    ).stdout


@contextlib.contextmanager
def agent(variant: Variant, work: Path, args: argparse.Namespace) -> Iterator[Variant]:
    """A real agent with the router and DNS on; stopped by its pid on the way out."""
    variant.api_port, variant.http_port, variant.dns_port = free_port(), free_port(), free_port()
    known = agent_help(variant.source, args.python)
    flags = [
        "--node-name",
        f"bench-{variant.label}",
        "--data-dir",
        str(work / f"data-{variant.label}"),
        "--api",
        f"{HOST}:{variant.api_port}",
        "--dns",
        f"{HOST}:{variant.dns_port}",
        # never used (every query is a mesh name); a closed port, not the host's resolvers
        "--dns-upstream",
        f"{HOST}:{free_port()}",
        "--http",
        f"{HOST}:{variant.http_port}",
        "--advertise",
        f"{HOST}:{free_port()}",
        "--address-pool",
        POOL,
        "--lb",
        "userspace",
        "--log-level",
        "warning",
        "--http-workers",
        str(args.http_workers),
    ]
    if "--access-log-sample" in known:
        if variant.access_log:
            # the default sample rate (or --on-sample) and format; to a file (not stdout)
            flags += ["--access-log", str(work / f"access-{variant.label}.log")]
            if args.on_sample is not None:
                flags += ["--access-log-sample", f"{args.on_sample:g}"]
        else:
            flags += ["--access-log-sample", "0"]
    elif variant.access_log:
        raise RuntimeError(f"{variant.source}: `mesh agent` has no --access-log-sample")
    variant.log = work / f"agent-{variant.label}.log"
    argv = [
        *without_sandboxes(),
        *http_bench.taskset([args.server_cpu]),
        *[args.python, "-m", "mesh", "agent", *flags],
    ]
    with variant.log.open("wb") as sink:
        variant.proc = subprocess.Popen(
            argv,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=variant.source,
            env={**os.environ, "PYTHONPATH": str(variant.source)},
        )
    try:
        if not wait_for_api(variant.proc, variant.api_port):
            raise RuntimeError(f"{variant.label}: the agent exited:\n{tail(variant.log)}")
        yield variant
    finally:
        stop(variant.proc)


def tail(path: Path | None) -> str:
    return path.read_text(errors="replace")[-3000:] if path else ""


def register(variant: Variant, ports: dict[str, list[int]], names: int) -> dict[str, str]:
    """The HRM's services and tasks (Host svcI.bench) and `names` DNS names (dnsI, VIPs)."""
    for name, task_ports in ports.items():
        labels = {"mesh.http.hosts": f"{name}.bench", "mesh.http.port": "80"}
        status, body = api(
            variant.api_port, "POST", "/v1/services", {"name": name, "labels": labels}
        )
        if status != 201:
            raise RuntimeError(f"service {name}: {status} {body}")
        for t, port in enumerate(task_ports):
            task = {"address": HOST, "ports": {"80": port}, "name": f"{name}-t{t}"}
            status, body = api(variant.api_port, "POST", f"/v1/services/{name}/tasks", task)
            if status != 201:
                raise RuntimeError(f"task of {name}: {status} {body}")
    network = {"name": "bench", "subnet": SUBNET}
    status, body = api(variant.api_port, "POST", "/v1/networks", network)
    if status != 201:
        raise RuntimeError(f"network: {status} {body}")

    def create(i: int) -> tuple[str, str]:
        service = {"name": f"dns{i}", "networks": ["bench"]}
        status, body = api(variant.api_port, "POST", "/v1/services", service)
        if status != 201:
            raise RuntimeError(f"dns{i}: {status} {body}")
        return f"dns{i}", body["vips"][0]["address"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        records = dict(pool.map(create, range(names)))
    assert variant.proc is not None
    deadline = time.monotonic() + START_TIMEOUT
    while not http_bench.all_routed(variant.http_port, ports):
        if variant.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{variant.label}: the router does not route:\n{tail(variant.log)}")
        time.sleep(0.1)
    http_bench.check_routing(variant.http_port, len(ports), variant.label)
    while True:
        try:
            dns_bench.check_answers(variant.dns_port, records)
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return records


def scrape_cost(variant: Variant, scrapes: int = 50) -> None:
    """The agent's CPU time per scrape of /metrics, with no other load: a figure the
    machine's other tenants disturb less than a throughput ratio."""
    assert variant.proc is not None
    pids = process_tree(variant.proc.pid)
    url = f"http://{HOST}:{variant.api_port}/metrics"
    time.sleep(0.5)
    idle_before = cpu_seconds(pids)
    time.sleep(1.0)
    idle = cpu_seconds(pids) - idle_before  # what the agent spends anyway in a second
    before, started = cpu_seconds(pids), time.monotonic()
    for _ in range(scrapes):
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()
    used = cpu_seconds(pids) - before - idle * (time.monotonic() - started)
    variant.scrape_cpu = max(0.0, used / scrapes)


def http_segment(variant: Variant, args: argparse.Namespace, script: Path, work: Path) -> None:
    assert variant.proc is not None
    pids = process_tree(variant.proc.pid)
    before = cpu_seconds(pids)
    figures, _ = http_bench.wrk(
        variant.http_port, script, args.client_cpu, args.seconds, args.connections, work / "wrk"
    )
    used = cpu_seconds(pids) - before
    variant.rps.append(figures["requests"] / (figures["duration_us"] / 1e6))
    variant.http_cpu_us.append(1e6 * used / max(1, figures["requests"]))
    variant.failed += sum(figures[k] for k in ("connect", "read", "write", "status", "timeout"))


def dns_segment(variant: Variant, args: argparse.Namespace, queries: Path, work: Path) -> None:
    assert variant.proc is not None
    server = dns_bench.Server(variant.label, variant.proc.pid, variant.dns_port)
    dns_bench.segment(server, queries, args.client_cpu, args.seconds, work / "dnsperf.txt")
    done = server.segments[-1]
    variant.qps.append(done.completed / done.run_seconds)
    variant.dns_cpu_us.append(1e6 * done.server_cpu / max(1, done.completed))
    variant.failed += done.lost + sum(n for code, n in done.rcodes.items() if code != "NOERROR")


def measure(
    variants: list[Variant], args: argparse.Namespace, script: Path, queries: Path, work: Path
) -> None:
    for variant in variants:
        if variant.scrape:
            scrape_cost(variant)
    for variant in variants:  # warm-up, untimed
        http_bench.wrk(
            variant.http_port, script, args.client_cpu, 1, args.connections, work / "warm"
        )
        dns_bench.dnsperf(
            dns_bench.Server(variant.label, 0, variant.dns_port),
            queries,
            args.client_cpu,
            work / "warm",
            seconds=1,
        )
    for round_ in range(args.rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            with Scraper(variant) if variant.scrape else contextlib.nullcontext():
                http_segment(variant, args, script, work)
                dns_segment(variant, args, queries, work)
        print(
            f"round {round_ + 1}: "
            + "  ".join(f"{v.label} {v.rps[-1]:7.0f} req/s {v.qps[-1]:7.0f} q/s" for v in variants),
            flush=True,
        )


@contextlib.contextmanager
def base_checkout(ref: str | None, work: Path) -> Iterator[Path | None]:
    """A `git worktree` of `ref` (removed on the way out), or None."""
    if ref is None:
        yield None
        return
    path = work / "base"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), ref],
        check=True,
        timeout=60,
    )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
            check=False,
            timeout=60,
        )


def report(variants: list[Variant], args: argparse.Namespace, work: Path) -> None:
    off = next(v for v in variants if v.label == "off")
    print(
        f"\nobservability overhead: {args.rounds} alternating rounds of {args.seconds} s HRM "
        f"(wrk -t1 -c{args.connections}, {args.routes} routes) and {args.seconds} s DNS "
        f"(dnsperf, {args.names} names) per agent; agents on CPU {args.server_cpu} "
        f"(--http-workers {args.http_workers}), load and backends on CPU {args.client_cpu}; "
        f"on: access log sample {'default' if args.on_sample is None else f'{args.on_sample:g}'}"
    )
    head = (
        f"{'variant':<6} {'req/s':>8} {'CPU us/req':>10} {'q/s':>8} {'CPU us/q':>8} "
        f"{'req/s x':>7} {'range':>11} {'q/s x':>6} {'range':>11} {'CPU/req x':>9} "
        f"{'CPU/q x':>7}"
    )
    print(head)
    print("-" * len(head))
    for v in variants:
        http_x = [a / b for a, b in zip(v.rps, off.rps, strict=True)]
        dns_x = [a / b for a, b in zip(v.qps, off.qps, strict=True)]
        http_cpu_x = [a / b for a, b in zip(v.http_cpu_us, off.http_cpu_us, strict=True)]
        dns_cpu_x = [a / b for a, b in zip(v.dns_cpu_us, off.dns_cpu_us, strict=True)]
        print(
            f"{v.label:<6} {statistics.median(v.rps):8.0f} "
            f"{statistics.median(v.http_cpu_us):10.1f} {statistics.median(v.qps):8.0f} "
            f"{statistics.median(v.dns_cpu_us):8.1f} {statistics.median(http_x):7.3f} "
            f"{min(http_x):5.2f}-{max(http_x):4.2f} {statistics.median(dns_x):6.3f} "
            f"{min(dns_x):5.2f}-{max(dns_x):4.2f} {statistics.median(http_cpu_x):9.3f} "
            f"{statistics.median(dns_cpu_x):7.3f}"
        )
    print("(medians over rounds; x = this variant's figure over off's in the same round)")
    for v in variants:
        notes = []
        if v.scrape:
            mean = 1e3 * v.scrape_seconds / max(1, v.scrapes)
            notes.append(
                f"{v.scrapes} scrapes of /metrics under load, {mean:.1f} ms each on average; "
                f"one costs the idle agent {1e3 * v.scrape_cpu:.1f} ms of CPU "
                f"({100 * v.scrape_cpu / SCRAPE_EVERY:.1f}% of a core at one scrape a second)"
            )
            if v.scrape_failures:
                notes.append(f"{v.scrape_failures} scrapes failed")
        if v.access_log:
            path = work / f"access-{v.label}.log"
            lines = sum(1 for _ in path.open()) if path.exists() else 0
            notes.append(f"{lines} access log lines")
        if v.failed:
            notes.append(f"{v.failed} failed requests or queries")
        if v.label == "base":
            notes.append(f"ref {args.base_ref}")
        if notes:
            print(f"- {v.label}: {'; '.join(notes)}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    cpus = sorted(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=4, help="per load, agent and round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--routes", type=int, default=4, help="HRM hosts routed (default 4)")
    parser.add_argument("--names", type=int, default=1000, help="DNS names (default 1000)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--http-workers", type=int, default=0, help="the agents' --http-workers")
    parser.add_argument("--base-ref", help="also run the agent of this git ref (e.g. main)")
    parser.add_argument(
        "--on-sample",
        type=float,
        help="the access log's sample rate in `on` (default: the agent's, 0.01); 1 logs "
        "every request, an upper bound of the log's cost",
    )
    parser.add_argument("--server-cpu", type=int, default=cpus[0])
    parser.add_argument("--client-cpu", type=int, default=cpus[-1])
    parser.add_argument("--python", default=sys.executable, help="interpreter with the deps")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 30 or not 1 <= args.rounds <= 20:
        parser.error("--seconds must be in [1, 30] and --rounds in [1, 20]")
    if not 1 <= args.routes <= 64 or not 1 <= args.names <= 4000:
        parser.error("--routes must be in [1, 64] and --names in [1, 4000]")
    if not 1 <= args.connections <= 1000 or not 0 <= args.http_workers <= 16:
        parser.error("--connections must be in [1, 1000] and --http-workers in [0, 16]")
    if len(cpus) < 2 or args.server_cpu == args.client_cpu:
        parser.error("the agents and the load need two different CPUs")
    if args.on_sample is not None and not 0 < args.on_sample <= 1:
        parser.error("--on-sample must be in (0, 1]")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    missing = [t for t in ("wrk", "nginx", "dnsperf", "dig", "taskset") if not shutil.which(t)]
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mpobs-bench-") as tmp:
        work = Path(tmp)
        script = work / "routes.lua"
        script.write_text(
            http_bench.WRK_SCRIPT
            % {"hosts": ", ".join(f'"svc{i}.bench"' for i in range(args.routes))}
        )
        queries = work / "queries"
        queries.write_text("".join(f"dns{i} A\n" for i in range(args.names)))
        with (
            base_checkout(args.base_ref, work) as base,
            http_bench.backends(work, args.client_cpu, args.routes) as (_, ports),
            contextlib.ExitStack() as stack,
        ):
            variants = [
                Variant("on", REPO, access_log=True, scrape=True),
                Variant("off", REPO, access_log=False, scrape=False),
            ]
            if base is not None:
                variants.append(Variant("base", base, access_log=False, scrape=False))
            for variant in variants:
                stack.enter_context(agent(variant, work, args))
                register(variant, ports, args.names)
            measure(variants, args, script, queries, work)
            report(variants, args, work)
    print(f"- total {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

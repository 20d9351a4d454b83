"""DNS benchmark: the meshplane agent against dnsmasq, side by side in one run.

Both servers answer the same N names (`svc0` ... `svc<N-1>`, A records) with
the same addresses, pinned to the same CPU with `taskset`, while `dnsperf`
runs pinned to another CPU for a fixed time (`-l`):

- dnsmasq serves the names as host records (`--addn-hosts`), with
  `--no-resolv --no-hosts` and its default cache size (150): host records
  are not cache entries and are answered whatever the cache size;
- meshplane is a real `mesh agent` process with N registered vip-mode
  services on one network; a query from loopback gets the service's VIP.

Every query is a mesh name or a host record, so nothing is forwarded; all
traffic stays on 127.0.0.1. One untimed pass over the names warms each server
(the agent's wire cache, dnsmasq's hash table); then the servers are timed in
alternating rounds (`--rounds`, splitting `--seconds` per server), so that
drift of a shared machine falls on both alike.

Reported per server: queries per second (overall, and the range over rounds),
server CPU time per query (utime + stime of the server's processes from /proc,
before and after each round), CPU use of server and dnsperf (a dnsperf near
100% means the client, not the server, set the pace), average, p99 and max
latency (p99 from dnsperf's per-query `-v` lines: dnsperf 2.10 has no latency
histogram), lost queries, and the ratios to dnsmasq.

A third row, "all cores", runs the agent with `--dns-workers` (SO_REUSEPORT
worker processes) on every CPU but dnsperf's, when `mesh agent --help` shows
that flag and the machine has a CPU to spare for it (or `--workers N`).

    sudo .venv/bin/python benchmarks/dns_bench.py [--seconds 10] [--names 1000]

Runtime: 2-3 x --seconds plus ~10 s of set-up and parsing; every step is bounded.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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
POOL = "127.64.0.0/12"  # VIPs on loopback: nothing the agent allocates leaves the host
SUBNET = "127.65.0.0/20"  # room for 4,000 VIPs
REGISTER_THREADS = 16
#: dnsperf sockets: several source ports, so that SO_REUSEPORT spreads queries
#: over the agent's DNS workers (it hashes by the 4-tuple); the same for every run
CLIENTS = 4


# -- measurement ----------------------------------------------------------------------------


@dataclass
class Segment:
    """One timed dnsperf run against one server."""

    sent: int
    completed: int
    lost: int
    run_seconds: float
    server_cpu: float  # seconds
    client_cpu: float  # seconds
    latencies: list[float]  # seconds, one per answered query (dnsperf -v)
    max_latency: float
    rcodes: Counter[str]


@dataclass
class Server:
    label: str
    pid: int
    port: int
    note: str = ""
    segments: list[Segment] = field(default_factory=list)

    def result(self) -> Result:
        done = self.segments
        latencies = sorted(x for s in done for x in s.latencies)
        completed = sum(s.completed for s in done)
        run = sum(s.run_seconds for s in done)
        return Result(
            label=self.label,
            qps=completed / run,
            qps_rounds=[s.completed / s.run_seconds for s in done],
            sent=sum(s.sent for s in done),
            completed=completed,
            lost=sum(s.lost for s in done),
            run_seconds=run,
            cpu_seconds=sum(s.server_cpu for s in done),
            client_cpu_seconds=sum(s.client_cpu for s in done),
            avg_ms=1e3 * sum(latencies) / len(latencies) if latencies else float("nan"),
            p99_ms=1e3 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
            max_ms=1e3 * max(s.max_latency for s in done),
            rcodes=sum((s.rcodes for s in done), Counter()),
            note=self.note,
        )


@dataclass
class Result:
    label: str
    qps: float
    qps_rounds: list[float]
    sent: int
    completed: int
    lost: int
    run_seconds: float
    cpu_seconds: float
    client_cpu_seconds: float
    avg_ms: float
    p99_ms: float | None
    max_ms: float
    rcodes: Counter[str]
    note: str = ""

    @property
    def cpu_us_per_query(self) -> float:
        return 1e6 * self.cpu_seconds / max(1, self.completed)


def dnsperf(server: Server, queries: Path, cpu: int, out: Path, *, seconds: float | None) -> float:
    """Run dnsperf (`seconds`, or one pass over the names); the CPU seconds it used."""
    argv = [
        "taskset",
        "-c",
        str(cpu),
        "dnsperf",
        "-s",
        HOST,
        "-p",
        str(server.port),
        "-d",
        str(queries),
        "-t",
        "2",
        "-c",
        str(CLIENTS),
    ]
    argv += ["-l", f"{seconds:g}", "-v"] if seconds is not None else ["-n", "1"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with out.open("w") as sink:
        subprocess.run(
            argv, stdout=sink, stderr=subprocess.STDOUT, timeout=(seconds or 30) + 30, check=True
        )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def segment(server: Server, queries: Path, cpu: int, seconds: float, out: Path) -> None:
    """One timed run against `server`, added to its segments."""
    pids = process_tree(server.pid)
    before = cpu_seconds(pids)
    client = dnsperf(server, queries, cpu, out, seconds=seconds)
    used = cpu_seconds(pids) - before
    latencies: list[float] = []
    summary: list[str] = []
    with out.open() as lines:
        for line in lines:
            if line.startswith("> "):  # > NOERROR svc12 A 0.000245
                latencies.append(float(line.rsplit(None, 1)[1]))
            elif not line.startswith("["):
                summary.append(line)
    text = "".join(summary)
    latency = re.search(r"Average Latency \(s\):\s+[0-9.]+ \(min [0-9.]+, max ([0-9.]+)\)", text)
    codes = re.search(r"Response codes:\s+(.*)", text)
    server.segments.append(
        Segment(
            sent=int(summary_value(text, "Queries sent")),
            completed=int(summary_value(text, "Queries completed")),
            lost=int(summary_value(text, "Queries lost")),
            run_seconds=float(summary_value(text, "Run time (s)")),
            server_cpu=used,
            client_cpu=client,
            latencies=latencies,
            max_latency=float(latency.group(1)) if latency else float("nan"),
            rcodes=Counter(
                {
                    code: int(n)
                    for code, n in re.findall(r"(\w+) (\d+) \(", codes.group(1) if codes else "")
                }
            ),
        )
    )


def summary_value(text: str, label: str) -> str:
    found = re.search(rf"{re.escape(label)}:\s+(\S+)", text)
    if found is None:
        raise RuntimeError(f"dnsperf printed no {label!r}:\n{text[-2000:]}")
    return found.group(1)


def measure(servers: list[Server], queries: Path, args: argparse.Namespace, work: Path) -> None:
    """Warm every server, then time them in alternating rounds.

    Alternation spreads any drift of the machine (other tenants, frequency
    scaling) over all servers alike, instead of letting it land on one.
    """
    for server in servers:
        dnsperf(server, queries, args.client_cpu, work / "warmup.txt", seconds=None)
    for round_ in range(args.rounds):
        order = servers if round_ % 2 == 0 else servers[::-1]
        for server in order:
            segment(
                server, queries, args.client_cpu, args.seconds / args.rounds, work / "dnsperf.txt"
            )


def check_answers(port: int, expected: dict[str, str]) -> None:
    """A few names answered right (so both servers are measured doing the same work)."""
    for name in list(expected)[:: max(1, len(expected) // 5)]:
        done = subprocess.run(
            ["dig", f"@{HOST}", "-p", str(port), name, "A", "+short", "+tries=1", "+timeout=2"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        got = done.stdout.split()
        if got != [expected[name]]:
            raise RuntimeError(f"{name}: expected {expected[name]}, got {got or done.stderr}")


# -- the servers --------------------------------------------------------------------------


def agent_help(python: str) -> str:
    return subprocess.run(
        [python, "-m", "mesh", "agent", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    ).stdout


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    api_port: int
    dns_port: int


@contextmanager
def mesh_agent(
    work: Path, cpus: Sequence[int], python: str, workers: int | None, repo: Path = REPO
) -> Iterator[Agent]:
    api_port, dns_port = free_port(), free_port()
    flags = [
        "--node-name",
        "bench",
        "--data-dir",
        str(work / f"data-{api_port}"),
        "--api",
        f"{HOST}:{api_port}",
        "--dns",
        f"{HOST}:{dns_port}",
        "--http",
        f"{HOST}:{free_port()}",
        "--advertise",
        f"{HOST}:{free_port()}",
        "--address-pool",
        POOL,
        "--lb",
        "userspace",
        "--log-level",
        "warning",
        # never used (every query is a mesh name); a closed port, not the host's resolvers
        "--dns-upstream",
        f"{HOST}:{free_port()}",
    ]
    if workers:
        flags += ["--dns-workers", str(workers)]
    log_path = work / f"agent-{api_port}.log"
    argv = [
        *without_sandboxes(),
        *["taskset", "-c", ",".join(map(str, cpus))],
        *[python, "-m", "mesh", "agent", *flags],
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )
    try:
        if not (wait_for_api(proc, api_port) and answers(dns_port, "tasks.probe")):
            raise RuntimeError(f"the agent's DNS does not answer:\n{log_path.read_text()[-3000:]}")
        yield Agent(proc, api_port, dns_port)
    finally:
        stop(proc)


def register(agent: Agent, names: int) -> dict[str, str]:
    """N vip services on one network; their names and VIPs."""
    status, body = api(agent.api_port, "POST", "/v1/networks", {"name": "bench", "subnet": SUBNET})
    if status != 201:
        raise RuntimeError(f"network: {status} {body}")

    def create(i: int) -> tuple[str, str]:
        status, body = api(
            agent.api_port, "POST", "/v1/services", {"name": f"svc{i}", "networks": ["bench"]}
        )
        if status != 201:
            raise RuntimeError(f"svc{i}: {status} {body}")
        return f"svc{i}", body["vips"][0]["address"]

    with concurrent.futures.ThreadPoolExecutor(REGISTER_THREADS) as pool:
        return dict(pool.map(create, range(names)))


@contextmanager
def dnsmasq(work: Path, cpu: int, records: dict[str, str]) -> Iterator[tuple[int, int]]:
    hosts = work / "hosts"
    hosts.write_text("".join(f"{address} {name}\n" for name, address in records.items()))
    hosts.chmod(0o644)  # dnsmasq reads it as the user it drops to
    port = free_port()
    proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(cpu),
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-hosts",
            "--no-resolv",
            f"--addn-hosts={hosts}",
            f"--listen-address={HOST}",
            "--bind-interfaces",
            f"--port={port}",
            "--pid-file=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"dnsmasq did not start: {err}")
            time.sleep(0.05)
        yield proc.pid, port
    finally:
        stop(proc)
        if proc.stderr:
            proc.stderr.close()


def answers(port: int, name: str = "svc0") -> bool:
    """Whether a server answers (any rcode) a UDP query for `name`."""
    done = subprocess.run(
        ["dig", f"@{HOST}", "-p", str(port), name, "+tries=1", "+timeout=1"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return "status:" in done.stdout and (name != "svc0" or "ANSWER: 1" in done.stdout)


# -- the run ------------------------------------------------------------------------------


def table(results: list[Result], baseline: Result) -> str:
    head = (
        f"{'server':<24} {'qps':>7} {'qps range':>13} {'lost':>6} {'CPU us/q':>8} "
        f"{'srv CPU':>7} {'dnsperf':>7} {'avg ms':>6} {'p99 ms':>6} {'max ms':>6} "
        f"{'qps x':>5} {'CPU/q x':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        p99 = f"{r.p99_ms:6.2f}" if r.p99_ms is not None else f"{'n/a':>6}"
        spread = f"{min(r.qps_rounds) / 1e3:.0f}k-{max(r.qps_rounds) / 1e3:.0f}k"
        lines.append(
            f"{r.label:<24} {r.qps:7.0f} {spread:>13} {100 * r.lost / max(1, r.sent):5.2f}% "
            f"{r.cpu_us_per_query:8.2f} {100 * r.cpu_seconds / r.run_seconds:6.0f}% "
            f"{100 * r.client_cpu_seconds / r.run_seconds:6.0f}% {r.avg_ms:6.3f} {p99} "
            f"{r.max_ms:6.2f} {r.qps / baseline.qps:5.2f} "
            f"{r.cpu_us_per_query / baseline.cpu_us_per_query:7.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    cpus = sorted(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="timed dnsperf seconds per server (default 10)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="alternating rounds the seconds are split into (default 5)",
    )
    parser.add_argument("--names", type=int, default=1000, help="names served (default 1000)")
    parser.add_argument(
        "--server-cpu",
        type=int,
        default=cpus[0],
        help=f"CPU the one-core servers are pinned to (default {cpus[0]})",
    )
    parser.add_argument(
        "--client-cpu",
        type=int,
        default=cpus[-1],
        help=f"CPU dnsperf is pinned to (default {cpus[-1]})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="--dns-workers of the all-cores mode (default: one per CPU "
        "beyond the first, dnsperf's CPU left out)",
    )
    parser.add_argument(
        "--base-tree",
        type=Path,
        default=None,
        help="another meshplane checkout (e.g. the commit before a change), timed as a "
        "third one-core server in the same alternating rounds",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter with meshplane installed (default: this one)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 60 or not 1 <= args.rounds <= 20:
        parser.error("--seconds must be in (0, 60] and --rounds in [1, 20]")
    if not 1 <= args.names <= 4000:
        parser.error("--names must be in [1, 4000]")
    if len(cpus) < 2 or args.server_cpu == args.client_cpu:
        parser.error("the servers and dnsperf need two different CPUs")
    args.all_cpus = [c for c in cpus if c != args.client_cpu]
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    missing = [t for t in ("dnsperf", "dnsmasq", "taskset", "dig") if shutil.which(t) is None]
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mpdns-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # dnsmasq reads its hosts file after dropping root
        queries = work / "queries"
        queries.write_text("".join(f"svc{i} A\n" for i in range(args.names)))
        with mesh_agent(work, [args.server_cpu], args.python, None) as agent:
            t0 = time.monotonic()
            records = register(agent, args.names)
            notes.append(f"registered {len(records)} services in {time.monotonic() - t0:.1f}s")
            check_answers(agent.dns_port, records)
            with (
                dnsmasq(work, args.server_cpu, records) as (pid, port),
                contextlib.ExitStack() as others,
            ):
                check_answers(port, records)
                servers = [
                    Server("dnsmasq, 1 core", pid, port),
                    Server("meshplane, 1 core", agent.proc.pid, agent.dns_port),
                ]
                if args.base_tree is not None:
                    base = others.enter_context(
                        mesh_agent(work, [args.server_cpu], args.python, None, args.base_tree)
                    )
                    # VIPs go in arrival order: the same names, maybe other addresses
                    check_answers(base.dns_port, register(base, args.names))
                    servers.append(Server("base tree, 1 core", base.proc.pid, base.dns_port))
                measure(servers, queries, args, work)
        results = [server.result() for server in servers]
        results += all_cores(args, work, queries, notes)
    baseline = results[0]
    print(
        f"DNS, {args.names} names: A queries from dnsperf on CPU {args.client_cpu}, one-core "
        f"servers on CPU {args.server_cpu}, {args.seconds:g} s per server in "
        f"{args.rounds} alternating rounds; x = ratio to dnsmasq"
    )
    print(table(results, baseline))
    for r in results:
        if set(r.rcodes) != {"NOERROR"}:
            notes.append(f"{r.label}: response codes {dict(r.rcodes)}")
        if r.note:
            notes.append(f"{r.label}: {r.note}")
    for note in notes:
        print(f"- {note}")
    print(f"- total {time.monotonic() - started:.1f}s")
    return 0


def all_cores(
    args: argparse.Namespace, work: Path, queries: Path, notes: list[str]
) -> list[Result]:
    """The agent with --dns-workers on every CPU but dnsperf's, if it has the flag."""
    if "--dns-workers" not in agent_help(args.python):
        notes.append("all-cores mode skipped: `mesh agent` has no --dns-workers flag")
        return []
    workers = args.workers if args.workers is not None else len(args.all_cpus) - 1
    if workers < 1:
        notes.append(
            f"all-cores mode skipped: with {len(args.all_cpus) + 1} CPUs, one is "
            "left for the servers beside dnsperf's, as in the one-core runs "
            "(--workers N runs it anyway, oversubscribed)"
        )
        return []
    cpus = args.all_cpus
    with mesh_agent(work, cpus, args.python, workers) as agent:
        records = register(agent, args.names)  # VIPs go in arrival order: these, not the first
        deadline = time.monotonic() + 10
        while len(process_tree(agent.proc.pid)) < workers + 1:  # workers started
            if time.monotonic() > deadline:
                raise RuntimeError(f"{workers} DNS workers did not start")
            time.sleep(0.1)
        time.sleep(1.0)  # and loaded the feed's snapshot
        check_answers(agent.dns_port, records)
        pids = process_tree(agent.proc.pid)
        before = [cpu_seconds([pid]) for pid in pids]
        server = Server(
            f"meshplane, +{workers} worker(s)",
            agent.proc.pid,
            agent.dns_port,
            note=f"on CPUs {','.join(map(str, cpus))}",
        )
        measure([server], queries, args, work)
        used = [cpu_seconds([pid]) - spent for pid, spent in zip(pids, before, strict=True)]
        shares = ", ".join(f"{100 * u / max(1e-9, sum(used)):.0f}%" for u in used)
        server.note += f"; CPU shares (agent first, then each worker): {shares}"
    return [server.result()]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

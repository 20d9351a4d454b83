"""The agent's footprint: RSS per process with 0, 1,000 and 10,000 tasks, and idle CPU per
node of a 5-node loopback cluster beside a kinship (Python SWIM peer) cluster, in one run.

Memory: one `mesh agent` per tree (this one, and `--base DIR`, a checkout of another commit,
when given) with one DNS worker and one HTTP worker, no sandboxes, the userspace load
balancer, on loopback ports. After a settling pause the VmRSS of the control process and of
each worker is read from /proc; then tasks are registered (spread over 100 services, with
`--address`) up to 1,000 and to 10,000, and each process is read again.

Idle CPU: per tree, `--nodes` agents (default 5) joined into one cluster over loopback with
their default parts (DNS, HTTP router, userspace load balancer, encrypted gossip, LAN
timings) and, beside them in the same run, as many kinship nodes (`Config.lan`, encrypted,
seeds: the first node). Every process is pinned to the same CPU. Once every cluster has all
its members, the time on a CPU of each node's process tree (schedstat, ns) is read over
`--seconds`.

Needs: the project's venv with kinship (`make bench-deps`), `taskset`. Root is not
required; as root the agents are started without CAP_SYS_ADMIN (no overlay on the host).

    .venv/bin/python benchmarks/agent_footprint.py
    .venv/bin/python benchmarks/agent_footprint.py --base /tmp/base --seconds 60
    .venv/bin/python benchmarks/agent_footprint.py --skip-cpu --tasks 0,1000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from common import (
    HOST,
    api,
    free_port,
    process_tree,
    run_seconds,
    stop,
    wait_for_api,
    without_sandboxes,
)

REPO = Path(__file__).resolve().parent.parent
SETTLE = 5.0  # seconds after a start or a batch of registrations before RSS is read
SERVICES = 100
REGISTER_THREADS = 8
JOIN_TIMEOUT = 60.0
MAX_SECONDS = 300.0
MAX_TASKS = 20_000
START_ATTEMPTS = 3
KEYRING = "keyring.json"  # in the data dir (mesh.gossip_keys)

KINSHIP_NODE = textwrap.dedent(
    """
    import asyncio, sys, kinship
    async def main(port, seed, key):
        cfg = kinship.Config.lan(name=f"k{port}", bind=f"127.0.0.1:{port}",
                                 seeds=[f"127.0.0.1:{seed}"] if seed else [], keys=[key])
        async with kinship.Cluster(cfg) as cluster:
            while True:
                print(len(cluster.members()), flush=True)
                await asyncio.sleep(1.0)
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
    """
)


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    api_port: int
    gossip_port: int
    data_dir: Path


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    if b"dns.worker" in argv:
        return "dns worker"
    if b"lb.http.worker" in argv:
        return "http worker"
    return "control"


def distinct_ports(count: int) -> list[int]:
    """`count` free ports, no two alike (free_port may hand the same one out twice)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@contextmanager
def agent(
    tree: Path,
    work: Path,
    cpu: int,
    *,
    workers: int = 0,
    join: Agent | None = None,
    python: str = sys.executable,
) -> Iterator[Agent]:
    """A started agent; a start that loses a port to another process is tried again."""
    for attempt in range(START_ATTEMPTS):
        api_port, gossip_port, dns_port, http_port, upstream = distinct_ports(5)
        data_dir = work / f"data-{api_port}"
        flags = [
            *["--node-name", f"n{gossip_port}", "--data-dir", str(data_dir)],
            *["--api", f"{HOST}:{api_port}", "--dns", f"{HOST}:{dns_port}"],
            *["--http", f"{HOST}:{http_port}", "--advertise", f"{HOST}:{gossip_port}"],
            *["--address-pool", "127.64.0.0/12", "--lb", "userspace", "--log-level", "warning"],
            *["--dns-upstream", f"{HOST}:{upstream}", "--publish-address", HOST],
        ]
        if workers:
            flags += ["--dns-workers", str(workers), "--http-workers", str(workers)]
        if join is not None:
            # the first node's keyring: the cluster's gossip key
            keyring = str(join.data_dir / KEYRING)
            flags += ["--join", f"{HOST}:{join.gossip_port}", "--keyring", keyring]
        log_path = work / f"agent-{api_port}.log"
        argv = [*without_sandboxes(), "taskset", "-c", str(cpu), python, "-m", "mesh", "agent"]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [*argv, *flags],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tree,
                env={**os.environ, "PYTHONPATH": str(tree)},
            )
        try:
            if wait_for_api(proc, api_port):
                break
        except BaseException:
            stop(proc)
            raise
        if "in use" not in log_path.read_text() or attempt == START_ATTEMPTS - 1:
            raise RuntimeError(f"the agent exited:\n{log_path.read_text()[-3000:]}")
    try:
        yield Agent(proc, api_port, gossip_port, data_dir)
    finally:
        stop(proc)


def memory_by_role(pid: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    for each in process_tree(pid):
        name = role(each)
        try:
            figures[name] = figures.get(name, 0.0) + rss_mb(each)
        except OSError:
            continue
    return figures


def wait_workers(pid: int, count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        roles = [role(p) for p in process_tree(pid)]
        if roles.count("dns worker") >= count and roles.count("http worker") >= count:
            return
        time.sleep(0.2)
    raise RuntimeError("the workers did not start")


def register(port: int, first: int, last: int) -> None:
    """Tasks first..last-1, spread over SERVICES services, each with its own address."""

    def one(i: int) -> None:
        address = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        body = {"address": address, "name": f"t{i}"}
        status, answer = api(port, "POST", f"/v1/services/svc{i % SERVICES}/tasks", body)
        if status != 201:
            raise RuntimeError(f"task {i}: {status} {answer}")

    with concurrent.futures.ThreadPoolExecutor(REGISTER_THREADS) as pool:
        list(pool.map(one, range(first, last)))


def memory_rows(trees: dict[str, Path], work: Path, cpu: int, counts: Sequence[int]) -> list[str]:
    rows = []
    for label, tree in trees.items():
        with agent(tree, work, cpu, workers=1) as node:
            wait_workers(node.proc.pid, 1)
            for i in range(SERVICES):
                status, body = api(node.api_port, "POST", "/v1/services", {"name": f"svc{i}"})
                if status != 201:
                    raise RuntimeError(f"svc{i}: {status} {body}")
            done = 0
            for count in counts:
                started = time.monotonic()
                register(node.api_port, done, count)
                took = time.monotonic() - started
                done = count
                time.sleep(SETTLE)
                mb = memory_by_role(node.proc.pid)
                rows.append(
                    f"{label:<8} {count:>6} {mb.get('control', 0):>10.1f} "
                    f"{mb.get('dns worker', 0):>10.1f} {mb.get('http worker', 0):>11.1f}"
                    f" {took:>11.1f}"
                )
                print(rows[-1], flush=True)
    return rows


def members(port: int) -> int:
    status, body = api(port, "GET", "/v1/members")
    return sum(1 for m in body if m["status"] == "alive") if status == 200 else 0


@contextmanager
def mesh_cluster(tree: Path, work: Path, cpu: int, nodes: int) -> Iterator[list[Agent]]:
    with ExitStack() as stack:
        first = stack.enter_context(agent(tree, work, cpu))
        cluster = [first]
        for _ in range(nodes - 1):
            cluster.append(stack.enter_context(agent(tree, work, cpu, join=first)))
        yield cluster


@contextmanager
def kinship_cluster(work: Path, cpu: int, nodes: int) -> Iterator[list[subprocess.Popen[str]]]:
    key = subprocess.run(
        [sys.executable, "-m", "kinship", "keygen"], capture_output=True, text=True, check=True
    ).stdout.strip()
    script = work / "kinship_node.py"
    script.write_text(KINSHIP_NODE)
    procs: list[subprocess.Popen[str]] = []
    try:
        seed = 0
        for _ in range(nodes):
            port = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        "taskset",
                        "-c",
                        str(cpu),
                        sys.executable,
                        str(script),
                        str(port),
                        str(seed),
                        key,
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
            seed = seed or port
        yield procs
    finally:
        for proc in procs:
            stop(proc)


def kinship_joined(procs: Sequence[subprocess.Popen[str]], nodes: int) -> None:
    for proc in procs:
        assert proc.stdout is not None
        deadline = time.monotonic() + JOIN_TIMEOUT
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("a kinship node exited")
            if int(line) >= nodes:
                break
        else:
            raise RuntimeError("kinship did not converge")


def cpu_rows(trees: dict[str, Path], work: Path, cpu: int, nodes: int, seconds: float) -> list[str]:
    with ExitStack() as stack:
        groups: dict[str, list[int]] = {}
        for label, tree in trees.items():
            cluster = stack.enter_context(mesh_cluster(tree, work, cpu, nodes))
            deadline = time.monotonic() + JOIN_TIMEOUT
            while any(members(a.api_port) < nodes for a in cluster):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: the cluster did not converge")
                time.sleep(0.5)
            groups[f"meshplane {label}"] = [a.proc.pid for a in cluster]
        kin = stack.enter_context(kinship_cluster(work, cpu, nodes))
        kinship_joined(kin, nodes)
        groups["kinship"] = [p.pid for p in kin]
        time.sleep(SETTLE)
        trees_of = {name: [process_tree(pid) for pid in pids] for name, pids in groups.items()}
        before = {name: [run_seconds(t) for t in each] for name, each in trees_of.items()}
        started = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        after = {name: [run_seconds(t) for t in each] for name, each in trees_of.items()}
        rss = {
            name: sum(rss_mb(pid) for tree in each for pid in tree) / nodes
            for name, each in trees_of.items()
        }
    per_node = {
        name: [(a - b) / elapsed * 1000 for a, b in zip(after[name], before[name], strict=True)]
        for name in groups
    }
    reference = sum(per_node["kinship"]) / nodes
    rows = []
    for name, figures in per_node.items():
        mean = sum(figures) / nodes
        rows.append(
            f"{name:<16} {mean:>9.2f} {min(figures):>7.2f} {max(figures):>7.2f}"
            f" {mean / reference if reference else float('nan'):>6.2f} {rss[name]:>7.1f}"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="a checkout of the commit to compare with")
    parser.add_argument("--tasks", default="0,1000,10000", help="task counts (default %(default)s)")
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60.0, help="idle CPU window")
    parser.add_argument("--cpu", type=int, default=min(os.sched_getaffinity(0)))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args(argv)
    counts = sorted({int(c) for c in args.tasks.split(",")})
    if counts[-1] > MAX_TASKS or not 1 <= args.seconds <= MAX_SECONDS or not 2 <= args.nodes <= 9:
        parser.error(f"at most {MAX_TASKS} tasks, 1-{MAX_SECONDS:.0f} s, 2-9 nodes")
    trees = {"after": REPO} if args.base is None else {"base": args.base, "after": REPO}
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; CPU {args.cpu}", flush=True)
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        if not args.skip_memory:
            print("\nRSS (MB) per process: the agent with 1 DNS worker and 1 HTTP worker")
            print("tree      tasks    control dns worker http worker  register s")
            print("-" * 61)
            memory_rows(trees, work, args.cpu, counts)
        if not args.skip_cpu:
            print(
                f"\nIdle CPU per node, {args.nodes}-node loopback clusters, {args.seconds:.0f} s,"
            )
            print("all on one CPU; ms on a CPU per second (schedstat, workers included); x kinship")
            print(f"{'cluster':<16} {'ms/s':>9} {'min':>7} {'max':>7} {'x':>6} {'RSS MB':>7}")
            print("-" * 57)
            for row in cpu_rows(trees, work, args.cpu, args.nodes, args.seconds):
                print(row)
    print(f"\nload after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

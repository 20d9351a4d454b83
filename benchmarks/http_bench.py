"""HTTP benchmark: the meshplane router against nginx, HAProxy and Caddy, same Host routing.

Every proxy routes the same `--routes` hosts (`svc0.bench` ... ) by the Host
header, each to its own two backend ports, round robin, with keep-alive to the
backends and X-Forwarded-For/-Proto/-Host added; an unknown host is refused.
The backends are one separate nginx process (one worker) listening on every
backend port and answering a fixed 8-byte body (`svc3-t1\\n`) with `return
200`: far cheaper per request than any proxy, so not the bottleneck.

- nginx: one `server` per host, an `upstream` per service with `keepalive`,
  `proxy_http_version 1.1`; one worker (the one-core row) or `auto`;
- HAProxy: one frontend, `use_backend` by `req.hdr(host)`, `http-reuse
  always`; `nbthread 1` or `nbthread <CPUs>`;
- Caddy (one-core group, when installed): a site per host with `reverse_proxy` over the
  two backends, round robin, keep-alive; GOMAXPROCS=1 (one thread runs Go code);
- meshplane: a real `mesh agent` (`--dns none`, `--http`), with the services
  (`mesh.http.hosts`, `mesh.http.port` labels) and their tasks registered over
  its API; `--http-workers 0` (the router in the agent's one event loop) or
  `--http-workers N` (SO_REUSEPORT worker processes);
- in the one-core group (unless `--no-naive`), the naive way the issue measured: an aiohttp server
  whose handler forwards with an aiohttp `ClientSession`.

wrk (one thread, `--connections` keep-alive connections, `--latency`) sends GET /
with the Host header cycling over the routes (a Lua script with prebuilt
requests). One-core rows: each proxy (all its processes) pinned with taskset
to `--server-cpu`, wrk and the backends to `--client-cpu`. All-cores rows:
the proxies may use every CPU (wrk and the backends stay where they were, so
they compete with them there). Proxies of one group are timed in alternating
rounds (`--rounds`, splitting `--seconds`), after a one-second warm-up each.

Reported per proxy: requests per second (overall and the range over rounds),
failed requests (socket errors and non-2xx), the proxy's CPU time per request
(utime + stime from /proc/<pid>/stat of the proxy and all its child
processes), the CPU use of proxy, wrk and backends over the run (a proxy far
below 100% of its core was not what set the pace), p50 and p99 latency (wrk's,
median over the rounds), and ratios to nginx of the same group.

    .venv/bin/python benchmarks/http_bench.py [--seconds 15] [--routes 4] [--no-naive]

Everything listens on 127.0.0.1; every process started is stopped by its pid;
every wrk run is bounded (`-d`, at most 60 s per proxy in all).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CLK_TCK,
    HOST,
    START_TIMEOUT,
    api,
    cpu_seconds,
    free_port,
    process_tree,
    stop,
    wait_for_api,
    without_sandboxes,  # benchmarks/common.py: what the agent-running benchmarks share
)

REPO = Path(__file__).resolve().parents[1]
POOL = "127.80.0.0/12"  # the agent's VIP pool, on loopback (no service here has a network)
TASKS_PER_ROUTE = 2
WARMUP_SECONDS = 1


# -- measurement ----------------------------------------------------------------------------


@dataclass
class Segment:
    """One timed wrk run against one proxy."""

    requests: int
    seconds: float
    failed: Counter[str]  # socket errors (connect, read, write, timeout) and non-2xx/3xx (status)
    proxy_cpu: float  # seconds
    client_cpu: float
    backend_cpu: float
    machine_cpu: float  # busy CPU seconds of the whole machine, every CPU (/proc/stat)
    p50_ms: float
    p99_ms: float


@dataclass
class Proxy:
    label: str
    pid: int
    port: int
    note: str = ""
    segments: list[Segment] = field(default_factory=list)

    def result(self) -> Result:
        done = self.segments
        run = sum(s.seconds for s in done)
        requests = sum(s.requests for s in done)
        return Result(
            label=self.label,
            rps=requests / run,
            rps_rounds=[s.requests / s.seconds for s in done],
            requests=requests,
            failed=sum((s.failed for s in done), Counter()),
            run_seconds=run,
            cpu_seconds=sum(s.proxy_cpu for s in done),
            client_cpu_seconds=sum(s.client_cpu for s in done),
            backend_cpu_seconds=sum(s.backend_cpu for s in done),
            machine_cpu_seconds=sum(s.machine_cpu for s in done),
            p50_ms=statistics.median(s.p50_ms for s in done),
            p99_ms=statistics.median(s.p99_ms for s in done),
            note=self.note,
        )


@dataclass
class Result:
    label: str
    rps: float
    rps_rounds: list[float]
    requests: int
    failed: Counter[str]
    run_seconds: float
    cpu_seconds: float
    client_cpu_seconds: float
    backend_cpu_seconds: float
    machine_cpu_seconds: float
    p50_ms: float
    p99_ms: float
    note: str = ""

    @property
    def other_cpu_seconds(self) -> float:
        """Busy CPU time not charged to proxy, wrk or backends: other tenants, and the
        loopback's softirq work, which no process is charged for."""
        return max(
            0.0,
            self.machine_cpu_seconds
            - self.cpu_seconds
            - self.client_cpu_seconds
            - self.backend_cpu_seconds,
        )

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_seconds / max(1, self.requests)


#: wrk script: Host cycles over the routes; requests are formatted once, in init.
#: done() prints what the summary's text would make us parse (latency in us).
WRK_SCRIPT = """
local hosts = {%(hosts)s}
local prepared = {}
local n = 0
function init(args)
  for i, host in ipairs(hosts) do
    prepared[i] = wrk.format("GET", "/", {Host = host})
  end
end
function request()
  n = n + 1
  return prepared[(n %% #prepared) + 1]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"connect\\": %%d, " ..
    "\\"read\\": %%d, \\"write\\": %%d, \\"status\\": %%d, \\"timeout\\": %%d, " ..
    "\\"p50_us\\": %%d, \\"p99_us\\": %%d}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk(
    port: int, script: Path, cpu: int, seconds: int, connections: int, out: Path
) -> tuple[dict[str, int], float]:
    """One bounded wrk run; its BENCH figures and the CPU seconds wrk used."""
    argv = [
        "taskset",
        "-c",
        str(cpu),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "2s",
        "-s",
        str(script),
        f"http://{HOST}:{port}/",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with out.open("w") as sink:
        subprocess.run(
            argv, stdout=sink, stderr=subprocess.STDOUT, timeout=seconds + 30, check=True
        )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out.read_text()
    found = re.search(r"^BENCH (\{.*\})$", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"wrk printed no figures:\n{text[-2000:]}")
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(found.group(1)), used


def machine_busy_seconds() -> float:
    """CPU time spent on anything but idle and iowait, all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLK_TCK  # user..steal; guest time is inside user


def segment(
    proxy: Proxy, backend_pid: int, args: argparse.Namespace, script: Path, seconds: int, work: Path
) -> None:
    pids, backend_pids = process_tree(proxy.pid), process_tree(backend_pid)
    proxy_before, backend_before = cpu_seconds(pids), cpu_seconds(backend_pids)
    machine_before = machine_busy_seconds()
    figures, client = wrk(
        proxy.port, script, args.client_cpu, seconds, args.connections, work / "wrk.txt"
    )
    machine = machine_busy_seconds() - machine_before
    proxy.segments.append(
        Segment(
            requests=figures["requests"],
            seconds=figures["duration_us"] / 1e6,
            failed=Counter(
                {
                    k: figures[k]
                    for k in ("connect", "read", "write", "status", "timeout")
                    if figures[k]
                }
            ),
            proxy_cpu=cpu_seconds(pids) - proxy_before,
            client_cpu=client,
            backend_cpu=cpu_seconds(backend_pids) - backend_before,
            machine_cpu=machine,
            p50_ms=figures["p50_us"] / 1e3,
            p99_ms=figures["p99_us"] / 1e3,
        )
    )


def measure(
    proxies: list[Proxy], backend_pid: int, args: argparse.Namespace, script: Path, work: Path
) -> None:
    """Warm every proxy, then time them in alternating rounds (drift falls on all alike)."""
    for proxy in proxies:
        wrk(
            proxy.port,
            script,
            args.client_cpu,
            WARMUP_SECONDS,
            args.connections,
            work / "warmup.txt",
        )
    per_round = max(1, round(args.seconds / args.rounds))
    for round_ in range(args.rounds):
        for proxy in proxies if round_ % 2 == 0 else proxies[::-1]:
            segment(proxy, backend_pid, args, script, per_round, work)


def get(port: int, host: str) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{HOST}:{port}/", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def check_routing(port: int, routes: int, label: str) -> None:
    """Each host reaches its own service's backends, both of them; an unknown host does not."""
    for i in range(routes):
        bodies = {get(port, f"svc{i}.bench") for _ in range(2 * TASKS_PER_ROUTE)}
        expected = {(200, f"svc{i}-t{t}\n".encode()) for t in range(TASKS_PER_ROUTE)}
        if bodies != expected:
            raise RuntimeError(
                f"{label}: svc{i}.bench answered {sorted(bodies)}, expected {sorted(expected)}"
            )
    status, _ = get(port, "unknown.bench")
    if status < 400:
        raise RuntimeError(f"{label}: an unknown host was answered {status}")


# -- the servers ----------------------------------------------------------------------------


def taskset(cpus: Sequence[int]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus))]


@contextlib.contextmanager
def started(
    argv: list[str], log: Path, port: int, label: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A process that listens on `port`; stopped by its pid on the way out."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{label} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield proc
    finally:
        stop(proc)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((HOST, port)) == 0


def nginx_prefix(work: Path, name: str) -> tuple[Path, str]:
    """A private nginx prefix: pid, temp paths and logs under `work`, none of the system's."""
    prefix = work / name
    prefix.mkdir()
    temps = "\n".join(
        f"{kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return prefix, temps


@contextlib.contextmanager
def backends(work: Path, cpu: int, routes: int) -> Iterator[tuple[int, dict[str, list[int]]]]:
    """One single-process nginx answering `svcI-tJ` on one port per task."""
    ports = {f"svc{i}": [free_port() for _ in range(TASKS_PER_ROUTE)] for i in range(routes)}
    prefix, temps = nginx_prefix(work, "backends")
    servers = "\n".join(
        f'server {{ listen {HOST}:{port}; location / {{ return 200 "{name}-t{t}\\n"; }} }}'
        for name, task_ports in ports.items()
        for t, port in enumerate(task_ports)
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        textwrap.dedent(f"""\
        daemon off; master_process off; worker_processes 1;
        pid {prefix / "nginx.pid"}; error_log stderr warn;
        events {{ worker_connections 4096; }}
        http {{
        access_log off; keepalive_requests 10000000; keepalive_timeout 75s;
        default_type text/plain;
        {temps}
        """)
        + servers
        + "\n}\n"
    )
    first = ports["svc0"][0]
    argv = [*taskset([cpu]), "nginx", "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
    with started(argv, prefix / "out.log", first, "backend nginx") as proc:
        yield proc.pid, ports


@contextlib.contextmanager
def nginx_proxy(
    work: Path, cpus: Sequence[int], workers: str, ports: dict[str, list[int]]
) -> Iterator[Proxy]:
    port = free_port()
    prefix, temps = nginx_prefix(work, f"nginx-{port}")
    blocks = []
    for name, task_ports in ports.items():
        servers = " ".join(f"server {HOST}:{p};" for p in task_ports)
        blocks.append(f"""
            upstream {name} {{ {servers} keepalive 64; keepalive_requests 10000000; }}
            server {{
                listen {HOST}:{port}; server_name {name}.bench;
                location / {{
                    proxy_pass http://{name}; proxy_http_version 1.1;
                    proxy_set_header Connection ""; proxy_set_header Host $host;
                    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
                    proxy_set_header X-Forwarded-Proto $scheme;
                    proxy_set_header X-Forwarded-Host $host;
                }}
            }}""")
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
        daemon off; master_process on; worker_processes {workers};
        pid {prefix / "nginx.pid"}; error_log stderr warn;
        events {{ worker_connections 8192; }}
        http {{
            access_log off; keepalive_requests 10000000; keepalive_timeout 75s;
            {temps}
            server {{ listen {HOST}:{port} default_server; return 404; }}
            {"".join(blocks)}
        }}
        """)
    argv = [*taskset(cpus), "nginx", "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
    label = f"nginx, {'1 worker' if workers == '1' else f'workers {workers}'}"
    with started(argv, prefix / "out.log", port, label) as proc:
        yield Proxy(label, proc.pid, port, note=f"CPUs {','.join(map(str, cpus))}")


@contextlib.contextmanager
def haproxy(
    work: Path, cpus: Sequence[int], threads: int, ports: dict[str, list[int]]
) -> Iterator[Proxy]:
    port = free_port()
    rules = "\n".join(
        f"    use_backend {name} if {{ req.hdr(host),field(1,:),lower -m str {name}.bench }}"
        for name in ports
    )
    backends_ = "\n".join(
        f"backend {name}\n    balance roundrobin\n"
        + "".join(f"    server t{t} {HOST}:{p}\n" for t, p in enumerate(task_ports))
        for name, task_ports in ports.items()
    )
    conf = work / f"haproxy-{port}.cfg"
    conf.write_text(f"""global
    nbthread {threads}
    maxconn 8192
defaults
    mode http
    timeout connect 5s
    timeout client 75s
    timeout server 60s
    timeout http-keep-alive 75s
    option http-keep-alive
    http-reuse always
frontend routes
    bind {HOST}:{port}
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
{rules}
{backends_}""")
    argv = [*taskset(cpus), "haproxy", "-db", "-f", str(conf)]
    label = f"HAProxy, nbthread {threads}"
    with started(argv, work / f"haproxy-{port}.log", port, label) as proc:
        yield Proxy(label, proc.pid, port, note=f"CPUs {','.join(map(str, cpus))}")


@contextlib.contextmanager
def caddy(work: Path, cpus: Sequence[int], ports: dict[str, list[int]]) -> Iterator[Proxy]:
    """Caddy's reverse_proxy, one site per host, GOMAXPROCS=1 (one Go thread runs Go code).

    Round robin over the two backends with keep-alive (Caddy's HTTP transport keeps
    idle connections by default); X-Forwarded-For/-Proto/-Host are Caddy's defaults.
    """
    port = free_port()
    home = work / f"caddy-{port}"
    home.mkdir()
    sites = "\n".join(
        f"http://{name}.bench:{port} {{\n"
        f"  reverse_proxy {' '.join(f'{HOST}:{p}' for p in task_ports)} {{\n"
        "    lb_policy round_robin\n"
        "    transport http {\n      keepalive 75s\n      keepalive_idle_conns_per_host 64\n    }\n"
        "  }\n}"
        for name, task_ports in ports.items()
    )
    conf = home / "Caddyfile"
    conf.write_text(
        "{\n  admin off\n  auto_https off\n"
        f"  default_bind {HOST}\n  servers {{\n    protocols h1\n  }}\n}}\n"
        f"{sites}\nhttp://:{port} {{\n  respond 404\n}}\n"
    )
    env = {
        **os.environ,
        "GOMAXPROCS": "1" if len(cpus) == 1 else str(len(cpus)),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home),
        "XDG_DATA_HOME": str(home),
    }
    argv = [*taskset(cpus), "caddy", "run", "--config", str(conf), "--adapter", "caddyfile"]
    label = "Caddy, 1 Go thread" if len(cpus) == 1 else f"Caddy, GOMAXPROCS {len(cpus)}"
    with started(argv, home / "out.log", port, label, env=env) as proc:
        yield Proxy(label, proc.pid, port, note=f"CPUs {','.join(map(str, cpus))}")


def agent_help(python: str) -> str:
    return subprocess.run(
        [python, "-m", "mesh", "agent", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    ).stdout


@contextlib.contextmanager
def mesh_router(
    work: Path, cpus: Sequence[int], python: str, workers: int, ports: dict[str, list[int]]
) -> Iterator[Proxy]:
    """A real agent, routing by labels; services and tasks registered over its API."""
    api_port, http_port = free_port(), free_port()
    flags = [
        "--node-name",
        "bench",
        "--data-dir",
        str(work / f"data-{api_port}"),
        "--api",
        f"{HOST}:{api_port}",
        "--dns",
        "none",
        "--http",
        f"{HOST}:{http_port}",
        "--advertise",
        f"{HOST}:{free_port()}",
        "--address-pool",
        POOL,
        "--lb",
        "userspace",
        "--log-level",
        "warning",
        "--http-workers",
        str(workers),
    ]
    if "--access-log-sample" in agent_help(python):
        # no access log, as nginx and HAProxy here (observability_bench.py measures its cost)
        flags += ["--access-log-sample", "0"]
    log = work / f"agent-{api_port}.log"
    argv = [*without_sandboxes(), *taskset(cpus), python, "-m", "mesh", "agent", *flags]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            argv,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    try:
        if not wait_for_api(proc, api_port):
            raise RuntimeError(f"the agent exited:\n{log.read_text()[-3000:]}")
        for name, task_ports in ports.items():
            status, body = api(
                api_port,
                "POST",
                "/v1/services",
                {
                    "name": name,
                    "labels": {"mesh.http.hosts": f"{name}.bench", "mesh.http.port": "80"},
                },
            )
            if status != 201:
                raise RuntimeError(f"service {name}: {status} {body}")
            for t, port in enumerate(task_ports):
                status, body = api(
                    api_port,
                    "POST",
                    f"/v1/services/{name}/tasks",
                    {"address": HOST, "ports": {"80": port}, "name": f"{name}-t{t}"},
                )
                if status != 201:
                    raise RuntimeError(f"task of {name}: {status} {body}")
        deadline = time.monotonic() + START_TIMEOUT
        while len(process_tree(proc.pid)) < workers + 1 or not all_routed(http_port, ports):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the router does not route:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        label = "meshplane, 1 loop" if workers == 0 else f"meshplane, {workers} workers"
        yield Proxy(label, proc.pid, http_port, note=f"CPUs {','.join(map(str, cpus))}")
    finally:
        stop(proc)


def all_routed(port: int, ports: dict[str, list[int]]) -> bool:
    """Every host answered by its service (workers get the routes through the feed)."""
    try:
        return all(get(port, f"{name}.bench")[0] == 200 for name in ports for _ in range(4))
    except OSError:
        return False


NAIVE_PROXY = """
import asyncio, itertools, json, sys
import uvloop
from aiohttp import ClientSession, TCPConnector, web

table = json.loads(sys.argv[2])
routes = {f"{name}.bench": itertools.cycle(ports) for name, ports in table.items()}

async def main():
    session = ClientSession(connector=TCPConnector(limit=0, limit_per_host=64))
    async def handle(request):
        ports = routes.get(request.host.split(":")[0].lower())
        if ports is None:
            return web.Response(status=404)
        async with session.get(f"http://127.0.0.1:{next(ports)}{request.path_qs}",
                               headers={"Host": request.host,
                                        "X-Forwarded-For": request.remote or ""}) as upstream:
            return web.Response(status=upstream.status, body=await upstream.read())
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1]), backlog=4096).start()
    await asyncio.Event().wait()

uvloop.run(main())
"""


@contextlib.contextmanager
def naive_proxy(
    work: Path, cpus: Sequence[int], python: str, ports: dict[str, list[int]]
) -> Iterator[Proxy]:
    port = free_port()
    script = work / "naive_proxy.py"
    script.write_text(NAIVE_PROXY)
    argv = [*taskset(cpus), python, str(script), str(port), json.dumps(ports)]
    label = "aiohttp naive, 1 loop"
    with started(argv, work / "naive.log", port, label) as proc:
        yield Proxy(label, proc.pid, port, note="aiohttp server + ClientSession")


# -- the run --------------------------------------------------------------------------------


def table(results: list[Result], baseline: Result) -> str:
    head = (
        f"{'proxy':<24} {'req/s':>7} {'range':>11} {'failed':>6} {'CPU us/req':>10} "
        f"{'proxy':>5} {'wrk':>5} {'backend':>7} {'other':>5} {'p50 ms':>6} {'p99 ms':>6} "
        f"{'req/s x':>7} {'CPU x':>5} {'p99 x':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        spread = f"{min(r.rps_rounds) / 1e3:.1f}k-{max(r.rps_rounds) / 1e3:.1f}k"
        lines.append(
            f"{r.label:<24} {r.rps:7.0f} {spread:>11} {r.failed.total():6d} "
            f"{r.cpu_us_per_request:10.1f} "
            f"{100 * r.cpu_seconds / r.run_seconds:4.0f}% "
            f"{100 * r.client_cpu_seconds / r.run_seconds:4.0f}% "
            f"{100 * r.backend_cpu_seconds / r.run_seconds:6.0f}% "
            f"{100 * r.other_cpu_seconds / r.run_seconds:4.0f}% "
            f"{r.p50_ms:6.2f} {r.p99_ms:6.2f} {r.rps / baseline.rps:7.2f} "
            f"{r.cpu_us_per_request / baseline.cpu_us_per_request:5.2f} "
            f"{r.p99_ms / baseline.p99_ms:5.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    cpus = sorted(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=int,
        default=15,
        help="timed wrk seconds per proxy and group (default 15, at most 60)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating rounds the seconds are split into (default 3)",
    )
    parser.add_argument("--routes", type=int, default=4, help="hosts routed (default 4)")
    parser.add_argument(
        "--connections", type=int, default=64, help="wrk keep-alive connections (default 64)"
    )
    parser.add_argument(
        "--server-cpu",
        type=int,
        default=cpus[0],
        help=f"CPU of the one-core proxies (default {cpus[0]})",
    )
    parser.add_argument(
        "--client-cpu",
        type=int,
        default=cpus[-1],
        help=f"CPU of wrk and the backends (default {cpus[-1]})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=len(cpus),
        help=f"--http-workers of the all-cores router (default {len(cpus)})",
    )
    parser.add_argument(
        "--no-naive", action="store_true", help="leave out the naive aiohttp proxy (one-core group)"
    )
    parser.add_argument(
        "--no-caddy", action="store_true", help="leave out Caddy (one-core group, if installed)"
    )
    parser.add_argument("--no-all-cores", action="store_true", help="skip the all-cores group")
    parser.add_argument(
        "--no-mesh", action="store_true", help="leave the router out (nginx and HAProxy only)"
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter with meshplane installed (default: this one)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 60 or not 1 <= args.rounds <= min(20, args.seconds):
        parser.error("--seconds must be in [1, 60] and --rounds in [1, min(20, seconds)]")
    if not 1 <= args.routes <= 64 or not 1 <= args.connections <= 1000:
        parser.error("--routes must be in [1, 64] and --connections in [1, 1000]")
    if len(cpus) < 2 or args.server_cpu == args.client_cpu:
        parser.error("the proxies and wrk need two different CPUs")
    args.all_cpus = cpus
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    missing = [t for t in ("wrk", "nginx", "haproxy", "taskset") if shutil.which(t) is None]
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    notes: list[str] = []
    mesh = not args.no_mesh
    if mesh and "--http-workers" not in agent_help(args.python):
        notes.append("meshplane left out: `mesh agent` has no --http-workers flag yet")
        mesh = False
    with_caddy = not args.no_caddy and shutil.which("caddy") is not None
    if not args.no_caddy and not with_caddy:
        notes.append("Caddy left out: not installed (Debian: apt-get install caddy)")
    started_at = time.monotonic()
    groups: list[tuple[str, list[Result]]] = []
    with tempfile.TemporaryDirectory(prefix="mphttp-bench-") as tmp:
        work = Path(tmp)
        script = work / "routes.lua"
        script.write_text(
            WRK_SCRIPT % {"hosts": ", ".join(f'"svc{i}.bench"' for i in range(args.routes))}
        )
        with backends(work, args.client_cpu, args.routes) as (backend_pid, ports):
            one = [args.server_cpu]
            with contextlib.ExitStack() as stack:
                proxies = [
                    stack.enter_context(nginx_proxy(work, one, "1", ports)),
                    stack.enter_context(haproxy(work, one, 1, ports)),
                ]
                if with_caddy:
                    proxies.append(stack.enter_context(caddy(work, one, ports)))
                if mesh:
                    proxies.append(
                        stack.enter_context(mesh_router(work, one, args.python, 0, ports))
                    )
                if not args.no_naive:
                    proxies.append(stack.enter_context(naive_proxy(work, one, args.python, ports)))
                for proxy in proxies:
                    check_routing(proxy.port, args.routes, proxy.label)
                measure(proxies, backend_pid, args, script, work)
            groups.append((f"one core (CPU {args.server_cpu})", [p.result() for p in proxies]))
            if not args.no_all_cores:
                every = args.all_cpus
                with contextlib.ExitStack() as stack:
                    proxies = [
                        stack.enter_context(nginx_proxy(work, every, "auto", ports)),
                        stack.enter_context(haproxy(work, every, len(every), ports)),
                    ]
                    if mesh:
                        proxies.append(
                            stack.enter_context(
                                mesh_router(work, every, args.python, args.workers, ports)
                            )
                        )
                    for proxy in proxies:
                        check_routing(proxy.port, args.routes, proxy.label)
                    measure(proxies, backend_pid, args, script, work)
                groups.append(
                    (
                        f"all cores (CPUs {','.join(map(str, every))}, shared with wrk "
                        "and the backends)",
                        [p.result() for p in proxies],
                    )
                )
    print(
        f"HTTP Host routing, {args.routes} routes x {TASKS_PER_ROUTE} backends: wrk -t1 "
        f"-c{args.connections} on CPU {args.client_cpu} (backends there too), "
        f"{args.seconds} s per proxy in {args.rounds} alternating rounds; "
        "x = ratio to nginx of the same group; CPU = share of one CPU"
    )
    for title, results in groups:
        print(f"\n{title}")
        print(table(results, results[0]))
    for title, results in groups:
        for r in results:
            if r.failed:
                notes.append(
                    f"{r.label} ({title.split(' (')[0]}): failed requests {dict(r.failed)}"
                )
    for note in notes:
        print(f"- {note}")
    print(f"- total {time.monotonic() - started_at:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

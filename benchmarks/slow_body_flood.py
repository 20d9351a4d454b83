"""Slow-body flood against the HTTP router: does the API keep answering, do tasks stay in?

Issue 13, defect 3. Starts a real agent (default limits: its RLIMIT_NOFILE is
what this shell gives, raised to the hard limit by the agent itself) and one
backend task behind an HRM route with an HTTP health check (every 1 s, 2
retries), then opens `--connections` slow-body requests (a head announcing
1 MiB, then `--chunk` bytes every `--every` s) at `--rate` per second, holds them for
`--hold` seconds, and meanwhile GETs /v1/health every 0.1 s on a fresh
connection. It reports the worst and the 99th-percentile latency, the
probes that failed, the task's health as it was seen every second, and the
router's counters (ejections, connect failures, fd shortage, clients refused
over the budget). Bounded: a count, a rate and a time; loopback only.

    .venv/bin/python -m benchmarks.slow_body_flood                  # 12,000 connections
    .venv/bin/python -m benchmarks.slow_body_flood --connections 3000 --nofile 4096

Run it from a checkout's root (it starts that checkout's agent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.helpers.agent import AgentProcess, free_port
from tests.helpers.http_backend import BackendProcess
from tests.helpers.slow_body import SlowBodies, health_latency

PROBE_LIMIT = 10.0  # a /v1/health that takes longer counts as this (and as failed)


def _setup(agent: AgentProcess, backend_port: int) -> str:
    status, body = agent.request(
        "POST",
        "/v1/services",
        {
            "name": "slow",
            "labels": {"mesh.http.hosts": "slow.test", "mesh.http.port": "80"},
            "health_check": {
                "type": "http",
                "port": 80,
                "path": "/whoami",
                "interval": 1,
                "timeout": 1,
                "retries": 2,
            },
        },
    )
    assert status == 201, body
    status, task = agent.request(
        "POST", "/v1/services/slow/tasks", {"address": "127.0.0.1", "ports": {"80": backend_port}}
    )
    assert status == 201, task
    deadline = time.monotonic() + 15
    while agent.request("GET", f"/v1/tasks/{task['id']}")[1]["health"] != "healthy":
        if time.monotonic() > deadline:
            raise SystemExit("the task never turned healthy")
        time.sleep(0.2)
    return str(task["id"])


def _look(agent: AgentProcess, path: str) -> Any:
    try:
        status, body = agent.request("GET", path, timeout=PROBE_LIMIT)
    except OSError as error:
        return {"error": repr(error)}
    return body if status == 200 else {"status": status}


async def _run(agent: AgentProcess, task_id: str, args: argparse.Namespace) -> dict[str, Any]:
    flood = SlowBodies("127.0.0.1", agent.http_port, "slow.test")
    api_host, api_port = agent.api.split(":")
    latencies: list[float] = []
    health_seen: list[str] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            latencies.append(await health_latency(api_host, int(api_port), PROBE_LIMIT))
            await asyncio.sleep(0.1)

    async def watch_task() -> None:
        while not stop.is_set():
            task = await asyncio.to_thread(_look, agent, f"/v1/tasks/{task_id}")
            health_seen.append(str(task.get("health", task.get("error", task))))
            await asyncio.sleep(1.0)

    probes = [asyncio.ensure_future(probe()), asyncio.ensure_future(watch_task())]
    started = time.monotonic()
    opening = args.connections / args.rate + 30
    # The trickle runs from the first connection on, as an attacker's would.
    trickling = asyncio.ensure_future(
        flood.trickle(seconds=opening + args.hold, every=args.every, chunk=args.chunk)
    )
    try:
        await flood.open(args.connections, per_second=args.rate, within=opening)
        opened_in = time.monotonic() - started
        await asyncio.sleep(args.hold)
        router = await asyncio.to_thread(_look, agent, "/v1/http")
    finally:
        trickling.cancel()
        stop.set()
        await asyncio.gather(*probes, return_exceptions=True)
        await flood.close()
    failed = sum(1 for latency in latencies if latency >= PROBE_LIMIT)
    ordered = sorted(latencies)
    keys = (
        "fd_budget",
        "fds_held",
        "connections_open",
        "over_budget",
        "fd_shortage",
        "connect_failures",
        "ejections",
        "ejected",
        "rejected",
        "slow_bodies",
    )
    return {
        "connections_sent": flood.opened,
        "refused_or_closed": flood.refused,
        "answers_on_closed": flood.answers,
        "opened_in_s": round(opened_in, 1),
        "health_probes": len(latencies),
        "health_failed": failed,
        "health_worst_ms": round(max(latencies) * 1000, 1) if latencies else None,
        "health_p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 1)
        if len(ordered) > 1
        else None,
        "health_median_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "task_health_seen": sorted(set(health_seen)),
        "router": {k: router.get(k) for k in keys} if "error" not in router else router,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=12_000)
    parser.add_argument("--rate", type=float, default=2000.0, help="connections per second")
    parser.add_argument("--hold", type=float, default=15.0, help="seconds the flood is held")
    parser.add_argument(
        "--every",
        type=float,
        default=2.0,
        help="seconds between two pieces of body on a connection",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=1,
        help="bytes in each piece (1100 every 1 s stays above the router's "
        "default minimum rate of 1024 B/s)",
    )
    parser.add_argument(
        "--nofile",
        type=int,
        default=None,
        help="RLIMIT_NOFILE for the agent (default: this shell's)",
    )
    args = parser.parse_args()
    if not 1 <= args.connections <= 50_000 or not 0 < args.hold <= 120:
        raise SystemExit("--connections 1..50000, --hold up to 120 s")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the flood's own sockets
    if args.connections + 200 > hard:
        raise SystemExit(f"this shell's hard RLIMIT_NOFILE ({hard}) is below the flood")
    with tempfile.TemporaryDirectory(prefix="slow-body-flood-") as tmp:
        root = Path(tmp)
        backend_port = free_port()
        backend = BackendProcess({"t0": str(backend_port)}, root / "backend.log").start()
        agent = AgentProcess(root / "agent", nofile=args.nofile)
        try:
            agent.start()
            task_id = _setup(agent, backend_port)
            result = asyncio.run(_run(agent, task_id, args))
            log = agent.log()
            result["agent_open_file_limit"] = [
                line.split("event=open_file_limit ", 1)[1]
                for line in log.splitlines()
                if "event=open_file_limit" in line
            ][:1]
            # What the router logged: each failed connect to the task ejected it.
            result["agent_log"] = {
                word: log.count(word)
                for word in (
                    "event=http_connect_failed",
                    "Too many open files",
                    "event=health_probe",
                )
            }
        finally:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.stop()
            backend.stop()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""What each process role imports: a worker holds only what it serves with (no API, no
pydantic, no aiohttp, no prometheus-client, no pyroute2), and the agent's control
process leaves pyroute2 (~10 MB) for when a sandbox or a kernel load balancer needs it.

Each role is imported in a fresh interpreter, as the agent starts it, and its module
set and resident memory are read there (the memory is printed, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: top-level packages no worker needs: the API's, the metrics exporter's, the kernel's
NOT_IN_A_WORKER = (
    "aiohttp",
    "pydantic",
    "pydantic_core",
    "prometheus_client",
    "pyroute2",
    "cryptography",
    "sqlite3",
    "email",
    "http.server",
    "mesh.api",
    "gossip",
)

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
rss = 0
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        rss = int(line.split()[1]) // 1024
print(json.dumps({"modules": sorted(sys.modules), "rss_mb": rss}))
"""


def _imports(module: str) -> tuple[set[str], int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, module],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    answer = json.loads(out.stdout)
    return set(answer["modules"]), int(answer["rss_mb"])


def _loaded(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


@pytest.mark.parametrize("worker", ["dns.worker", "lb.http.worker"])
def test_a_worker_imports_only_what_it_serves_with(worker: str) -> None:
    modules, rss = _imports(worker)
    print(f"{worker}: {len(modules)} modules, {rss} MB resident after import")
    assert [name for name in NOT_IN_A_WORKER if _loaded(modules, name)] == []


def test_the_control_process_loads_pyroute2_only_when_used() -> None:
    modules, rss = _imports("mesh.agent")
    print(f"mesh.agent: {len(modules)} modules, {rss} MB resident after import")
    assert not _loaded(modules, "pyroute2")

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
import contextlib, importlib, io, json, runpy, sys
name, as_main = sys.argv[1], sys.argv[2] == "main"
if as_main:  # as `python -m NAME` runs it, up to its arguments (none: it exits 2 there)
    sys.argv = [name]
    with contextlib.suppress(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        runpy.run_module(name, run_name="__main__", alter_sys=True)
else:
    importlib.import_module(name)
rss = 0
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        rss = int(line.split()[1]) // 1024
loaded = sorted(m for m, module in sys.modules.items() if module is not None)
print(json.dumps({"modules": loaded, "rss_mb": rss}))
"""


def _imports(module: str, as_main: bool = False) -> tuple[set[str], int]:
    """The modules `module` loads (and the resident memory then): imported, or run as
    the process the agent starts (`python -m module`) up to its argument parsing."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, module, "main" if as_main else "import"],
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


#: what the agent's workers leave out as well: their arguments are one JSON object
#: (mesh.core.workerargs), and argparse's first parser loads gettext and shutil
NOT_IN_ANY_WORKER_PROCESS = ("argparse", "shutil", "gettext")

#: what the DNS worker's process leaves out beyond that: it speaks no TLS (dns.worker), and
#: OpenSSL's libcrypto comes with hashlib's and secrets' imports
NOT_IN_A_DNS_WORKER = ("ssl", "_ssl", "uvloop", "_hashlib")


@pytest.mark.parametrize("worker", ["dns.worker", "lb.http.worker"])
def test_a_worker_imports_only_what_it_serves_with(worker: str) -> None:
    modules, rss = _imports(worker, as_main=True)
    print(f"{worker}: {len(modules)} modules, {rss} MB resident at start")
    assert [name for name in NOT_IN_A_WORKER if _loaded(modules, name)] == []
    assert [name for name in NOT_IN_ANY_WORKER_PROCESS if _loaded(modules, name)] == []
    if worker == "dns.worker":
        assert [name for name in NOT_IN_A_DNS_WORKER if _loaded(modules, name)] == []


def test_the_control_process_loads_pyroute2_only_when_used() -> None:
    modules, rss = _imports("mesh.agent")
    print(f"mesh.agent: {len(modules)} modules, {rss} MB resident after import")
    assert not _loaded(modules, "pyroute2")

"""End-to-end tests on a real cluster in network namespaces (`deploy/netns-cluster`).

One cluster per module: N nodes on a bridge, one agent each (lan gossip
profile, the LB backend given by the module), a client namespace outside the
cluster running a small upstream resolver for the agents. Tests drive it the
way an operator would: the agents' APIs, `dig`, the system resolver, curl, and
nftables rules inside the namespaces for partitions and packet loss.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.helpers.dns_upstream import FakeUpstream
from tests.helpers.netns import unavailable

REPO = Path(__file__).resolve().parents[2]
UPSTREAM_NAME = "upstream.example"
UPSTREAM_ADDRESS = "192.0.2.80"


def _load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "netns_cluster", REPO / "deploy" / "netns_cluster.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["netns_cluster"] = module
    spec.loader.exec_module(module)
    return module


harness = _load_harness()


class MeshCluster:
    """A running netns cluster, as the tests use it."""

    def __init__(self, name: str, nodes: int, lb: str, run_as: Any = None) -> None:
        self.name = name
        self.size = nodes
        self.lb = lb
        #: a `harness.RunAs`: the agents run as that user with only its capabilities
        self.run_as = run_as
        self.layout = harness.Layout(name, nodes, "10.77.0.0/24")
        self.state: dict[str, Any] = {}
        self.upstream: FakeUpstream | None = None

    # -- life -------------------------------------------------------------------

    def up(self) -> None:
        client = self.layout.client_address
        self.state = harness.up(
            self.layout,
            lb=self.lb,
            profile="lan",
            dns_upstream=f"{client}:53",
            extra=[],
            timeout=60,
            run_as=self.run_as,
        )
        self.upstream = harness.in_netns(
            self.state["client"],
            lambda: FakeUpstream({UPSTREAM_NAME: [UPSTREAM_ADDRESS]}, host=client, port=53).start(),
        )

    def down(self) -> None:
        if self.upstream is not None:
            self.upstream.stop()
        harness.down(self.name, quiet=True)

    def ns(self, index: int) -> str:
        return str(self.state["client"] if index == 0 else self.layout.node_ns(index))

    def address(self, index: int) -> str:
        return str(self.layout.node_address(index))

    def stop(self, index: int, *, kill: bool = False) -> None:
        import signal

        harness.stop_agent(self.state, index, signal.SIGKILL if kill else signal.SIGTERM)

    def start(self, index: int) -> None:
        harness.start_agent(self.state, index)

    # -- inside -------------------------------------------------------------------

    def run(self, index: int, argv: Sequence[str], timeout: float = 20) -> str:
        ns = self.state["client"] if index == 0 else self.layout.node_ns(index)
        done = subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return done.stdout

    def mesh(self, index: int, *args: str) -> Any:
        ns = self.layout.node_ns(index)
        done = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "mesh", "--json", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=REPO,
            env={
                "PYTHONPATH": str(REPO),
                "MESH_API": harness.API,
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            },
        )
        if done.returncode != 0:
            raise AssertionError(f"mesh {' '.join(args)} on n{index}: {done.stderr}")
        return json.loads(done.stdout) if done.stdout.strip() else None

    def api(self, index: int, path: str) -> Any:
        return harness.api_get(self.layout.node_ns(index), path)

    def task(self, node: int, service: str, port: int, target: int | None = None) -> dict[str, Any]:
        record: dict[str, Any] = harness.add_task(self.state, node, service, port, target)
        return record

    def dig(self, index: int, name: str, rtype: str = "A") -> list[str]:
        out = self.run(index, ["dig", "+short", "+time=2", "+tries=1", "@127.0.0.11", name, rtype])
        return sorted(line for line in out.split() if not line.startswith(";"))

    def nft(self, index: int, ruleset: str) -> None:
        ns = self.layout.node_ns(index)
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"],
            input=ruleset,
            text=True,
            check=True,
            capture_output=True,
            timeout=10,
        )

    def partition(self, side_a: Sequence[int], side_b: Sequence[int]) -> None:
        """Drop every packet between the two sides (rules inside each node)."""
        for mine, theirs in ((side_a, side_b), (side_b, side_a)):
            others = ", ".join(self.address(i) for i in theirs)
            for index in mine:
                self.nft(
                    index,
                    f"""table inet e2e_fault {{
  chain input {{ type filter hook input priority -300; ip saddr {{ {others} }} drop; }}
  chain output {{ type filter hook output priority -300; ip daddr {{ {others} }} drop; }}
}}""",
                )

    def lossy(self, percent: int) -> None:
        """Drop `percent`% of the underlay packets each node receives, at random."""
        for index in range(1, self.size + 1):
            self.nft(
                index,
                f"""table inet e2e_fault {{
  chain input {{ type filter hook input priority -300;
    iifname "eth0" numgen random mod 100 < {percent} drop; }}
}}""",
            )

    def heal(self) -> None:
        for index in range(1, self.size + 1):
            ns = self.layout.node_ns(index)
            subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "e2e_fault"],
                capture_output=True,
                check=False,
                timeout=10,
            )

    def members(self, index: int) -> dict[str, str]:
        return {m["name"]: m["status"] for m in self.api(index, "/v1/members")}


def wait_for(check: Callable[[], bool], timeout: float, step: float = 0.1) -> float | None:
    """Seconds until `check()` held, or None when `timeout` passed first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(step)
    return None


def secs(elapsed: float | None) -> str:
    return "never" if elapsed is None else f"{elapsed:.1f} s"


def start_cluster(nodes: int, lb: str, run_as: Any = None) -> Iterator[MeshCluster]:
    """A cluster for one module; `run_as` (a `harness.RunAs`): its agents run as that
    user with only those capabilities, as deploy/meshplane.service starts them."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    for tool in ("dig", "curl", "nft", "getent", *(["setpriv"] if run_as else [])):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if run_as is not None:
        try:
            run_as.python()  # a Python that user may run, with the packages it may read
        except harness.ClusterError as exc:
            pytest.skip(f"the agents cannot run as uid {run_as.uid} here: {exc}")
    cluster = MeshCluster(f"e{secrets.token_hex(3)}", nodes, lb, run_as)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()

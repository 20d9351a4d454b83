"""`deploy/netns-cluster`: up, a crashed run recovered, down leaving nothing behind (root)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers.netns import unavailable

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "netns-cluster"

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _namespaces_work() -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)


def cluster(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "--name", name, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def out(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def host_links() -> set[str]:
    return {
        line.split(":")[1].split("@")[0].strip()
        for line in out("ip", "-o", "link", "show").splitlines()
    }


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_up_five_survive_a_killed_run_then_down_leaves_nothing() -> None:
    name = f"t{secrets.token_hex(3)}"
    links, tables = host_links(), out("nft", "list", "tables")
    try:
        first = cluster(name, "up", "5", "--lb", "userspace", "--timeout", "60")
        assert first.returncode == 0, first.stderr
        state = json.loads(Path(f"/run/meshplane-dev/{name}/state.json").read_text())
        first_pids = [n["pid"] for n in state["nodes"]]
        # A run that dies without `down`: kill -9 every agent, then `up` again.
        for pid in first_pids:
            os.kill(pid, signal.SIGKILL)
        again = cluster(name, "up", "5", "--lb", "userspace", "--timeout", "60")
        assert again.returncode == 0, again.stderr
        shown = cluster(name, "status", "--json")
        assert shown.returncode == 0, shown.stderr
        report = json.loads(shown.stdout)
        assert [n["members_alive"] for n in report["nodes"]] == [5] * 5
        served = cluster(name, "task", "2", "web", "8002")
        assert served.returncode != 0 and "web" in served.stderr  # no such service yet
        made = cluster(name, "exec", "1", "mesh", "service", "create", "web")
        assert made.returncode == 0, made.stderr
        served = cluster(name, "task", "2", "web", "8002")
        assert served.returncode == 0, served.stderr
        state = json.loads(Path(f"/run/meshplane-dev/{name}/state.json").read_text())
        pids = [n["pid"] for n in state["nodes"]] + [t["pid"] for t in state["tasks"]]
        reached = cluster(
            name,
            "exec",
            "0",
            "curl",
            "-s",
            "--max-time",
            "5",
            f"http://{state['nodes'][1]['address']}:8002/",
        )
        assert reached.stdout == "n2:8002\n"
    finally:
        gone = cluster(name, "down")
    assert gone.returncode == 0, gone.stderr
    assert not any(alive(pid) for pid in pids + first_pids)
    assert not Path(f"/run/meshplane-dev/{name}").exists()
    # Other runs may come and go meanwhile: look for what this one could have leaked.
    ours = {"eth0", "br0", "c", *(f"n{i}" for i in range(1, 6))}
    assert not (host_links() - links) & ours
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(f"{name}-")]
    assert out("nft", "list", "tables") == tables
    print(f"\nnetns-cluster: {len(gone.stdout.splitlines())} objects removed by down")

"""Issue 15 "Done when": kill -9 of the agent during 100 concurrent `mesh task run --detach`.

After a restart the kernel holds exactly what the state owns (no sandbox
namespace, veth or bridge with the agent's prefix that the state does not
have, nothing the state has missing), and every task whose `task run` was
acknowledged (exit 0, its record printed) serves HTTP at its address. Ten
`task rm`s are in flight as well, and an orphan namespace of the agent's
prefix is made while it is down. The 100 runs are bounded in time; the kill
comes once a quarter of them were acknowledged (or after 60 s), so runs are
in flight on every side of it. No task command outlives its task: the
detached commands of the removed tasks (`task rm`, or the reconcile of a task
removed while the agent was down) are ended with their sandbox.

And, focused: `mesh task rm` of a detached task ends its command (SIGTERM, then
SIGKILL after the grace for one that ignores it); the processes of an adopted
namespace are never touched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mesh.sandbox.names import bridge_name, netns_name, veth_name
from tests.helpers.netns import unavailable
from tests.helpers.sandbox_lab import IDENT_SERVER, SandboxNode, wait_for

#: a command that ignores SIGTERM: only SIGKILL ends it
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"

RUNS = 100
RM_RUNS = 10
KILL_AFTER_ACKS = 25
CURL = ["curl", "-sS", "--max-time", "3"]


@pytest.fixture
def node(tmp_path: Any) -> Iterator[SandboxNode]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    made = SandboxNode()
    try:
        made.start_agent()
        yield made
    finally:
        made.close()


def full_log(node: SandboxNode) -> str:
    """The agent's whole log (`node.log()` is its tail), across restarts."""
    return node.log_path.read_text(errors="replace")


def owned_by_state(node: SandboxNode) -> tuple[set[str], set[str], set[str]]:
    """The sandbox namespaces, veths and bridges the state says this node has."""
    tasks = node.api("GET", "/v1/tasks")
    networks = node.api("GET", "/v1/networks")
    sandboxes, veths = set(), set()
    for task in tasks:
        if task.get("node") != node.name or not task.get("sandbox"):
            continue
        sandboxes.add(netns_name(node.name, task["id"]))
        for index, _ in enumerate(task["sandbox"]["endpoints"]):
            veths.add(veth_name(task["id"], index))
    bridges = {
        bridge_name(n["id"])
        for n in networks
        if n.get("driver") == "bridge" and n.get("node") == node.name
    }
    return sandboxes, veths, bridges


def in_kernel(node: SandboxNode) -> tuple[set[str], set[str], set[str]]:
    # mpvx-: the VXLAN device of an overlay (ingress is one on every node), not a veth
    veths = node.links("mpv") - node.links("mpvx-")
    return node.sandboxes(), veths, node.links("mpbr-")


def test_kill_9_during_100_task_runs_leaks_nothing_and_serves_every_acked_task(
    node: SandboxNode,
) -> None:
    node.mesh_ok("network", "create", "front", "--driver", "bridge", "--subnet", "10.90.0.0/23")
    node.mesh_ok("service", "create", "web", "--network", "front")
    # Removals in flight at the kill too: tasks made first, removed during the runs.
    doomed = [node.serve("web", f"old{i}") for i in range(RM_RUNS)]
    removals = [
        node.popen_mesh(
            "task", "rm", task["id"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for task in doomed
    ]
    runs = [
        node.popen_mesh(
            "--json",
            "task",
            "run",
            "web",
            "--detach",
            "--name",
            f"w{i}",
            "--",
            sys.executable,
            str(IDENT_SERVER),
            "80",
            f"w{i}",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(RUNS)
    ]
    started = time.monotonic()
    deadline = started + 60
    while time.monotonic() < deadline:
        if sum(1 for p in runs if p.poll() == 0) >= KILL_AFTER_ACKS:
            break
        time.sleep(0.05)
    node.kill_agent()
    killed_at = time.monotonic() - started
    for proc in removals:
        proc.wait(timeout=60)
    # And an orphan of the agent's prefix the state knows nothing of, made while it is down.
    orphan = f"{node.prefix}orphan"
    subprocess.run(["ip", "netns", "add", orphan], check=True, timeout=10)
    acked: dict[str, dict[str, Any]] = {}
    failed = 0
    for proc in runs:
        out, _ = proc.communicate(timeout=max(1.0, started + 180 - time.monotonic()))
        if proc.returncode == 0:
            record = json.loads(out)
            acked[record["name"]] = record
        else:
            failed += 1
    print(f"agent killed after {killed_at:.1f} s: {len(acked)} runs acknowledged, {failed} failed")
    assert len(acked) >= KILL_AFTER_ACKS or killed_at >= 59

    restarted = time.monotonic()
    node.start_agent()

    def reconciled() -> bool:
        return in_kernel(node) == owned_by_state(node)

    took = wait_for(reconciled, 60, step=0.5)
    state, kernel = owned_by_state(node), in_kernel(node)
    print(
        f"restart reconciled in {took if took is None else round(took, 1)} s: "
        f"{len(state[0])} sandboxes, {len(state[1])} veths, {len(state[2])} bridges in the state"
    )
    assert f"{node.prefix}orphan" not in kernel[0]
    for what, want, have in zip(("sandboxes", "veths", "bridges"), state, kernel, strict=True):
        assert have - want == set(), f"leaked {what}: {sorted(have - want)}"
        assert want - have == set(), f"missing {what}: {sorted(want - have)}"

    tasks = {t["name"]: t for t in node.api("GET", "/v1/tasks")}
    missing = sorted(set(acked) - set(tasks))
    assert not missing, f"acknowledged tasks lost: {missing}"
    unserved = []
    for name, record in sorted(acked.items()):
        done = node.run([*CURL, f"http://{record['address']}/"], timeout=10)
        if done.stdout.strip() != name:
            unserved.append(name)
    print(
        f"{len(acked) - len(unserved)}/{len(acked)} acknowledged tasks served "
        f"{time.monotonic() - restarted:.1f} s after the restart"
    )
    assert not unserved, f"acknowledged tasks not served: {unserved}"

    # No command of a task the state does not have runs on (in a namespace no longer
    # named, kept alive by it), and every one left runs in its own task's sandbox.
    def strays() -> dict[int, tuple[str, str | None]]:
        names = {t["name"]: t for t in node.api("GET", "/v1/tasks")}
        inodes = {
            name: os.stat(f"/run/netns/{netns_name(node.name, t['id'])}").st_ino
            for name, t in names.items()
            if os.path.exists(f"/run/netns/{netns_name(node.name, t['id'])}")
        }
        return {
            pid: (ident, net)
            for pid, (ident, net) in node.ident_servers().items()
            if ident not in inodes or net != f"net:[{inodes[ident]}]"
        }

    wait_for(lambda: not strays(), 30)
    left = strays()
    lines = re.findall(r"event=sandbox_processes_ended (.*)", full_log(node))
    ended = {
        kind: sum(
            int(m.group(1))
            for line in lines
            if (m := re.search(r"ended=(\d+)", line)) and ("task=" in line) == (kind == "task rm")
        )
        for kind in ("task rm", "reconcile")
    }
    print(
        f"task commands running after the restart: {len(node.ident_servers())}; "
        f"ended by the agent (per its log): {ended}"
    )
    assert not left, f"task commands outlived their tasks: {sorted(left.values())}"


def test_task_rm_of_a_detached_task_ends_its_command(node: SandboxNode) -> None:
    node.mesh_ok("network", "create", "front", "--driver", "bridge", "--subnet", "10.91.0.0/24")
    node.mesh_ok("service", "create", "web", "--network", "front")
    polite = node.serve("web", "polite")
    stubborn = node.mesh_json(
        "task", "run", "web", "--detach", "--name", "stubborn", "--", sys.executable, "-c", STUBBORN
    )

    def pid_of(match: str) -> int | None:
        pids = [p for p, (argv, _) in node.processes().items() if argv[-1] == match]
        return pids[0] if pids else None

    assert wait_for(lambda: pid_of("polite") is not None and pid_of(STUBBORN) is not None, 15)
    polite_pid, stubborn_pid = pid_of("polite"), pid_of(STUBBORN)
    assert polite_pid is not None and stubborn_pid is not None

    for task, pid, what in ((polite, polite_pid, "polite"), (stubborn, stubborn_pid, "stubborn")):
        started = time.monotonic()
        node.mesh_ok("task", "rm", task["id"])
        took = wait_for(lambda pid=pid: pid not in node.processes(), 20, step=0.05)
        gone = wait_for(lambda t=task: netns_name(node.name, t["id"]) not in node.sandboxes(), 20)
        print(
            f"{what} command gone {took if took is None else round(took, 2)} s after task rm "
            f"returned ({time.monotonic() - started:.2f} s in all)"
        )
        assert took is not None, f"the {what} command outlived its task"
        assert gone is not None, f"the sandbox of {what} stayed"
    log = full_log(node)
    assert re.search(r"event=sandbox_processes_ended .*netns=\S+ ended=1 killed=0", log), log
    assert re.search(r"event=sandbox_processes_ended .*netns=\S+ ended=1 killed=1", log), log


def test_task_rm_of_an_adopted_namespace_leaves_its_processes(node: SandboxNode) -> None:
    node.mesh_ok("network", "create", "front", "--driver", "bridge", "--subnet", "10.92.0.0/24")
    node.mesh_ok("service", "create", "web", "--network", "front")
    adopted = node.lab.namespace("adopt")  # removed (its processes killed) by the lab
    sleeper = adopted.popen(["sleep", "600"])
    try:
        node.mesh_ok("task", "add", "web", "--sandbox", "--netns", adopted.name, "--name", "ad")
        node.mesh_ok("task", "rm", "ad")

        def endpoint_gone() -> bool:
            links = adopted.run(["ip", "-o", "link", "show"], check=False).stdout
            return "eth0" not in links

        assert wait_for(endpoint_gone, 15) is not None
        time.sleep(0.5)  # a stray SIGTERM would have ended it by now
        assert sleeper.poll() is None, "a process of the adopted namespace was ended"
        assert "event=sandbox_processes_ended" not in full_log(node)
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_the_restart_reconcile_ends_the_command_of_a_task_removed_during_a_kill_9(
    node: SandboxNode,
) -> None:
    """The CI leak: `task rm` committed, the agent killed -9 before the sandbox went; the
    next start removes the orphan sandbox, and its command with it."""
    node.mesh_ok("network", "create", "front", "--driver", "bridge", "--subnet", "10.93.0.0/24")
    node.mesh_ok("service", "create", "web", "--network", "front")
    task = node.mesh_json(
        "task", "run", "web", "--detach", "--name", "stubborn", "--", sys.executable, "-c", STUBBORN
    )
    sandbox = netns_name(node.name, task["id"])

    def pid_of() -> int | None:
        pids = [p for p, (argv, _) in node.processes().items() if argv[-1] == STUBBORN]
        return pids[0] if pids else None

    assert wait_for(lambda: pid_of() is not None, 15) is not None
    pid = pid_of()
    node.mesh_ok("task", "rm", task["id"])
    assert wait_for(lambda: all(t["id"] != task["id"] for t in node.api("GET", "/v1/tasks")), 15)
    # The removal now waits out the grace (the command ignores SIGTERM): kill the agent in it.
    time.sleep(0.5)
    node.kill_agent()
    # (Before the fix the sandbox was gone at once, and the command ran on.)
    print(
        f"at the kill: sandbox there {sandbox in node.sandboxes()}, "
        f"command alive {pid in node.processes()}"
    )
    restarted = time.monotonic()
    node.start_agent()
    took = wait_for(lambda: pid not in node.processes(), 30, step=0.05)
    print(
        f"command of the removed task gone {time.monotonic() - restarted:.2f} s after the "
        f"restart began (found gone after {took if took is None else round(took, 2)} s)"
    )
    assert took is not None, "the command outlived its task across the restart"
    assert wait_for(lambda: sandbox not in node.sandboxes(), 15) is not None
    lines = re.findall(r"event=sandbox_processes_ended (.*)", full_log(node))
    assert any(f"netns={sandbox}" in line and "task=" not in line for line in lines), lines

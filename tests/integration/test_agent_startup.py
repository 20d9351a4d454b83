"""Starting the agent where it cannot run: a data dir another agent holds, a port in use,
a damaged state file. Each refusal is one line on stderr that names what is in the way
(the directory and the PID holding it; the role, address, port and the PID holding it;
the file), with a non-zero exit, and nothing of the refused agent is left behind.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.agent import REPO, AgentProcess
from tests.integration.conftest import StartAgent

START_TIMEOUT = 20.0


def refused(agent: AgentProcess, timeout: float = START_TIMEOUT,
            everything: list[str] | None = None) -> tuple[int, list[str], float]:
    """Run the agent to its exit: (exit status, stderr's `mesh agent:` lines, seconds);
    `everything` gets every line it wrote."""
    started = time.monotonic()
    try:
        proc = subprocess.run(agent.argv(), capture_output=True, timeout=timeout, check=False,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    except subprocess.TimeoutExpired:  # (subprocess.run has killed it)
        pytest.fail(f"the agent was not refused: it started and ran for {timeout:g}s")
    elapsed = time.monotonic() - started
    stderr = proc.stderr.decode(errors="replace")
    if everything is not None:
        everything += (proc.stdout + proc.stderr).decode(errors="replace").splitlines()
    lines = [line for line in stderr.splitlines() if line.startswith("mesh agent:")]
    assert lines, f"no `mesh agent:` line (exit {proc.returncode}):\n{stderr}"
    return proc.returncode, lines, elapsed


def children_of(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
    return found


def open_files(pid: int) -> set[str]:
    targets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            targets.add(os.readlink(fd))
        except OSError:
            continue
    return targets


# -- the data-dir lock ----------------------------------------------------------------


def test_a_second_agent_on_a_data_dir_refuses_and_a_kill_9_leaves_no_stale_lock(
        start_agent: StartAgent) -> None:
    # A DNS worker: a child process, which must not hold the lock.
    first = start_agent(extra=["--dns-workers", "1"])
    assert first.proc is not None
    assert first.request("POST", "/v1/services", {"name": "web"})[0] == 201
    lock = first.data_dir / "agent.lock"

    second = AgentProcess(first.data_dir, node_name="node-2")  # its own ports
    output: list[str] = []
    code, lines, elapsed = refused(second, everything=output)
    print(f"second agent refused in {elapsed:.2f}s: {lines}")
    assert code == 1
    # That one line and nothing else: it stopped before logging, let alone binding.
    assert output == [f"mesh agent: data dir {first.data_dir} is in use by PID "
                      f"{first.proc.pid} (lock {lock})"]
    assert first.request("GET", "/v1/services/web")[0] == 200
    assert lock.read_text().strip() == str(first.proc.pid)

    # The lock's descriptor is the agent's alone: not inherited by its workers.
    deadline = time.monotonic() + 10
    while not children_of(first.proc.pid):
        assert time.monotonic() < deadline, "the DNS worker never started"
        time.sleep(0.1)
    assert str(lock) in open_files(first.proc.pid)
    for child in children_of(first.proc.pid):
        assert str(lock) not in open_files(child), f"worker {child} inherited the lock"

    # kill -9: the kernel drops the flock; the file (with the dead PID) stays and
    # must not block the next start, which finds what the first one accepted.
    old_pid = first.proc.pid
    first.kill()
    assert lock.read_text().strip() == str(old_pid)
    first.start()
    assert first.proc.pid != old_pid
    assert lock.read_text().strip() == str(first.proc.pid)
    assert first.request("GET", "/v1/services/web")[0] == 200

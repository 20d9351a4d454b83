"""Starting the agent where it cannot run: a data dir another agent holds, a port in use,
a damaged state file. Each refusal is one line on stderr that names what is in the way
(the directory and the PID holding it; the role, address, port and the PID holding it;
the file), with a non-zero exit, and nothing of the refused agent is left behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.agent import REPO, AgentProcess, free_port
from tests.integration.conftest import StartAgent, stop_and_check

START_TIMEOUT = 20.0


def refused(
    agent: AgentProcess, timeout: float = START_TIMEOUT, everything: list[str] | None = None
) -> tuple[int, list[str], float]:
    """Run the agent to its exit: (exit status, stderr's `mesh agent:` lines, seconds);
    `everything` gets every line it wrote."""
    started = time.monotonic()
    try:
        proc = subprocess.run(
            agent.argv(),
            capture_output=True,
            timeout=timeout,
            check=False,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            cwd=REPO,
        )
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
    start_agent: StartAgent,
) -> None:
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
    assert output == [
        f"mesh agent: data dir {first.data_dir} is in use by PID {first.proc.pid} (lock {lock})"
    ]
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


# -- a port in use ----------------------------------------------------------------------


@pytest.fixture
def holder() -> Iterator[list[socket.socket]]:
    """Sockets this test process holds in the agent's way (so the holder is our PID)."""
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def occupy(held: list[socket.socket], protocol: str, port: int) -> None:
    sock = socket.socket(
        socket.AF_INET, socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    )
    held.append(sock)
    sock.bind(("127.0.0.1", port))
    if protocol == "tcp":
        sock.listen()


@pytest.mark.parametrize(
    ("role", "protocol", "workers"),
    [
        ("api", "tcp", 0),
        ("dns", "udp", 0),
        ("dns", "tcp", 0),
        ("gossip", "udp", 0),
        ("gossip", "tcp", 0),
        ("http", "tcp", 0),
        ("http", "tcp", 1),
        ("https", "tcp", 0),
        ("https", "tcp", 1),
    ],
)
def test_a_port_in_use_is_named_with_its_holder(
    tmp_path: Path, holder: list[socket.socket], role: str, protocol: str, workers: int
) -> None:
    https_port = free_port()
    agent = AgentProcess(
        tmp_path / "data",
        extra=["--https", f"127.0.0.1:{https_port}", "--http-workers", str(workers)],
    )
    port = {
        "api": agent.port,
        "dns": agent.dns_port,
        "gossip": agent.gossip_port,
        "http": agent.http_port,
        "https": https_port,
    }[role]
    occupy(holder, protocol, port)
    code, lines, elapsed = refused(agent)
    print(f"{role} {protocol} workers={workers}: exit {code} in {elapsed:.2f}s: {lines}")
    assert code == 1
    me = Path("/proc/self/comm").read_text().strip()
    assert lines == [
        f"mesh agent: {role} 127.0.0.1:{port} is in use by PID {os.getpid()} "
        f"({me}) on {protocol} 127.0.0.1:{port}"
    ]


def test_a_published_port_in_use_at_start_names_its_holder(
    start_agent: StartAgent, holder: list[socket.socket]
) -> None:
    """The userspace load balancer binds published ports at start; one in use does not
    stop the agent (the others still serve), but is reported naming its holder."""
    agent = start_agent()
    port = free_port()
    assert (
        agent.request(
            "POST",
            "/v1/services",
            {"name": "web", "ports": [{"target_port": 80, "published_port": port}]},
        )[0]
        == 201
    )
    assert agent.stop() == 0
    occupy(holder, "tcp", port)
    agent.start()
    status, lb = agent.request("GET", "/v1/lb")
    assert status == 200
    reason = lb["unbound"][f"tcp/0.0.0.0:{port}"]
    print(f"unbound: {reason}")
    assert reason.startswith(f"cannot listen on 127.0.0.1:{port}: in use by PID {os.getpid()}")
    assert f"on tcp 127.0.0.1:{port}" in reason
    assert f"in use by PID {os.getpid()}" in agent.log()


# -- a damaged state file ------------------------------------------------------------


def test_a_zero_byte_state_db_is_refused_and_left_as_found(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    state = data / "state.db"
    state.touch()
    code, lines, _ = refused(AgentProcess(data))
    print(lines)
    assert code == 1
    assert lines == [
        f"mesh agent: cannot read state in {state}: the file is empty (0 bytes); "
        "restore it, or move it away to start with an empty state"
    ]
    assert state.stat().st_size == 0  # not written to: still there to be examined
    # Moved away as told: the agent starts, empty.
    state.rename(data / "state.db.broken")
    agent = AgentProcess(data).start()
    try:
        assert [s for s in agent.request("GET", "/v1/services")[1]] == []
    finally:
        stop_and_check(agent)


def test_other_damage_is_refused_the_same_way(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    state = data / "state.db"
    state.write_bytes(b"not a database at all, " * 200)
    code, lines, _ = refused(AgentProcess(data))
    print(lines)
    assert code == 1
    assert lines == [f"mesh agent: cannot read state in {state}: file is not a database"]

    # A write-ahead log without its database is not replayed onto a new, empty one.
    state.unlink()
    wal = data / "state.db-wal"
    wal.write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 28)
    code, lines, _ = refused(AgentProcess(data))
    print(lines)
    assert code == 1
    assert len(lines) == 1 and str(state) in lines[0] and "state.db-wal" in lines[0]
    assert not state.exists()


def test_a_fresh_data_dir_starts_with_a_whole_state_db(start_agent: StartAgent) -> None:
    agent = start_agent()
    assert (agent.data_dir / "state.db").stat().st_size > 0
    assert not (agent.data_dir / "state.db.new").exists()

"""What the benchmarks that run a real `mesh agent` share: free loopback ports, the API
over plain HTTP, starting and stopping processes, and CPU time from /proc.

benchmarks/ is not a package: each benchmark runs as a script, with its own directory
first on sys.path, and imports this module as `common`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0  # seconds for a server started by a benchmark to answer


def without_sandboxes() -> list[str]:
    """The prefix that starts an agent without CAP_SYS_ADMIN when run as root: with it the
    agent would make its ingress overlay (a bridge and a VXLAN device) in the host's own
    namespace, and those are durable, so they would outlive the benchmark."""
    return ["setpriv", "--bounding-set", "-sys_admin"] if os.geteuid() == 0 else []


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (DNS listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port: int = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (the agent's DNS workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / CLK_TCK


def run_seconds(pids: Sequence[int]) -> float:
    """Time on a CPU of these processes' live threads, in seconds, from schedstat (ns):
    an idle process uses a few ms a second, which utime + stime's 10 ms ticks only
    count coarsely (a thread that has exited is not counted: for idle windows)."""
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


def api(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://{HOST}:{port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def wait_for_api(proc: subprocess.Popen[bytes], port: int) -> bool:
    """True once the API answers; False if the agent exited first."""
    deadline = time.monotonic() + START_TIMEOUT
    while proc.poll() is None:
        try:
            if api(port, "GET", "/v1/health")[0] == 200:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError("the agent did not start")
        time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

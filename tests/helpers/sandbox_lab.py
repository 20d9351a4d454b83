"""One test node for sandboxes: a namespace with a real agent inside, and an outside.

`SandboxNode` makes (under a unique prefix, all removed by `close()` however
the test ends):

- a node namespace `<prefix>-node`, where the agent runs: started with
  `nsenter --net=/run/netns/<node>` (never `ip netns exec`: the sandboxes it
  mounts under /run/netns must be visible to the CLI and to `ip netns exec`),
  `--lb nftables`, its API on the node's 127.0.0.1:2377, the HRM on :80;
- an outside namespace `<prefix>-out` (198.51.100.2) on a veth to the node
  (198.51.100.1, the node's default route), standing for the world beyond:
  a network that is not `--internal` reaches it through the masquerade;
- a `mesh` on PATH (a wrapper of `python -m mesh`) for commands run inside.

The node's name is unique per node (`t15cli-<pid>-<tag>`), so the agent's
sandbox prefix (`mp-<node id>-`) is too; `close()` kills every process the lab's
commands started that is still alive (found by the `MESH_TEST_LAB` variable in
their environment: detached task commands too, even in a namespace no longer
named), stops the agent, and removes any sandbox namespace with that prefix that
is left, then the namespaces of the lab.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mesh.sandbox.names import netns_prefix
from tests.helpers.netns import NETNS_ETC, NETNS_RUN, Lab, Netns, _kill_all

REPO = Path(__file__).resolve().parents[2]
IDENT_SERVER = REPO / "tests" / "helpers" / "ident_http.py"
API = "127.0.0.1:2377"
NODE_UPLINK = "198.51.100.1"
OUTSIDE = "198.51.100.2"
#: the environment variable that marks the processes a lab started
LAB_MARK = "MESH_TEST_LAB"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SandboxNode:
    def __init__(self, workdir: Path | None = None) -> None:
        # Not pytest's tmp_path by default: pytest keeps only the last three base
        # temp dirs, so a run of another suite on the machine can delete the
        # agent's data dir under it (and the agent then stops).
        self._own_workdir = workdir is None
        workdir = Path(tempfile.mkdtemp(prefix="t15cli-")) if workdir is None else workdir
        self.workdir = workdir
        self.lab = Lab("t15cli")
        self.agent: subprocess.Popen[bytes] | None = None
        try:
            self.node = self.lab.namespace("node")
            self.outside = self.lab.namespace("out")
            self.lab.veth(self.node, "up0", self.outside, "eth0")
            self.node.add_address("up0", f"{NODE_UPLINK}/24")
            self.outside.add_address("eth0", f"{OUTSIDE}/24")
            self.node.add_route("default", OUTSIDE)
        except BaseException:
            self.lab.close()
            raise
        self.name = f"t15cli-{os.getpid()}-{self.lab.tag}"
        self.prefix = netns_prefix(self.name)
        self.netns_path = str(NETNS_RUN / self.node.name)
        self.data_dir = workdir / "data"
        self.log_path = workdir / "agent.log"
        self.bin = workdir / "bin"
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "mesh"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m mesh "$@"\n')
        wrapper.chmod(0o755)
        self.env = {
            "PATH": f"{self.bin}:{PATH}",
            "PYTHONPATH": str(REPO),
            "MESH_API": API,
            "HOME": str(workdir),
            # inherited by every command run through the CLI (task commands too): how
            # close() finds what is left of them
            LAB_MARK: self.name,
        }
        self.started: list[subprocess.Popen[Any]] = []
        #: the agent's --dns-upstream (port 9 of loopback: nothing is ever forwarded out)
        self.dns_upstream = "127.0.0.1:9"

    # -- the agent -----------------------------------------------------------------

    def agent_argv(self) -> list[str]:
        return [
            "nsenter",
            f"--net={self.netns_path}",
            "--",
            sys.executable,
            "-m",
            "mesh",
            "agent",
            "--node-name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--api",
            API,
            "--lb",
            "nftables",
            "--dns",
            "127.0.0.1:53",
            "--dns-upstream",
            self.dns_upstream,
            "--http",
            "0.0.0.0:80",
            "--advertise",
            f"{NODE_UPLINK}:7946",
            "--drain-grace",
            "0.2",
        ]

    def start_agent(self, timeout: float = 30.0) -> None:
        with self.log_path.open("ab") as log:
            self.agent = subprocess.Popen(
                self.agent_argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
                cwd=REPO,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.agent.poll() is not None:
                raise RuntimeError(f"the agent exited:\n{self.log()}")
            try:
                self.api("GET", "/v1/agent")
                return
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the agent's API does not answer:\n{self.log()}") from None
                time.sleep(0.1)

    def kill_agent(self) -> None:
        """kill -9: nothing is cleaned up by the agent."""
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGKILL)
            self.agent.wait(10)

    def stop_agent(self) -> None:
        if self.agent is None or self.agent.poll() is not None:
            return
        self.agent.send_signal(signal.SIGTERM)
        try:
            self.agent.wait(15)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def api(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        def call() -> Any:
            data = None if body is None else json.dumps(body).encode()
            req = urllib.request.Request(
                f"http://{API}{path}",
                data=data,
                method=method,
                headers={"Content-Type": "application/json"},
            )
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(req, timeout=timeout) as resp:
                raw = resp.read()
            return json.loads(raw) if raw.strip() else None

        return self.node.call(call)

    # -- commands inside the node ------------------------------------------------------

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.argv(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=REPO,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr}{done.stdout}"
            )
        return done

    def mesh(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`mesh ARGS` run inside the node (exit status not checked)."""
        return self.run(["mesh", *args], timeout=timeout)

    def mesh_ok(self, *args: str, timeout: float = 60.0) -> str:
        return self.run(["mesh", *args], timeout=timeout, check=True).stdout

    def mesh_json(self, *args: str, timeout: float = 60.0) -> Any:
        out = self.mesh_ok("--json", *args, timeout=timeout)
        return json.loads(out) if out.strip() else None

    def popen_mesh(self, *args: str, **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(self.argv(["mesh", *args]), env=self.env, cwd=REPO, **kwargs)
        self.started.append(proc)
        return proc

    def serve(self, service: str, ident: str, port: int = 80) -> dict[str, Any]:
        """A detached sandboxed task of `service` answering `ident` on `port`; its record."""
        task: dict[str, Any] = self.mesh_json(
            "task",
            "run",
            service,
            "--detach",
            "--name",
            ident,
            "--",
            sys.executable,
            str(IDENT_SERVER),
            str(port),
            ident,
        )
        return task

    def in_sandbox(
        self, netns: str, argv: Sequence[str], timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """A command inside a sandbox the way `mesh task exec` runs it (its resolv.conf too)."""
        name = Path(netns).name
        return subprocess.run(
            ["ip", "netns", "exec", name, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )

    # -- what the kernel has --------------------------------------------------------------

    def sandboxes(self) -> set[str]:
        """Our agent's sandbox namespaces (names under /run/netns)."""
        try:
            return {p.name for p in NETNS_RUN.iterdir() if p.name.startswith(self.prefix)}
        except OSError:
            return set()

    def links(self, prefix: str) -> set[str]:
        """The node's interfaces whose name starts with `prefix` (mpbr-, mpv)."""
        done = self.node.run(["ip", "-j", "link", "show"], check=True)
        names = {str(link["ifname"]) for link in json.loads(done.stdout or "[]")}
        return {n for n in names if n.startswith(prefix)}

    def processes(self) -> dict[int, tuple[list[str], str | None]]:
        """The live processes this lab's commands started: pid -> (argv, readlink of its
        ns/net). Zombies and processes that end meanwhile are left out."""
        mark = f"{LAB_MARK}={self.name}".encode()
        found: dict[int, tuple[list[str], str | None]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if mark not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                net: str | None = os.readlink(entry / "ns" / "net")
            except OSError:
                continue
            if argv and argv[-1] == "":
                argv.pop()
            if argv:  # a zombie has an empty cmdline
                found[int(entry.name)] = (argv, net)
        return found

    def ident_servers(self) -> dict[int, tuple[str, str | None]]:
        """This lab's live IDENT_SERVER processes: pid -> (ident, net link)."""
        return {
            pid: (argv[-1], net)
            for pid, (argv, net) in self.processes().items()
            if len(argv) >= 3 and argv[-3] == str(IDENT_SERVER)
        }

    def kill_leftovers(self, grace: float = 3.0) -> list[int]:
        """SIGTERM then SIGKILL to every process this lab started that is still alive."""
        own = os.getpid()
        pids = [p for p in self.processes() if p != own]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        left = pids
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = self.processes()
            left = [p for p in left if p in alive]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        errors: list[str] = []
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        for name in sorted(self.sandboxes()):
            _kill_all(Netns(name))  # the task commands left inside
        self.kill_leftovers()  # and any left outside (in a namespace no longer named)
        with contextlib.suppress(Exception):
            if self.agent is not None and self.agent.poll() is None:
                for task in self.api("GET", "/v1/tasks", timeout=10) or []:
                    with contextlib.suppress(Exception):
                        self.api("DELETE", f"/v1/tasks/{task['id']}", timeout=10)
        self.stop_agent()
        for name in sorted(self.sandboxes()):
            done = subprocess.run(
                ["ip", "netns", "delete", name], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                errors.append(f"ip netns delete {name}: {done.stderr.strip()}")
        for etc in NETNS_ETC.glob(f"{self.prefix}*") if NETNS_ETC.exists() else []:
            shutil.rmtree(etc, ignore_errors=True)
        try:
            self.lab.close()
        except RuntimeError as exc:
            errors.append(str(exc))
        if self._own_workdir and not errors:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise RuntimeError("; ".join(errors))


def wait_for(check: Callable[[], bool], timeout: float, step: float = 0.2) -> float | None:
    """Seconds until `check()` held, or None when `timeout` passed first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(step)
    return None

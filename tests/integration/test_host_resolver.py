"""`mesh agent --configure-resolver` on a real resolv.conf: the agent runs in a fresh
network namespace and a private mount namespace where /etc/resolv.conf is a temp file
bind-mounted over the host's (which is never touched); the system resolver (`getent
hosts`, glibc) then resolves a service through the agent; the file is put back byte for
byte when the agent stops, and after a kill -9 at the next start."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.agent import REPO

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("getent") is None, reason="needs root and getent"
    ),
]

ORIGINAL = "# the node's own\nsearch example.org\nnameserver 192.0.2.53\noptions edns0\n"


@contextlib.contextmanager
def netns() -> Iterator[str]:
    name = f"mesh-res-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class NodeAgent:
    """The agent as root in `ns`, with /etc/resolv.conf bind-mounted from `conf`."""

    def __init__(self, ns: str, conf: Path, data: Path, log: Path, flags: list[str]) -> None:
        agent = [
            # no CAP_SYS_ADMIN: no sandboxes (none are needed here)
            "setpriv",
            "--bounding-set",
            "-sys_admin",
            "--",
            sys.executable,
            "-m",
            "mesh",
            "agent",
            "--data-dir",
            str(data),
            "--api",
            "127.0.0.1:2377",
            "--dns",
            "127.0.0.11:53",
            "--dns-domain",
            "mesh",
            "--http",
            "none",
            "--lb",
            "userspace",
            "--address-pool",
            "127.64.0.0/12",
            "--advertise",
            "127.0.0.1:7946",
            *flags,
        ]
        script = (
            f"mount --bind {shlex.quote(str(conf))} /etc/resolv.conf && exec {shlex.join(agent)}"
        )
        argv = ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private"]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*argv, "sh", "-c", script],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                cwd=REPO,
            )
        self.log = log

    def inside(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`command` in the agent's network and mount namespaces (its resolv.conf)."""
        argv = ["nsenter", "-t", str(self.proc.pid), "-n", "-m", "--", *command]
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=30,
            check=check,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )

    def wait_healthy(self) -> float:
        started = time.monotonic()
        while time.monotonic() - started < 30:
            assert self.proc.poll() is None, self.log.read_text()
            done = self.inside(
                "curl", "-sf", "-m", "2", "http://127.0.0.1:2377/v1/health", check=False
            )
            if done.returncode == 0:
                return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(self.log.read_text())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(20)


def test_the_system_resolver_finds_a_service_through_the_agent_and_gets_its_file_back(
    tmp_path: Path,
) -> None:
    host_before = Path("/etc/resolv.conf").read_bytes()
    conf = tmp_path / "resolv.conf"
    conf.write_text(ORIGINAL)
    log = tmp_path / "agent.log"
    with netns() as ns:
        agent = NodeAgent(ns, conf, tmp_path / "data", log, ["--configure-resolver"])
        try:
            agent.wait_healthy()
            assert conf.read_text().splitlines()[1] == "nameserver 127.0.0.11"
            assert "event=host_resolver_configured mode=resolv.conf domain=mesh" in log.read_text()
            mesh = [sys.executable, "-m", "mesh"]
            agent.inside(*mesh, "network", "create", "back")
            agent.inside(*mesh, "service", "create", "web", "--network", "back")
            vips = agent.inside(*mesh, "service", "inspect", "web", "--json").stdout
            found = agent.inside("getent", "hosts", "web.mesh", check=False)
            print(f"getent hosts web.mesh -> {found.stdout.strip()!r}")
            assert found.returncode == 0, found.stderr + log.read_text()
            address = found.stdout.split()[0]
            assert address in vips
        finally:
            code = agent.stop()
        assert code == 0, log.read_text()
        assert conf.read_text() == ORIGINAL  # put back byte for byte
        assert "event=host_resolver_restored mode=resolv.conf" in log.read_text()
    assert Path("/etc/resolv.conf").read_bytes() == host_before


def test_after_a_kill_the_next_start_restores_the_file_even_without_the_flag(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(ORIGINAL)
    log = tmp_path / "agent.log"
    with netns() as ns:
        agent = NodeAgent(ns, conf, tmp_path / "data", log, ["--configure-resolver"])
        try:
            agent.wait_healthy()
        finally:
            agent.stop(signal.SIGKILL)
        assert "nameserver 127.0.0.11" in conf.read_text()  # left behind by the kill
        again = NodeAgent(ns, conf, tmp_path / "data", log, [])
        try:
            again.wait_healthy()
            assert conf.read_text() == ORIGINAL
            assert "event=host_resolver_restored mode=resolv.conf after=crash" in log.read_text()
        finally:
            assert again.stop() == 0
    assert conf.read_text() == ORIGINAL

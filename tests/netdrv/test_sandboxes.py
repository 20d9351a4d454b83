"""Named sandbox namespaces (mesh/sandbox/netns.py): real namespaces under /run/netns,
all with a prefix unique to the test, all removed afterwards."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.sandbox import names
from mesh.sandbox.netns import SandboxError, Sandboxes, is_netns
from tests.netdrv.lab import in_netns, run, skip_reason


def own_netns() -> str:
    return os.readlink(f"/proc/{os.getpid()}/ns/net")


@pytest.fixture
def sandboxes() -> Iterator[Sandboxes]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    node = f"t15drv-{os.getpid()}-{secrets.token_hex(3)}"
    made = Sandboxes(names.netns_prefix(node))
    try:
        yield made
    finally:
        for name in made.list(made.prefix):
            made.delete(name)


def test_create_makes_a_namespace_ip_netns_and_nsenter_use(sandboxes: Sandboxes) -> None:
    name = f"{sandboxes.prefix}task1"
    path = sandboxes.create(name)
    assert path == f"/run/netns/{name}" and is_netns(path)
    assert sandboxes.create(name) == path  # idempotent: the same namespace
    assert name in run(["ip", "netns", "list"]).stdout
    assert run(["ip", "netns", "exec", name, "ip", "-o", "link", "show", "lo"]).stdout
    lo = in_netns(path, ["ip", "-o", "link", "show", "lo"], check=True).stdout
    assert "UP" in lo.split(">")[0]
    own = os.readlink("/proc/self/ns/net")
    assert in_netns(path, ["readlink", "/proc/self/ns/net"], check=True).stdout.strip() != own
    assert sandboxes.list(sandboxes.prefix) == [name]


def test_create_replaces_an_empty_mountpoint_left_by_a_crash(sandboxes: Sandboxes) -> None:
    name = f"{sandboxes.prefix}crashed"
    Path(f"/run/netns/{name}").touch()
    assert not is_netns(f"/run/netns/{name}")
    assert is_netns(sandboxes.create(name))


def test_only_names_with_our_prefix_are_made_or_deleted(sandboxes: Sandboxes) -> None:
    foreign = f"t15drv-foreign-{secrets.token_hex(3)}"
    run(["ip", "netns", "add", foreign])
    try:
        with pytest.raises(SandboxError, match="not ours"):
            sandboxes.delete(foreign)
        with pytest.raises(SandboxError, match="not ours"):
            sandboxes.create(foreign)
        assert is_netns(f"/run/netns/{foreign}")
    finally:
        run(["ip", "netns", "delete", foreign], check=False)
    with pytest.raises(SandboxError, match="valid"):
        sandboxes.delete(f"{sandboxes.prefix}/../x")


def test_delete_removes_the_namespace_and_its_etc_files(sandboxes: Sandboxes) -> None:
    name = f"{sandboxes.prefix}task2"
    sandboxes.create(name)
    sandboxes.write_resolv_conf(name)
    sandboxes.delete(name)
    sandboxes.delete(name)  # idempotent
    assert not os.path.lexists(f"/run/netns/{name}")
    assert not os.path.exists(f"/etc/netns/{name}")
    assert sandboxes.list(sandboxes.prefix) == []


def test_resolv_conf_points_at_the_agent(sandboxes: Sandboxes) -> None:
    name = f"{sandboxes.prefix}task3"
    sandboxes.create(name)
    sandboxes.write_resolv_conf(name)
    sandboxes.write_resolv_conf(name)
    seen = run(["ip", "netns", "exec", name, "cat", "/etc/resolv.conf"]).stdout
    assert seen.splitlines()[0] == "nameserver 127.0.0.11"


def test_adopt_takes_a_name_or_a_process_namespace(sandboxes: Sandboxes) -> None:
    foreign = f"t15drv-adopt-{secrets.token_hex(3)}"
    run(["ip", "netns", "add", foreign])
    sleeper = subprocess.Popen(["nsenter", f"--net=/run/netns/{foreign}", "--", "sleep", "30"])
    try:
        assert sandboxes.adopt(foreign) == f"/run/netns/{foreign}"
        # nsenter execs sleep: its /proc/PID/ns/net is the namespace (as a container's is)
        proc = f"/proc/{sleeper.pid}/ns/net"
        deadline = time.monotonic() + 5
        while os.readlink(proc) == own_netns() and time.monotonic() < deadline:
            time.sleep(0.02)  # nsenter has not entered it yet
        path = sandboxes.adopt(proc)
        assert path == proc and os.stat(path).st_ino == os.stat(f"/run/netns/{foreign}").st_ino
        assert sandboxes.list(sandboxes.prefix) == []  # adopting makes nothing of ours
    finally:
        sleeper.kill()
        sleeper.wait()
        run(["ip", "netns", "delete", foreign], check=False)
    with pytest.raises(SandboxError, match="not a network namespace"):
        sandboxes.adopt("/proc/self/status")
    with pytest.raises(SandboxError, match="not a network namespace"):
        sandboxes.adopt("/proc/self/ns/mnt")
    with pytest.raises(SandboxError, match="no network namespace"):
        sandboxes.adopt(foreign)


def make_from(launcher: list[str], prefix: str, name: str) -> None:
    """Sandboxes.create run by a separate process started with `launcher`."""
    code = f"from mesh.sandbox.netns import Sandboxes; Sandboxes({prefix!r}).create({name!r})"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([*launcher, sys.executable, "-c", code], check=True, timeout=30, env=env)


def test_a_sandbox_made_inside_a_node_entered_with_nsenter_is_visible(
    sandboxes: Sandboxes,
) -> None:
    """The issue's pitfall: an agent in a node namespace entered with `nsenter --net`
    (as tests start agents) makes sandboxes the host, `ip netns exec` and the CLI use;
    one started with `ip netns exec` (a private mount namespace) would not."""
    node = f"t15drv-node-{secrets.token_hex(3)}"
    run(["ip", "netns", "add", node])
    try:
        name = f"{sandboxes.prefix}fromnode"
        make_from(["nsenter", f"--net=/run/netns/{node}", "--"], sandboxes.prefix, name)
        assert is_netns(f"/run/netns/{name}")
        assert run(["ip", "netns", "exec", name, "ip", "-o", "link", "show", "lo"]).stdout
        hidden = f"{sandboxes.prefix}hidden"
        make_from(["ip", "netns", "exec", node], sandboxes.prefix, hidden)
        assert os.path.lexists(f"/run/netns/{hidden}")  # the file, but not the mount:
        assert not is_netns(f"/run/netns/{hidden}")  # nobody outside can use it
    finally:
        run(["ip", "netns", "delete", node], check=False)

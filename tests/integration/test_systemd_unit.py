"""deploy/meshplane.service: systemd's own checkers, and the agent under the unit's limits.

`systemd-analyze verify` and `systemd-analyze security --offline=true` (systemd
>= 252) read the unit file without a running systemd. No systemd runs as PID 1
here, so the unit's constraints on the process are applied by hand where Linux
offers them outside systemd: the user, exactly the unit's capabilities (ambient,
bounding set), no new privileges (setpriv), MemoryDenyWriteExecute (the kernel's
own PR_SET_MDWE, 6.3+), UMask=0077, and the Type=notify handshake on a socket the
test binds. What is left to systemd itself (the mount namespace of
ProtectSystem=strict, the system-call filter) is checked only by the analyzers.
"""

from __future__ import annotations

import configparser
import ctypes
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers.agent import REPO, AgentProcess

UNIT = REPO / "deploy" / "meshplane.service"
#: the worst exposure `systemd-analyze security` may report ("OK" ends at 4.9)
EXPOSURE_GOAL = 4.9
NOBODY = 65534
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def _harness() -> ModuleType:
    """deploy/netns_cluster.py: its RunAs is how the e2e tests start the unit's user."""
    if "netns_cluster" in sys.modules:  # loaded by tests/e2e/conftest.py already
        return sys.modules["netns_cluster"]
    spec = importlib.util.spec_from_file_location(
        "netns_cluster", REPO / "deploy" / "netns_cluster.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["netns_cluster"] = module
    spec.loader.exec_module(module)
    return module


def unit_settings() -> dict[str, list[str]]:
    """Every `Key=value` of the [Service] section, repeated keys kept in order."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return tool


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit, with ExecStart's `mesh` pointing at this checkout's venv: `verify`
    checks that the command exists, and /usr/local/bin/mesh is not installed here."""
    mesh = Path(sys.executable).parent / "mesh"
    if not mesh.exists():
        pytest.skip(f"no {mesh} (the venv's console script) to stand for /usr/local/bin/mesh")
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/mesh ", f"ExecStart={mesh} ")
    copy = tmp_path / "meshplane.service"
    copy.write_text(text)
    return copy


def test_systemd_analyze_verify_passes(unit_copy: Path) -> None:
    done = subprocess.run(
        [systemd_analyze(), "verify", str(unit_copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify prints a line per problem (unknown key, bad value, missing command).
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_the_sandbox_drop_in_is_read_without_a_complaint(unit_copy: Path) -> None:
    """deploy/meshplane-sandboxes.conf next to the unit, as systemctl edit puts it: every
    line parses (an empty boolean would be "Failed to parse ..., ignoring")."""
    drop_ins = unit_copy.parent / "meshplane.service.d"
    drop_ins.mkdir()
    shutil.copy(REPO / "deploy" / "meshplane-sandboxes.conf", drop_ins / "sandboxes.conf")
    tool = systemd_analyze()
    done = subprocess.run(
        [tool, "verify", str(unit_copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    scored = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(unit_copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert scored.stderr.strip() == "", scored.stderr
    # The drop-in was read: the agent runs as root with it.
    assert re.search(r"✗ User=/DynamicUser=\s+Service runs as root", scored.stdout), scored.stdout
    overall = [line for line in scored.stdout.splitlines() if "Overall exposure" in line]
    print(f"\nwith the sandbox drop-in: {overall}")


def test_systemd_analyze_security_scores_ok_or_better(unit_copy: Path) -> None:
    tool = systemd_analyze()
    helped = subprocess.run([tool, "security", "--help"], capture_output=True, text=True)
    if "--offline" not in helped.stdout:
        pytest.skip("systemd-analyze security --offline needs systemd >= 252")
    done = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(unit_copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", done.stdout)
    assert found is not None, done.stdout + done.stderr
    score, level = float(found.group(1)), found.group(2)
    left = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("✗")]
    print(f"\nsystemd-analyze security: {score} {level}; still exposed: {' '.join(left)}")
    assert level in ("PERFECT", "SAFE", "OK"), done.stdout
    assert score <= EXPOSURE_GOAL


def test_the_unit_grants_what_the_e2e_test_runs_the_agent_with() -> None:
    """The routing-mesh e2e runs its agents with `RunAs(..., UNIT_CAPS)`: the same
    capabilities as the unit, so that test stands for the unit."""
    settings = unit_settings()
    granted = {f"CAP_{cap.upper()}" for cap in _harness().UNIT_CAPS}
    assert set(settings["AmbientCapabilities"][0].split()) == granted
    assert set(settings["CapabilityBoundingSet"][0].split()) == granted
    assert settings["Type"] == ["notify"]
    assert settings["User"] == ["meshplane"] and settings["DynamicUser"] == ["no"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert "--data-dir /var/lib/meshplane" in settings["ExecStart"][0]
    assert settings["StateDirectory"] == ["meshplane"]
    assert settings["LimitNOFILE"] == ["1048576"]


def service_user(caps: tuple[str, ...]) -> object:
    """The RunAs of the unit's user (nobody here); skips where it cannot run the agent."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to become the service user")
    harness = _harness()
    run_as = harness.RunAs(NOBODY, NOBODY, caps)
    try:
        run_as.python()
    except harness.ClusterError as exc:
        pytest.skip(f"uid {NOBODY} cannot run the agent here: {exc}")
    return run_as


def _mdwe_supported() -> bool:
    """Whether this kernel has PR_SET_MDWE (Linux 6.3): asked of a child, since it
    cannot be undone."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ctypes,sys; libc=ctypes.CDLL(None, use_errno=True); "
            f"sys.exit(0 if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0 "
            "else 1)",
        ],
        check=False,
    )
    return done.returncode == 0


def free_low_ports(count: int) -> list[int]:
    """Ports below 1024 free on 127.0.0.1 for both TCP and UDP (root binds them to see)."""
    found: list[int] = []
    for port in range(990, 900, -1):
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        found.append(port)
        if len(found) == count:
            return found
    pytest.skip("no free port below 1024 on 127.0.0.1")


def wait_for_answer(port: int, timeout: float) -> bytes:
    """The first bytes the HRM on 127.0.0.1:`port` answers a request for an unknown host."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: nobody.example\r\n\r\n")
                return conn.recv(64)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                return b"refused"
            time.sleep(0.1)


class UnitAgent(AgentProcess):
    """An agent started under the unit's limits, as far as they apply without systemd."""

    def __init__(
        self, data_dir: Path, run_as: object, notify: str, extra: list[str] | None = None
    ) -> None:
        # No test keyring (root's, 0600): like the unit's first start, the agent makes its
        # own in the data dir it owns.
        super().__init__(data_dir, node_name="unit-1", extra=extra, shared_key=False)
        self.run_as = run_as
        self.notify = notify

    def argv(self) -> list[str]:
        argv = super().argv()
        python = argv.index(sys.executable)
        run_as = self.run_as
        return [*run_as.prefix(), *run_as.python(), *argv[python + 1 :]]  # type: ignore[attr-defined]

    def spawn(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), NOTIFY_SOCKET=self.notify)
        env["WATCHDOG_USEC"] = "30000000"  # WatchdogSec=30

        def limits() -> None:
            # MemoryDenyWriteExecute=yes, UMask=0077
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")
            os.umask(0o077)

        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd="/",
                preexec_fn=limits,
            )


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the service user can reach (pytest's own tmp is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="meshplane-unit-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def notify(shared_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = shared_dir / "notify"
    sock.bind(str(path))
    os.chmod(path, 0o777)  # the service user sends to it, as to systemd's socket
    yield sock, str(path)
    sock.close()


@pytest.mark.root
def test_the_agent_serves_under_the_units_limits(
    shared_dir: Path, notify: tuple[socket.socket, str]
) -> None:
    run_as = service_user(_harness().UNIT_CAPS)
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+): MemoryDenyWriteExecute")
    data_dir = shared_dir / "data"
    data_dir.mkdir(mode=0o700)
    os.chown(data_dir, NOBODY, NOBODY)  # StateDirectory= makes it the user's
    sock, path = notify
    # DNS and the HRM on ports below 1024, each with worker processes of its own: they
    # bind their SO_REUSEPORT sockets with the capability they inherit (ambient).
    dns_port, http_port = free_low_ports(2)
    low = ["--dns", f"127.0.0.1:{dns_port}", "--dns-workers", "1"]
    low += ["--http", f"127.0.0.1:{http_port}", "--http-workers", "1"]
    agent = UnitAgent(data_dir, run_as, path, low)
    agent.spawn()
    try:
        sock.settimeout(60)
        try:
            ready = sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no READY=1 in 60 s: {agent.log()}") from None
        assert ready.splitlines()[0] == "READY=1", ready + agent.log()
        assert agent.request("GET", "/v1/health", timeout=5)[0] == 200
        # READY=1 waited for the HRM's worker: it answers at once, on the low port.
        answer = wait_for_answer(http_port, 0)
        assert answer.startswith(b"HTTP/1.1 404"), (answer, agent.log())
        # It works as usual: a service, a task, its VIP in the userspace LB.
        status, body = agent.request("POST", "/v1/services", {"name": "web"})
        assert status == 201, body
        status, body = agent.request("POST", "/v1/services/web/tasks", {"address": "127.0.0.1"})
        assert status == 201, body
        info = agent.request("GET", "/v1/agent")[1]
        assert info["capabilities"]["effective"] == ["CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN"]
        lines = [line for line in agent.log().splitlines() if "capability_missing" in line]
        print("\n" + "\n".join(lines))
        assert len(lines) == 1 and "capability=CAP_SYS_ADMIN" in lines[0]
        # Everything the agent made in its data dir is the user's, and private to it.
        made = [data_dir, *data_dir.iterdir()]
        assert {p.stat().st_uid for p in made} == {NOBODY}
        assert all(p.stat().st_mode & 0o077 == 0 for p in made), [
            (p.name, oct(p.stat().st_mode)) for p in made
        ]
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        sock.settimeout(10)
        message = sock.recv(4096).decode()
        while message == "WATCHDOG=1":
            message = sock.recv(4096).decode()
        assert message.startswith("STOPPING=1"), message
        assert agent.proc.wait(15) == 0, agent.log()
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.kill()


@pytest.mark.root
def test_without_cap_net_bind_service_a_low_port_is_refused_at_start(shared_dir: Path) -> None:
    """The unit less CAP_NET_BIND_SERVICE, the HRM asked on a port below 1024: one
    capability line naming the listener, then a start refused in one line."""
    run_as = service_user(("net_admin",))
    data_dir = shared_dir / "data"
    data_dir.mkdir(mode=0o700)
    os.chown(data_dir, NOBODY, NOBODY)
    (http_port,) = free_low_ports(1)
    agent = UnitAgent(data_dir, run_as, "", ["--http", f"127.0.0.1:{http_port}"])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        agent.argv(), capture_output=True, text=True, env=env, cwd="/", timeout=60, check=False
    )
    lines = [line for line in done.stderr.splitlines() if "capability_missing" in line]
    print("\n" + "\n".join([*lines, done.stderr.splitlines()[-1]]))
    assert done.returncode == 1, done.stderr
    assert any(
        "capability=CAP_NET_BIND_SERVICE" in line and f"http 127.0.0.1:{http_port}" in line
        for line in lines
    ), lines
    assert done.stderr.splitlines()[-1] == (
        f"mesh agent: http 127.0.0.1:{http_port} cannot be bound: Permission denied "
        "(ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    )

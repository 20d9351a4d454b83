"""The built wheel in a fresh venv, and the container image's entrypoint run as the image
runs it, without the image (no base image can be pulled here).

The module builds what the Containerfile's second stage holds, on the host: the wheel
(`pip wheel`, as stage 1), a fresh venv of the system Python with the wheel installed
(its dependencies from the registry), the interpreter copy `mesh-python` with the file
capabilities the Containerfile gives it, the entrypoint and the image's config file.
Then the entrypoint runs as uid 10001 (the image's USER) with a bounding set of exactly
the image's two capabilities and nothing inheritable or ambient (`setpriv`), in a fresh
network namespace and a private mount namespace where the root and the image are
read-only and the data dir is a tmpfs (the VOLUME), and it must answer /v1/health,
through curl and through the Containerfile's own HEALTHCHECK command.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import REPO

pytestmark = pytest.mark.slow

IMAGE_UID = 10001
#: CAP_NET_BIND_SERVICE (10) and CAP_NET_ADMIN (12), as /proc/PID/status shows them
IMAGE_CAPS = (1 << 10) | (1 << 12)
SYSTEM_PYTHON = "/usr/bin/python3"
CONTAINER = REPO / "deploy" / "container"


def run(argv: list[str], timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    assert done.returncode == 0, (
        f"{shlex.join(argv)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    return done


@pytest.fixture(scope="module")
def image_root() -> Iterator[Path]:
    """A directory laid out as the image's second stage (its own root for /opt, /etc,
    /usr/local/bin and /var/lib/meshplane), readable by the image's user."""
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip("needs the system python3 with venv (python3-venv)")
    root = Path(tempfile.mkdtemp(prefix="mesh-image-"))
    root.chmod(0o755)
    try:
        started = time.monotonic()
        wheels = root / "wheels"
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)])
        built = time.monotonic()
        venv = root / "opt" / "meshplane"
        run([SYSTEM_PYTHON, "-m", "venv", str(venv)])
        (wheel,) = wheels.glob("meshplane-*.whl")
        run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], cwd="/")
        print(
            f"\nwheel built in {built - started:.1f} s, installed with its dependencies "
            f"in {time.monotonic() - built:.1f} s"
        )
        for directory in ("etc/meshplane", "usr/local/bin", "var/lib/meshplane"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        shutil.copy(CONTAINER / "agent.toml", root / "etc/meshplane/agent.toml")
        shutil.copy(CONTAINER / "entrypoint.sh", root / "usr/local/bin/meshplane-entrypoint")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def clean_env(root: Path) -> dict[str, str]:
    """What the image's process sees: no PYTHONPATH, nothing of this checkout."""
    return {
        "PATH": f"{root}/opt/meshplane/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/nonexistent",
    }


def test_pip_install_of_the_wheel_gives_a_working_mesh(image_root: Path) -> None:
    mesh = image_root / "opt/meshplane/bin/mesh"
    version = run([str(mesh), "--version"], env=clean_env(image_root), cwd="/").stdout.strip()
    assert version == "mesh 0.1.0", version
    help_text = run([str(mesh), "agent", "--help"], env=clean_env(image_root), cwd="/").stdout
    assert "--join" in help_text and "--data-dir" in help_text
    # It is the installed copy that ran, not this checkout.
    where = run(
        [str(image_root / "opt/meshplane/bin/python"), "-c", "import mesh; print(mesh.__file__)"],
        env=clean_env(image_root),
        cwd="/",
    ).stdout
    assert where.startswith(str(image_root / "opt/meshplane/lib")), where
    print(version)


@pytest.fixture
def capped_python(image_root: Path) -> Path:
    """The Containerfile's setcap step, as it is written there."""
    if os.geteuid() != 0 or not shutil.which("setcap") or not shutil.which("setpriv"):
        pytest.skip("needs root, setcap and setpriv")
    venv = image_root / "opt/meshplane"
    copy = venv / "bin/mesh-python"
    if not copy.exists():
        shutil.copy(os.path.realpath(venv / "bin/python"), copy)
    (step,) = [
        part.strip()
        for part in (CONTAINER / "Containerfile").read_text().replace("\\\n", " ").split("&&")
        if part.strip().startswith("setcap") and "mesh-python" in part
    ]
    argv = shlex.split(step.replace("/opt/meshplane", str(venv)))
    run(argv)
    print(run(["getcap", str(copy)]).stdout.strip())
    return copy


@contextlib.contextmanager
def netns() -> Iterator[str]:
    name = f"mesh-img-{uuid.uuid4().hex[:8]}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def as_image_user(caps: str) -> list[str]:
    """uid/gid 10001, no supplementary groups, the bounding set `caps`, nothing
    inheritable (so nothing ambient): what a container runtime gives the image's USER
    with cap_drop ALL + cap_add."""
    return [
        "setpriv",
        f"--reuid={IMAGE_UID}",
        f"--regid={IMAGE_UID}",
        "--clear-groups",
        f"--bounding-set=-all,{caps}",
        "--inh-caps=-all",
        "--",
    ]


def in_container(ns: str, root: Path, command: list[str]) -> list[str]:
    """`command` in the netns, in a private mount namespace where / and the image are
    read-only and the data dir is a fresh tmpfs owned by the image's user."""
    data = root / "var/lib/meshplane"
    script = " && ".join(
        [
            # remount,bind changes this namespace's copy of the mount only
            "mount -o remount,bind,ro /",
            f"mount --bind {root} {root}",
            f"mount -o remount,bind,ro {root}",
            f"mount -t tmpfs -o mode=0750,uid={IMAGE_UID},gid={IMAGE_UID},size=64m tmpfs {data}",
            "exec " + shlex.join(command),
        ]
    )
    return [
        "ip",
        "netns",
        "exec",
        ns,
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
    ]


def capabilities(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return {
        "uid": int(fields["Uid"].split()[1]),
        **{k: int(fields[k].strip(), 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")},
    }


def healthcheck_argv(root: Path) -> list[str]:
    """The Containerfile's HEALTHCHECK CMD, with the image's paths under `root`."""
    import yaml

    text = (CONTAINER / "Containerfile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK"))
    argv = yaml.safe_load(line.split(" CMD ", 1)[1].strip())
    return [a.replace("/opt/meshplane", f"{root}/opt/meshplane") for a in argv]


@pytest.mark.root
def test_the_entrypoint_runs_the_agent_as_the_image_user_with_only_its_file_caps(
    image_root: Path, capped_python: Path
) -> None:
    entrypoint = str(image_root / "usr/local/bin/meshplane-entrypoint")
    env = {
        **clean_env(image_root),
        "MESHPLANE_HOME": str(image_root / "opt/meshplane"),
        "MESHPLANE_CONFIG": str(image_root / "etc/meshplane/agent.toml"),
    }
    data = image_root / "var/lib/meshplane"
    log_path = Path(tempfile.mkdtemp(prefix="mesh-image-log-")) / "agent.log"
    with netns() as ns:
        argv = in_container(
            ns,
            image_root,
            [
                *as_image_user("+net_admin,+net_bind_service"),
                entrypoint,
                "--data-dir",
                str(data),
                "--node-name",
                "image-1",
                "--advertise",
                "127.0.0.1:7946",
            ],
        )
        with log_path.open("wb") as log:
            agent = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/")
        try:
            started = time.monotonic()
            curl = ["ip", "netns", "exec", ns, "curl", "-sf", "-m", "2"]
            health = [*curl, "http://127.0.0.1:2377/v1/health"]
            while subprocess.run(health, capture_output=True, check=False).returncode != 0:
                assert agent.poll() is None, log_path.read_text()
                assert time.monotonic() - started < 60, log_path.read_text()
                time.sleep(0.2)
            took = time.monotonic() - started
            print(f"/v1/health answered {took:.2f} s after the entrypoint started")
            # The exec chain ends in the agent itself: it is this process.
            caps = capabilities(agent.pid)
            print({k: hex(v) if k != "uid" else v for k, v in caps.items()})
            assert caps["uid"] == IMAGE_UID
            assert caps["CapEff"] == caps["CapPrm"] == IMAGE_CAPS  # from the file, nothing else
            assert caps["CapBnd"] == IMAGE_CAPS and caps["CapAmb"] == 0
            log = log_path.read_text()
            print(next(line for line in log.splitlines() if "lb_backend_chosen" in line))
            # Privileged ports bound with CAP_NET_BIND_SERVICE from the file capabilities.
            assert "event=dns_listening address=127.0.0.12:53" in log, log
            assert "event=http_listening address=0.0.0.0:80" in log, log
            # The image's own HEALTHCHECK, as the image's user without capabilities.
            probe = [
                "ip",
                "netns",
                "exec",
                ns,
                *as_image_user("-all")[:-1],
                "--",
                *healthcheck_argv(image_root),
            ]
            done = subprocess.run(probe, capture_output=True, text=True, env=env, check=False)
            assert done.returncode == 0, done.stderr
            # The agent works: a service published through the routing mesh answers.
            mesh = ["ip", "netns", "exec", ns, str(image_root / "opt/meshplane/bin/mesh")]
            run([*mesh, "service", "create", "web", "--publish", "8080:9"], env=env)
            services = run([*mesh, "service", "ls", "--json"], env=env).stdout
            assert '"web"' in services
        finally:
            if agent.poll() is None:
                agent.terminate()
            code = agent.wait(20)
            print(log_path.read_text()[-2000:] if code not in (0, -15) else "")
            shutil.rmtree(log_path.parent, ignore_errors=True)
        assert code == 0, log_path.name


@pytest.mark.root
def test_the_image_interpreter_cannot_start_without_both_caps_in_the_bounding_set(
    image_root: Path, capped_python: Path
) -> None:
    """The Containerfile's warning holds: file capabilities beyond the bounding set make
    exec fail (cap_add must list both), rather than run with less."""
    with netns() as ns:
        argv = in_container(
            ns, image_root, [*as_image_user("+net_admin"), str(capped_python), "-c", "print(1)"]
        )
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    print(done.returncode, done.stderr.strip())
    assert done.returncode != 0
    assert "Operation not permitted" in done.stderr

"""The README's run command (`make run`) brings up an agent, as root and as a plain user."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.agent import REPO, free_port

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def _as_nobody(argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def _run_until_healthy(
    argv: list[str], env: dict[str, str], port: int, timeout: float = 30
) -> float:
    """Start `argv`, wait for GET /v1/health, stop it with SIGTERM; return seconds to healthy."""
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/v1/health", timeout=1
                ) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except OSError:
                time.sleep(0.1)
            if proc.poll() is not None:
                break
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=15)[0].decode(errors="replace")
        raise AssertionError(f"no answer on /v1/health: {output}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # make and the agent it started
            code = proc.wait(15)
            assert code in (0, 2, -signal.SIGTERM), f"the agent did not stop cleanly: {code}"
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def user_home() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="mesh-home-"))
    os.chown(home, NOBODY, NOBODY)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_make_run_as_root(tmp_path: Path) -> None:
    port = free_port()
    took = _run_until_healthy(
        [
            # Root without CAP_SYS_ADMIN: the agent runs as the README says but makes no
            # sandbox, so no ingress overlay (bridge, VXLAN device, nftables table) in
            # the machine's own namespace, where no test may leave one.
            "setpriv",
            "--bounding-set",
            "-sys_admin",
            "--",
            "make",
            "--no-print-directory",
            "run",
            f"ARGS=--api 127.0.0.1:{port} --data-dir {tmp_path / 'data'}",
        ],
        dict(os.environ),
        port,
    )
    print(f"\nroot: /v1/health answered {took:.2f}s after make run")


def _copy_checkout(dest: Path) -> None:
    """The files a fresh clone has (tracked, plus new ones not ignored), owned by nobody."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    for path in [dest, *dest.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)


@needs_root
@pytest.mark.slow
def test_make_run_as_unprivileged_user(user_home: Path) -> None:
    """A plain user's own checkout: `make run` builds its venv and runs on the user defaults."""
    checkout = user_home / "meshplane"
    _copy_checkout(checkout)
    port = free_port()
    # The user's PATH: the system Python, not root's private interpreters.
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(user_home)}
    took = _run_until_healthy(
        _as_nobody(
            [
                "make",
                "--no-print-directory",
                "-C",
                str(checkout),
                "run",
                f"ARGS=--api 127.0.0.1:{port}",
            ]
        ),
        env,
        port,
        timeout=300,
    )
    # The embedded unprivileged defaults were used: the state went under the user's home.
    assert (user_home / ".local/state/meshplane/state.db").exists()
    print(f"\nnobody: /v1/health answered {took:.2f}s after make run (venv built first)")

"""The IPVS backend's kernel tests, run inside a VM whose kernel has ip_vs.

This machine's kernel (and CI's) has no ip_vs, so `test_ipvs_backend.py` would
only skip here. This test boots a stock Debian kernel under qemu with the
shared `ipvs-vm` tool (this machine's filesystem, read-only, as its root), runs
that file there in ONE pytest call (Python is ~30x slower in the VM, so the
file is kept small and its tests whole), and passes only when every test in it
passed: none skipped, none failed. It prints the VM's pytest summary.

It skips, saying why, only where qemu cannot run; a VM that fails to boot or
a test that fails inside fails this test. Knobs: IPVS_VM_TOOL (the tool's
run-in-vm.sh), IPVS_VM_CACHE (default ~/.cache/ipvs-vm: writable, outside
/tmp, ~470 MB after the first run), and the tool's own IPVS_VM_* variables.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
INNER = "tests/kernel/test_ipvs_backend.py"
VM_TIMEOUT = 600  # seconds the tool lets the VM run (first run: +~60 s of setup before)
SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+) in [\d.]+s")


def _tool() -> Path | None:
    candidates = [
        os.environ.get("IPVS_VM_TOOL", ""),
        str(REPO.parent / "shared/tools/ipvs-vm/run-in-vm.sh"),
        "/work/shared/tools/ipvs-vm/run-in-vm.sh",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _why_qemu_cannot_run() -> str | None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            return (
                "qemu-system-x86_64 is not installed and cannot be installed here "
                "(run-in-vm.sh installs it with apt-get as root; .ci/run does too)"
            )
        return None  # run-in-vm.sh installs it
    probe = subprocess.run(
        [qemu, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        return f"qemu-system-x86_64 does not run here: {probe.stderr.strip()[:200]}"
    return None


def _collected() -> int:
    """How many tests the inner file has (collected here, where they would skip)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", INNER],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    found = re.search(r"(\d+) tests? collected", done.stdout)
    assert found, f"cannot collect {INNER}:\n{done.stdout}\n{done.stderr}"
    return int(found.group(1))


def _counts(summary: str) -> dict[str, int]:
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}


def test_ipvs_backend_on_a_real_ip_vs_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    tool = _tool()
    if tool is None:
        pytest.skip(
            "the ipvs-vm tool (run-in-vm.sh) is not beside the checkout "
            "(../shared/tools/ipvs-vm/); set IPVS_VM_TOOL to its path"
        )
    reason = _why_qemu_cannot_run()
    if reason is not None:
        pytest.skip(reason)
    expected = _collected()
    cache = Path(os.environ.get("IPVS_VM_CACHE") or Path.home() / ".cache" / "ipvs-vm")
    assert not str(cache.resolve()).startswith("/tmp/"), (
        "IPVS_VM_CACHE must be outside /tmp (the guest's /tmp is its own)"
    )
    cache.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "IPVS_VM_CACHE": str(cache),
        "IPVS_VM_TIMEOUT": os.environ.get("IPVS_VM_TIMEOUT", str(VM_TIMEOUT)),
    }
    env.pop("PYTEST_ADDOPTS", None)
    inner = f"{sys.executable} -m pytest -q -p no:cacheprovider {INNER}"
    started = time.monotonic()
    done = subprocess.run(
        [str(tool), inner],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=VM_TIMEOUT + 300,
        check=False,
    )
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if SUMMARY.match(line)]
    with capsys.disabled():
        print(
            f"\n[ipvs-vm] {INNER} in the VM: "
            f"{lines[-1].strip('= ') if lines else 'no pytest summary'} "
            f"(rc {done.returncode}, {elapsed:.0f} s with the boot)"
        )
    assert done.returncode == 0, f"run-in-vm.sh exited {done.returncode}:\n{output[-6000:]}"
    assert lines, f"no pytest summary in the VM's output:\n{output[-6000:]}"
    counts = _counts(SUMMARY.match(lines[-1]).group(1))  # type: ignore[union-attr]
    assert counts == {"passed": expected}, (
        f"expected {expected} passed, got {counts}:\n{output[-6000:]}"
    )

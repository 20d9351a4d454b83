"""Encrypted overlay IPsec on a kernel that has xfrm ESP and AES-GCM, in the VM.

This machine's kernel (and CI's) has no ESP xfrm type and no `rfc4106(gcm(aes))`,
so `test_esp_kernel.py` would only skip here. As `test_ipvs_vm.py` does for IPVS,
this test boots the stock Debian kernel under qemu with the shared `ipvs-vm`
tool, runs that file there in ONE pytest call (Python is ~30x slower in the VM,
so the file has three whole tests), and passes only when every test in it
passed: none skipped, none failed. It prints the VM's pytest summary and the
figures the inner tests print (`-rP` inside).

It skips, saying why, only where qemu cannot run (the helpers are
`test_ipvs_vm.py`'s); a VM that fails to boot or a test that fails inside fails
this test. Knobs: IPVS_VM_TOOL, IPVS_VM_CACHE (default ~/.cache/ipvs-vm), and
the tool's own IPVS_VM_* variables.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernel.test_ipvs_vm import SUMMARY, _counts, _tool, _why_qemu_cannot_run

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
INNER = "tests/kernel/test_esp_kernel.py"
VM_TIMEOUT = 420  # seconds the tool lets the VM run
FIGURE = re.compile(r"^\[esp\] .*")


def _collected() -> int:
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


def test_esp_between_two_nodes_on_a_kernel_with_xfrm_esp(
    capsys: pytest.CaptureFixture[str],
) -> None:
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
    inner = f"{sys.executable} -m pytest -q -rP -p no:cacheprovider {INNER}"
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
    figures = [line for line in done.stdout.splitlines() if FIGURE.match(line)]
    with capsys.disabled():
        print(
            f"\n[esp-vm] {INNER} in the VM: "
            f"{lines[-1].strip('= ') if lines else 'no pytest summary'} "
            f"(rc {done.returncode}, {elapsed:.0f} s with the boot)"
        )
        for figure in figures:
            print(f"[esp-vm]   {figure}")
    assert done.returncode == 0, f"run-in-vm.sh exited {done.returncode}:\n{output[-6000:]}"
    assert lines, f"no pytest summary in the VM's output:\n{output[-6000:]}"
    counts = _counts(SUMMARY.match(lines[-1]).group(1))  # type: ignore[union-attr]
    assert counts == {"passed": expected}, (
        f"expected {expected} passed, got {counts}:\n{output[-6000:]}"
    )

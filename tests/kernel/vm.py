"""One boot of the stock-kernel VM for every test that needs a kernel this one lacks.

This machine's kernel (and CI's) has no ip_vs, no 8021q and no xfrm ESP/AES-GCM,
so the files in `GUEST_FILES` would only skip here. The shared `ipvs-vm` tool
boots a stock Debian kernel under qemu (this machine's filesystem, read-only,
as its root) and runs ONE pytest call over all of them: a boot costs 30-60 s
and Python runs ~30x slower inside, so the guest files are few and whole.

Each host-side test (`test_*_vm.py`) asks `guest_results()` (run once per
pytest session, cached) and passes only when every test of its own guest file
passed there: none skipped, none failed. It skips, saying why, only where qemu
cannot run; a VM that fails to boot or a guest test that fails fails it.

The run starts in the background as soon as pytest has collected a host-side
test (`start_in_background`, called by tests/conftest.py), at the lowest CPU
priority (nice 19): the emulated kernel takes two to three minutes, and the
tests collected before tests/kernel/ (most of the suite) mostly wait on sockets
and timers, so the run costs the session almost no wall time and takes a core
from them only when it is idle. A session that ends first (a subset, `-x`)
ends the run (its process group, which the tool's trap cleans up).

Knobs: IPVS_VM_TOOL (the tool's run-in-vm.sh), IPVS_VM_CACHE (default
~/.cache/ipvs-vm: writable, outside /tmp, ~470 MB after the first run), and
the tool's own IPVS_VM_* variables.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: the guest-side files, run in one call (each host test checks its own)
GUEST_FILES = (
    "tests/kernel/test_ipvs_backend.py",
    "tests/kernel/test_esp_kernel.py",
    "tests/kernel/test_macvlan_vlan.py",
)
#: modules loaded before the command: ip_vs for the IPVS tests, 8021q for VLAN parents
PRELOAD = "ip_vs 8021q"
VM_TIMEOUT = 900  # seconds the tool lets the VM run (first run: +~60 s of setup before)
SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+) in [\d.]+s")
OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S+)")
SKIPPED = re.compile(r"^SKIPPED \[\d+\] (\S+?):\d+: (.*)")


@dataclass
class GuestRun:
    """What the one VM run gave: per test id its outcome, and the whole output."""

    returncode: int
    output: str
    seconds: float
    summary: str
    outcomes: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def tool() -> Path | None:
    candidates = [
        os.environ.get("IPVS_VM_TOOL", ""),
        str(REPO.parent / "shared/tools/ipvs-vm/run-in-vm.sh"),
        "/work/shared/tools/ipvs-vm/run-in-vm.sh",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def why_qemu_cannot_run() -> str | None:
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


def collected(guest_file: str) -> list[str]:
    """The test ids of a guest file (collected here, where they would skip)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            guest_file,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    ids = [line for line in done.stdout.splitlines() if line.startswith(f"{guest_file}::")]
    assert ids, f"cannot collect {guest_file}:\n{done.stdout}\n{done.stderr}"
    return ids


def why_the_vm_cannot_run() -> str | None:
    if tool() is None:
        return (
            "the ipvs-vm tool (run-in-vm.sh) is not beside the checkout "
            "(../shared/tools/ipvs-vm/); set IPVS_VM_TOOL to its path"
        )
    return why_qemu_cannot_run()


def skip_unless_the_vm_can_run() -> None:
    reason = why_the_vm_cannot_run()
    if reason is not None:
        pytest.skip(reason)


@dataclass
class Started:
    """The VM run under way: the tool's process and the files its output goes to."""

    process: subprocess.Popen[bytes]
    stdout: tempfile._TemporaryFileWrapper[bytes]
    stderr: tempfile._TemporaryFileWrapper[bytes]
    started: float  # wall clock (time.time), to compare with the output files' mtime


_started: Started | None = None


def start_in_background() -> None:
    """Start the one VM run now (idempotent; nothing if the VM cannot run here)."""
    global _started
    if _started is not None or os.geteuid() != 0 or why_the_vm_cannot_run() is not None:
        return
    found = tool()
    assert found is not None
    cache = Path(os.environ.get("IPVS_VM_CACHE") or Path.home() / ".cache" / "ipvs-vm")
    assert not str(cache.resolve()).startswith("/tmp/"), (
        "IPVS_VM_CACHE must be outside /tmp (the guest's /tmp is its own)"
    )
    cache.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "IPVS_VM_CACHE": str(cache),
        "IPVS_VM_TIMEOUT": os.environ.get("IPVS_VM_TIMEOUT", str(VM_TIMEOUT)),
        "IPVS_VM_PRELOAD": os.environ.get("IPVS_VM_PRELOAD", PRELOAD),
    }
    env.pop("PYTEST_ADDOPTS", None)
    # -rA: a line per test with its outcome (and the figures passing tests print)
    inner = f"{sys.executable} -m pytest -q -rA -p no:cacheprovider {' '.join(GUEST_FILES)}"
    flows = os.environ.get("MESH_IPVS_MAGLEV_FLOWS", "")
    if flows.isdigit():  # the IPVS Maglev figure over more flows (test_ipvs_backend.py)
        inner = f"MESH_IPVS_MAGLEV_FLOWS={flows} {inner}"
    # files, not pipes: nobody reads the output until the run ends
    stdout = tempfile.NamedTemporaryFile(prefix="ipvs-vm-out-")  # noqa: SIM115
    stderr = tempfile.NamedTemporaryFile(prefix="ipvs-vm-err-")  # noqa: SIM115
    process = subprocess.Popen(
        ["nice", "-n", "19", str(found), inner],
        cwd=REPO,
        env=env,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,  # its own process group: ended whole by `stop`
    )
    _started = Started(process, stdout, stderr, time.time())


def stop() -> None:
    """End a run still under way (the session is over before its tests came)."""
    if _started is None or _started.process.poll() is not None:
        return
    os.killpg(_started.process.pid, signal.SIGTERM)  # the tool's trap stops qemu
    try:
        _started.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(_started.process.pid, signal.SIGKILL)
        _started.process.wait(timeout=30)


@functools.cache
def guest_results() -> GuestRun:
    """The one VM run's results: started now unless already under way (cached)."""
    start_in_background()
    assert _started is not None, why_the_vm_cannot_run()
    try:
        returncode = _started.process.wait(timeout=VM_TIMEOUT + 300)
    except subprocess.TimeoutExpired:
        stop()
        returncode = -1
    stdout = Path(_started.stdout.name).read_text(errors="replace")
    stderr = Path(_started.stderr.name).read_text(errors="replace")
    run = GuestRun(
        returncode=returncode,
        output=stdout + stderr,
        # the run's own length: until its last output (its summary), not until the
        # tests read it, which may be many minutes after it ended in the background
        seconds=max(
            Path(_started.stdout.name).stat().st_mtime, Path(_started.stderr.name).stat().st_mtime
        )
        - _started.started,
        summary="no pytest summary",
    )
    for line in stdout.splitlines():
        if (outcome := OUTCOME.match(line)) is not None:
            run.outcomes[outcome.group(2)] = outcome.group(1)
        elif (skipped := SKIPPED.match(line)) is not None:
            run.skipped.append((skipped.group(1), skipped.group(2)))
        elif SUMMARY.match(line):
            run.summary = line.strip("= ")
    return run


def check_guest_file(guest_file: str, label: str, figure: re.Pattern[str] | None = None) -> None:
    """Pass only if every test of `guest_file` passed in the VM; print what it gave."""
    skip_unless_the_vm_can_run()
    expected = collected(guest_file)
    run = guest_results()
    mine = {test: run.outcomes.get(test, "not run") for test in expected}
    passed = sum(1 for outcome in mine.values() if outcome == "PASSED")
    skips = [reason for file, reason in run.skipped if file == guest_file]
    print(
        f"\n[{label}] {guest_file} in the VM: {passed} of {len(expected)} passed "
        f"(the VM's run: {run.summary}; rc {run.returncode}, {run.seconds:.0f} s with the boot)"
    )
    if figure is not None:
        for line in run.output.splitlines():
            if figure.match(line):
                print(f"[{label}]   {line}")
    tail = run.output[-6000:]
    assert passed == len(expected) and not skips, (
        f"in the VM: {mine}; skipped: {skips}; rc {run.returncode}:\n{tail}"
    )

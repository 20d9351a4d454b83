"""The host-namespace guard's question: does another pytest session run on this machine?"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.helpers.sessions import is_pytest, other_sessions, others


def test_pytest_command_lines() -> None:
    assert is_pytest(["/work/main/.venv/bin/python3", "/work/main/.venv/bin/pytest", "-q"])
    assert is_pytest(["timeout", "300", "pytest", "tests/unit"])
    assert is_pytest(["python3", "-m", "pytest"])
    assert not is_pytest(["python3", "-m", "mesh", "agent", "--node-name", "n0"])
    assert not is_pytest(["vim", "tests/unit/test_pytest_things.py"])


def test_my_own_line_and_my_children_are_not_others() -> None:
    table = {
        1: (0, ["init"]),
        10: (1, ["timeout", "300", "pytest"]),  # my parent
        11: (10, ["python", "pytest", "tests"]),  # me
        12: (11, ["python", "-m", "mesh", "agent"]),  # an agent I started
        13: (12, ["pytest", "inside"]),  # a pytest under my agent: still mine
        20: (1, ["bash"]),
        21: (20, ["timeout", "300", "pytest"]),  # another session, and its parent
        22: (21, ["python", "pytest", "tests/integration"]),
        30: (1, ["python", "-m", "mesh", "agent"]),  # not a test session
    }
    assert others(table, 11) == [21, 22]
    assert others({k: v for k, v in table.items() if k < 20}, 11) == []


def test_a_running_pytest_process_is_seen_unless_it_is_my_child() -> None:
    sleeper = f"{sys.executable} -c 'import time; time.sleep(30)' pytest"
    # started through a shell that exits: reparented away from this process, as another
    # session's pytest would be
    shell = subprocess.run(
        ["sh", "-c", f"{sleeper} >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, check=True, timeout=10,
    )  # fmt: skip
    stranger = int(shell.stdout)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "pytest"])
    try:
        found = other_sessions()
        assert stranger in found
        assert child.pid not in found and os.getpid() not in found
    finally:
        os.kill(stranger, signal.SIGTERM)
        child.terminate()
        child.wait(timeout=10)

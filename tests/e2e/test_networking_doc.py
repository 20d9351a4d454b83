"""docs/networking.md's worked example, run verbatim on a node the test made.

The fenced `sh` block under "A worked example" is parsed out of the doc and
run by `sh -e` inside a fresh node namespace with a real agent (the `mesh` on
its PATH is this checkout's): it must succeed, and its last command must print
the web task's directory listing, fetched by name from an ad-hoc sandbox.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.netns import unavailable
from tests.helpers.sandbox_lab import REPO, SandboxNode

DOC = REPO / "docs" / "networking.md"


def worked_example() -> str:
    text = DOC.read_text()
    section = text.split("## A worked example", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match is not None, "docs/networking.md has no ```sh block under 'A worked example'"
    return match.group(1)


def test_the_doc_has_one_worked_example() -> None:
    script = worked_example()
    assert "mesh network create" in script and "mesh run --network" in script


def test_the_worked_example_runs_verbatim(tmp_path: Path) -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    node = SandboxNode()
    try:
        node.start_agent()
        started = time.monotonic()
        done: subprocess.CompletedProcess[Any] = node.run(
            ["sh", "-ec", worked_example()], timeout=180
        )
        print(f"the worked example ran in {time.monotonic() - started:.1f} s:\n{done.stdout}")
        assert done.returncode == 0, f"{done.stderr}\n{node.log()}"
        assert "Directory listing for /" in done.stdout
    finally:
        node.close()

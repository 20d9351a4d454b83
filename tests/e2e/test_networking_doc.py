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


OVERLAY_SECTION = "## A worked example across nodes (overlay)"


def overlay_example() -> dict[int, str]:
    """The overlay example's parts, by the node (`# on node N`) each runs on."""
    section = DOC.read_text().split(OVERLAY_SECTION, 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match is not None, f"docs/networking.md has no ```sh block under {OVERLAY_SECTION!r}"
    parts: dict[int, list[str]] = {}
    current: list[str] | None = None
    for line in match.group(1).splitlines():
        header = re.fullmatch(r"# on node (\d+)", line.strip())
        if header is not None:
            current = parts.setdefault(int(header.group(1)), [])
        else:
            assert current is not None, f"a command before any '# on node N': {line}"
            current.append(line)
    return {n: "\n".join(lines) + "\n" for n, lines in parts.items()}


def test_the_overlay_example_names_its_nodes() -> None:
    parts = overlay_example()
    assert sorted(parts) == [1, 2]
    assert "--driver overlay" in parts[1] and "mesh run --network" in parts[2]


def test_the_overlay_example_runs_verbatim_on_two_nodes() -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    from tests.helpers.overlay_lab import OverlayCluster
    from tests.helpers.sandbox_lab import wait_for

    parts = overlay_example()
    cluster = OverlayCluster(2)
    try:
        cluster.start()
        n1, n2 = cluster.nodes
        first = n1.run(["sh", "-ec", parts[1]], timeout=120)
        assert first.returncode == 0, f"{first.stderr}\n{n1.log()}"

        def arrived() -> bool:
            app = n2.overlays().get("app")
            return app is not None and app["peers"] >= 2  # node 1's address and api-1

        took = wait_for(arrived, 30)
        assert took is not None, f"{n2.overlays()}\n{n2.log()}"
        print(f"the network and api-1 reached node 2's peer table after {took:.2f} s")
        second = n2.run(["sh", "-ec", parts[2]], timeout=120)
        print(f"node 2 printed:\n{second.stdout}")
        assert second.returncode == 0, f"{second.stderr}\n{n2.log()}"
        assert "Directory listing for /" in second.stdout
    finally:
        cluster.close()

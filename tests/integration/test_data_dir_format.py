"""A real agent and its data dir's format version: a new dir is marked, an unversioned
dir (as agents before versioning left it) is migrated with its state kept, a newer dir
is refused in one line naming both versions, and left as it was."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers.agent import REPO, AgentProcess

FORMAT = "format-version"


def test_a_new_data_dir_is_marked_with_the_current_version(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "data").start()
    try:
        assert (tmp_path / "data" / FORMAT).read_text() == "1\n"
        assert "event=data_dir_format found=None version=1" in agent.log()
    finally:
        agent.stop()


def test_an_unversioned_dir_is_migrated_and_keeps_its_state(tmp_path: Path) -> None:
    data = tmp_path / "data"
    agent = AgentProcess(data).start()
    try:
        status, _ = agent.request("POST", "/v1/services", {"name": "web"})
        assert status == 201
    finally:
        assert agent.stop() == 0
    # What an agent from before versioning leaves: the same files, no version file.
    (data / FORMAT).unlink()
    again = AgentProcess(data).start()
    try:
        log = again.log()
        assert "event=data_dir_migrated source=0 to=1" in log, log
        assert "event=data_dir_format found=0 version=1" in log
        names = [s["name"] for s in again.request("GET", "/v1/services")[1]]
        assert names == ["web"]
        assert (data / FORMAT).read_text() == "1\n"
    finally:
        again.stop()


def test_an_older_agent_refuses_a_newer_dir_naming_both_versions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    agent = AgentProcess(data).start()
    agent.stop()
    (data / FORMAT).write_text("2\n")
    before = (data / "state.db").read_bytes()
    done = subprocess.run(
        AgentProcess(data).argv(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        check=False,
    )
    last = done.stderr.strip().splitlines()[-1]
    print(last)
    assert done.returncode == 1
    assert last.startswith(f"mesh agent: {data}: data dir format version 2")
    assert "format version 2 is newer than this agent's version 1" in last
    assert (data / FORMAT).read_text() == "2\n"
    assert (data / "state.db").read_bytes() == before

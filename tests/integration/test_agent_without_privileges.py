"""An agent without CAP_NET_ADMIN and CAP_SYS_ADMIN (root, both dropped from its
bounding set by `setpriv`): it starts and serves as before, one log line says that
bridge networks and sandboxed tasks are off and why, and the API answers them 422
`needs_privileges`."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from tests.helpers.agent import AgentProcess

pytestmark = pytest.mark.root


class UnprivilegedAgent(AgentProcess):
    def argv(self) -> list[str]:
        argv = super().argv()
        # both capabilities dropped (the helper drops CAP_SYS_ADMIN alone)
        python = argv.index(sys.executable)
        return ["setpriv", "--bounding-set", "-net_admin,-sys_admin", "--", *argv[python:]]


@pytest.fixture
def agent(tmp_path: Path) -> AgentProcess:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux)")
    return UnprivilegedAgent(tmp_path / "data", node_name=f"t15mgr-{uuid.uuid4().hex[:8]}")


def test_without_privileges_one_line_says_what_is_off(agent: AgentProcess) -> None:
    agent.start()
    try:
        lines = [line for line in agent.log().splitlines() if "sandboxes_" in line]
        assert len(lines) == 1, lines
        line = lines[0]
        print(line)
        assert "sandboxes_disabled" in line
        assert "bridge networks and sandboxed tasks" in line
        assert "lacking CAP_NET_ADMIN, CAP_SYS_ADMIN" in line
        info = agent.request("GET", "/v1/agent")[1]["sandboxes"]
        assert info["enabled"] is False
        assert "lacking CAP_NET_ADMIN, CAP_SYS_ADMIN" in info["reason"]
        # Everything else works as before.
        status, _ = agent.request("POST", "/v1/networks", {"name": "back"})
        assert status == 201
        status, body = agent.request(
            "POST", "/v1/networks", {"name": "br", "driver": "bridge", "subnet": "10.152.0.0/24"}
        )
        assert status == 422, body
        assert body["error"]["code"] == "needs_privileges"
    finally:
        agent.stop()

"""Three real agents announce their state digests over gossip and agree on them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.helpers.agent import AgentProcess, gossip_cluster


def wait_agreed(agents: list[AgentProcess], timeout: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = [a.request("GET", "/v1/gossip")[1]["state"] for a in agents]
        digests = {v["digest"] for v in views}
        if len(digests) == 1 and all(
            {p["digest"] for p in v["peers"]} == digests and len(v["peers"]) == len(agents) - 1
            for v in views
        ):
            return views
        time.sleep(0.2)
    raise AssertionError(f"digests never agreed: {views}")


def test_agents_agree_on_the_state_digest(tmp_path: Path) -> None:
    with gossip_cluster(tmp_path, 3) as agents:
        status, _ = agents[1].request("POST", "/v1/services", {"name": "web"})
        assert status == 201
        first = wait_agreed(agents)
        assert first[0]["records"] >= 2  # ingress and web
        # A service made and removed brings the digest back to an earlier value: the
        # peers must hear it again (each announcement is a new gossip payload).
        assert agents[2].request("POST", "/v1/services", {"name": "tmp"})[0] == 201
        wait_agreed(agents)
        assert agents[2].request("DELETE", "/v1/services/tmp")[0] == 204
        again = wait_agreed(agents)
        assert again[0]["digest"] == first[0]["digest"]

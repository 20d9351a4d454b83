"""Three real agents announce their state digests over gossip and agree on them."""

from __future__ import annotations

import time
from pathlib import Path

from tests.helpers.agent import gossip_cluster


def test_agents_agree_on_the_state_digest(tmp_path: Path) -> None:
    with gossip_cluster(tmp_path, 3) as agents:
        status, _ = agents[1].request("POST", "/v1/services", {"name": "web"})
        assert status == 201
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            views = [a.request("GET", "/v1/gossip")[1]["state"] for a in agents]
            digests = {v["digest"] for v in views}
            peers = [{p["digest"] for p in v["peers"]} for v in views]
            if len(digests) == 1 and all(p == digests and len(v["peers"]) == 2
                                         for p, v in zip(peers, views, strict=True)):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"digests never agreed: {views}")
        assert views[0]["records"] >= 2  # ingress and web

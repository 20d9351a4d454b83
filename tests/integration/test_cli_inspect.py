"""`mesh inspect dns|gossip` against real agents."""

from __future__ import annotations

import time
from pathlib import Path

from tests.helpers.agent import gossip_cluster
from tests.integration.test_cli_flow import mesh, mesh_json


def test_inspect_dns_and_gossip(tmp_path: Path) -> None:
    with gossip_cluster(tmp_path, 2) as agents:
        first = agents[0]
        mesh(first, "network", "create", "front")
        mesh(first, "service", "create", "web", "--network", "front")
        task = mesh_json(first, "task", "add", "web", "--address", "127.0.0.40")
        vip = mesh_json(first, "service", "inspect", "web")["vips"][0]["address"]
        records = mesh_json(first, "inspect", "dns", "--network", "front")["records"]
        assert {"name": "web", "type": "A", "value": vip} in records
        assert {"name": "tasks.web", "type": "A", "value": "127.0.0.40"} in records
        assert {"name": task["name"], "type": "A", "value": "127.0.0.40"} in records
        table = mesh(first, "inspect", "dns").stdout
        assert "tasks.web" in table and "PTR" in table
        assert (
            "does not exist"
            in mesh(first, "inspect", "dns", "--network", "nope", check=False).stderr
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            shown = mesh(first, "inspect", "gossip").stdout
            if "same (" in shown:
                break
            time.sleep(0.3)
        assert "n1" in shown and "same (" in shown, shown
        assert mesh_json(first, "inspect", "gossip")["gossip"]["state"]["records"] >= 3


def test_inspect_shows_suspicion_timers_and_the_lb_table(tmp_path: Path) -> None:
    with gossip_cluster(tmp_path, 3) as agents:
        assert "Prot LocalAddress:Port" in mesh(agents[0], "inspect", "lb").stdout
        agents[2].kill()
        seen = None
        deadline = time.monotonic() + 15
        while seen is None and time.monotonic() < deadline:
            for member in agents[0].request("GET", "/v1/members")[1]:
                if member["name"] == "n2" and member["status"] == "suspect":
                    seen = member
            time.sleep(0.02)
        assert seen is not None, "n2 was never seen suspect"
        assert seen["suspicion"]["dead_in"] >= 0 and seen["suspicion"]["confirmations"] >= 0

"""Key rotation across the cluster through one node's API (Serf's keys -install/-use/-remove)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from tests.helpers.agent import AgentProcess, gossip_cluster, members
from tests.integration.test_gossip_cluster import wait_until
from tests.integration.test_gossip_hostile import keyring_file


def fingerprints(agent: AgentProcess) -> dict[str, bool]:
    return {k["fingerprint"]: k["primary"] for k in agent.request("GET", "/v1/keyring")[1]["keys"]}


def test_rotation_reaches_every_node_and_the_cluster_holds(tmp_path: Path) -> None:
    first = os.urandom(32)
    rings = [keyring_file(tmp_path / f"ring-{i}.json", first) for i in range(3)]
    with gossip_cluster(tmp_path, 3, extra=lambda i: ["--keyring", str(rings[i])]) as agents:
        wait_until(lambda: all(len(members(a)) == 3 for a in agents), 20, "three members")
        second = base64.b64encode(os.urandom(32)).decode()
        old = base64.b64encode(first).decode()
        for op, path, method in (
            ("install", "/v1/keyring", "POST"),
            ("use", "/v1/keyring/primary", "PUT"),
            ("remove", "/v1/keyring/remove", "POST"),
        ):
            key = old if op == "remove" else second
            status, ring_now = agents[0].request(method, path, {"key": key})
            assert status == 200, (op, ring_now)
            wanted = fingerprints(agents[0])
            took = wait_until(
                lambda w=wanted: all(fingerprints(a) == w for a in agents),
                15,
                f"{op} reaches every node",
            )
            print(f"\n{op}: on every node after {took:.2f}s")
        assert len(fingerprints(agents[2])) == 1
        # The cluster still talks (now only with the new key): all alive.
        wait_until(
            lambda: all(set(members(a).values()) == {"alive"} for a in agents),
            10,
            "all alive after rotation",
        )
        # The new ring was saved: a restart keeps it.
        agents[2].stop()
        agents[2].start()
        assert len(fingerprints(agents[2])) == 1

"""Key rotation across the cluster through one node's API (Serf's keys -install/-use/-remove)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from tests.helpers.agent import AgentProcess, free_port
from tests.integration.test_gossip_cluster import wait_until
from tests.integration.test_gossip_hostile import keyring_file


def fingerprints(agent: AgentProcess) -> dict[str, bool]:
    return {k["fingerprint"]: k["primary"] for k in agent.request("GET", "/v1/keyring")[1]["keys"]}


def test_rotation_reaches_every_node_and_the_cluster_holds(tmp_path: Path) -> None:
    port = free_port()
    first = os.urandom(32)
    agents = []
    for i in range(3):
        ring = keyring_file(tmp_path / f"ring-{i}.json", first)
        agents.append(AgentProcess(tmp_path / f"n{i}", node_name=f"n{i}", extra=[
            "--advertise", f"127.0.0.{i + 2}:{port}", "--gossip-profile", "local",
            "--keyring", str(ring), *(["--join", f"127.0.0.2:{port}"] if i else [])]))
    try:
        for agent in agents:
            agent.start()
        wait_until(lambda: all(len(a.request("GET", "/v1/members")[1]) == 3 for a in agents),
                   20, "three members")
        second = base64.b64encode(os.urandom(32)).decode()
        old = base64.b64encode(first).decode()
        for op, path, method in (("install", "/v1/keyring", "POST"),
                                 ("use", "/v1/keyring/primary", "PUT"),
                                 ("remove", "/v1/keyring/remove", "POST")):
            key = old if op == "remove" else second
            status, ring_now = agents[0].request(method, path, {"key": key})
            assert status == 200, (op, ring_now)
            wanted = fingerprints(agents[0])
            took = wait_until(lambda w=wanted: all(fingerprints(a) == w for a in agents), 15,
                              f"{op} reaches every node")
            print(f"\n{op}: on every node after {took:.2f}s")
        assert len(fingerprints(agents[2])) == 1
        # The cluster still talks (now only with the new key): all alive.
        wait_until(lambda: all({m["status"] for m in a.request("GET", "/v1/members")[1]}
                               == {"alive"} for a in agents), 10, "all alive after rotation")
        # The new ring was saved: a restart keeps it.
        agents[2].stop()
        agents[2].start()
        assert len(fingerprints(agents[2])) == 1
    finally:
        for agent in agents:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.stop()

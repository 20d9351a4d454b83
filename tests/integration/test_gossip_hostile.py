"""Hostile packets at a live agent's gossip port: dropped, counted, harmless.

Two encrypted agents form a cluster; then a stranger sends packets sealed
with the wrong key, plaintext (no key), garbage, truncated and oversized
packets, and a stream of junk. Every one is dropped and shows in the agent's
counters (GET /v1/gossip), and the two agents stay members of one cluster.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from pathlib import Path

from gossip import codec, security
from gossip.messages import Ping
from tests.helpers.agent import AgentProcess, free_port
from tests.integration.test_gossip_cluster import wait_until


def keyring_file(path: Path, key: bytes) -> Path:
    encoded = base64.b64encode(key).decode()
    path.write_text(json.dumps({"keys": [encoded], "primary": encoded}))
    path.chmod(0o600)
    return path


def test_hostile_packets_are_dropped_and_counted(tmp_path: Path) -> None:
    key = os.urandom(32)
    ring = keyring_file(tmp_path / "keyring.json", key)
    port = free_port()
    agents = [AgentProcess(tmp_path / f"n{i}", node_name=f"n{i}", extra=[
        "--advertise", f"127.0.0.{i + 2}:{port}", "--gossip-profile", "local",
        "--keyring", str(ring), *(["--join", f"127.0.0.2:{port}"] if i else [])])
        for i in range(2)]
    try:
        for agent in agents:
            agent.start()
        wait_until(lambda: all(len(a.request("GET", "/v1/members")[1]) == 2 for a in agents),
                   20, "two members")
        target = ("127.0.0.2", port)
        valid = codec.encode_packet([Ping(seq=1, target="n0", source="intruder")])
        wrong_key = security.wrap(valid, security.Keyring([os.urandom(32)]), b"")
        sends = {
            "wrong key": wrong_key,
            "no key (plaintext)": valid,
            "garbage": os.urandom(300),
            "truncated": security.wrap(valid, security.Keyring([key]), b"")[:20],
            "oversized": os.urandom(60_000),
            "empty": b"",
        }
        before = agents[0].request("GET", "/v1/gossip")[1]["drops"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for data in sends.values():
                for _ in range(5):
                    sock.sendto(data, target)
                    time.sleep(0.002)  # paced: the point is the agent, not the socket buffer
        with socket.create_connection(target, timeout=5) as stream:
            stream.sendall(b"\x00\x00\x00\x10" + os.urandom(16))
        time.sleep(1.0)
        after = agents[0].request("GET", "/v1/gossip")[1]["drops"]
        new = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        print(f"\ndrops by reason: {new}")
        assert new.get("unauthenticated", 0) >= 5  # the wrong key
        assert new.get("unencrypted", 0) >= 10  # plaintext and garbage, with a keyring set
        assert new.get("truncated", 0) >= 10  # cut short, and empty
        assert new.get("oversized", 0) >= 5
        assert sum(new.values()) >= 5 * len(sends) + 1  # and the junk stream
        # The cluster is unaffected: both still alive in each other's view.
        time.sleep(1.0)
        for agent in agents:
            members = {m["name"]: m["status"] for m in agent.request("GET", "/v1/members")[1]}
            assert members == {"n0": "alive", "n1": "alive"}
    finally:
        for agent in agents:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.stop()

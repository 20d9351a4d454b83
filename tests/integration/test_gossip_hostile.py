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
from tests.helpers.agent import gossip_cluster, members
from tests.integration.test_gossip_cluster import wait_until


def keyring_file(path: Path, key: bytes) -> Path:
    encoded = base64.b64encode(key).decode()
    path.write_text(json.dumps({"keys": [encoded], "primary": encoded}))
    path.chmod(0o600)
    return path


def test_hostile_packets_are_dropped_and_counted(tmp_path: Path) -> None:
    key = os.urandom(32)
    ring = keyring_file(tmp_path / "keyring.json", key)
    with gossip_cluster(tmp_path, 2, extra=lambda _i: ["--keyring", str(ring)]) as agents:
        wait_until(lambda: all(len(members(a)) == 2 for a in agents), 20, "two members")
        target = agents[0].gossip_addr
        valid = codec.encode_packet([Ping(seq=1, target="n0", source="intruder")])
        sends = {
            "wrong key": security.wrap(valid, security.Keyring([os.urandom(32)]), b""),
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
            assert members(agent) == {"n0": "alive", "n1": "alive"}

"""A running plaintext cluster moves to encrypted gossip with no downtime (docs/gossip.md).

Three `--insecure-gossip` agents; then the three steps of memberlist's
GossipVerifyIncoming/Outgoing migration, each a rolling restart, one node at a
time, each restarted node rejoining through a node that is up:

1. the key installed, plaintext still sent and accepted
   (`--keyring K --gossip-verify-incoming off --gossip-verify-outgoing off`);
2. encrypted sent, plaintext still accepted (`--gossip-verify-incoming off`);
3. encryption required (`--keyring K`, nothing relaxed).

After every restart all three see all three alive, and no node has dropped a
packet for its encryption (`unencrypted`, `encrypted_no_key`,
`unauthenticated`): at no moment did two members fail to understand each
other. At the end a plaintext stranger is refused, counted as `unencrypted`,
and never becomes a member.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

from tests.helpers.agent import AgentProcess, free_port, members
from tests.integration.test_gossip_cluster import wait_until

CONVERGE = 20.0  # seconds; a rejoin takes one or two on an idle machine
NAMES = ("n0", "n1", "n2")
#: the drops that would mean two members did not understand each other's packets
MISUNDERSTOOD = ("unencrypted", "encrypted_no_key", "unauthenticated", "label_mismatch")

#: the flags of each step, after the plaintext start
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("install the key, accept both, send plaintext",
     ("--gossip-verify-incoming", "off", "--gossip-verify-outgoing", "off")),
    ("send encrypted, accept both", ("--gossip-verify-incoming", "off")),
    ("require encryption", ()),
)  # fmt: skip


class RollingCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.agents: dict[str, AgentProcess] = {}
        self.generation = 0
        #: drops for the encryption seen on any node, over the whole migration
        self.misunderstood: dict[str, int] = {}

    def address(self, name: str) -> str:
        return f"127.0.0.{NAMES.index(name) + 2}"

    def start(self, name: str, flags: tuple[str, ...], join: str | None) -> AgentProcess:
        self.generation += 1
        agent = AgentProcess(
            self.root / name,
            node_name=name,
            publish_address=self.address(name),
            extra=[
                "--advertise",
                f"{self.address(name)}:{self.port}",
                "--gossip-profile",
                "local",
                *(["--join", f"{self.address(join)}:{self.port}"] if join else []),
                *flags,
            ],
        )
        # The log of each run of a node apart (the data dir, and so the state, is kept).
        agent.log_path = self.root / f"{name}-run{self.generation}.log"
        self.agents[name] = agent.start()
        return agent

    def restart(self, name: str, flags: tuple[str, ...]) -> float:
        """Stop `name` (gracefully: it leaves) and start it with `flags`, rejoining
        through another node; the seconds until all three see all three alive."""
        self.account(self.agents[name])
        self.agents[name].stop()
        other = next(n for n in NAMES if n != name)
        began = time.monotonic()
        self.start(name, flags, other)
        self.converged(f"after restarting {name}")
        return time.monotonic() - began

    def converged(self, when: str) -> None:
        everyone = dict.fromkeys(NAMES, "alive")
        wait_until(
            lambda: all(members(a) == everyone for a in self.agents.values()),
            CONVERGE,
            f"all three alive in every view {when}",
        )
        for agent in self.agents.values():  # checked, not only waited for
            assert members(agent) == everyone
            self.account(agent)
        assert not any(self.misunderstood.values()), self.misunderstood

    def account(self, agent: AgentProcess) -> None:
        """Add `agent`'s drops for the encryption to the tally (before a stop resets them)."""
        drops = agent.request("GET", "/v1/gossip")[1]["drops"]
        for reason in MISUNDERSTOOD:
            if drops.get(reason):
                key = f"{agent.node_name}:{reason}"
                self.misunderstood[key] = max(self.misunderstood.get(key, 0), drops[reason])

    def stop(self) -> None:
        for agent in self.agents.values():
            if agent.proc is not None and agent.proc.poll() is None:
                agent.stop()


def keyring_file(path: Path, key: bytes) -> Path:
    path.write_text(json.dumps({"keys": [base64.b64encode(key).decode()]}))
    path.chmod(0o600)
    return path


def test_a_plaintext_cluster_moves_to_encryption_with_no_downtime(tmp_path: Path) -> None:
    key = os.urandom(32)
    cluster = RollingCluster(tmp_path)
    try:
        for i, name in enumerate(NAMES):
            cluster.start(name, ("--insecure-gossip",), None if i == 0 else "n0")
        cluster.converged("at the start, in plaintext")
        for agent in cluster.agents.values():
            assert agent.request("GET", "/v1/gossip")[1]["encrypted"] is False
        timings = []
        for step, (what, relaxed) in enumerate(STEPS, 1):
            for name in NAMES:
                ring = keyring_file(tmp_path / f"{name}-keyring-{step}.json", key)
                took = cluster.restart(name, ("--keyring", str(ring), *relaxed))
                timings.append(took)
                print(f"step {step} ({what}): {name} restarted, all alive {took:.2f}s later")
            for agent in cluster.agents.values():
                gossip = agent.request("GET", "/v1/gossip")[1]
                shown = (gossip["encrypted"], gossip["verify_incoming"], gossip["verify_outgoing"])
                assert shown == (True, step == 3, step >= 2)
        print(f"restarts: {len(timings)}, the slowest to converge {max(timings):.2f}s")
        print(f"drops for the encryption during the migration: {cluster.misunderstood or 0}")

        # The end: a plaintext stranger gets nowhere and is counted.
        seed = cluster.agents["n0"]
        before = seed.request("GET", "/v1/gossip")[1]["drops"].get("unencrypted", 0)
        stranger = AgentProcess(
            tmp_path / "stranger",
            node_name="stranger",
            publish_address="127.0.0.5",
            extra=[
                "--advertise",
                f"127.0.0.5:{cluster.port}",
                "--gossip-profile",
                "local",
                "--join",
                f"127.0.0.2:{cluster.port}",
                "--insecure-gossip",
            ],
        )
        cluster.agents["stranger"] = stranger.start()
        wait_until(
            lambda: seed.request("GET", "/v1/gossip")[1]["drops"].get("unencrypted", 0) > before,
            CONVERGE,
            "the stranger's plaintext counted",
        )
        time.sleep(2.0)
        refused = seed.request("GET", "/v1/gossip")[1]["drops"]["unencrypted"] - before
        print(f"the plaintext stranger's packets dropped by n0: {refused} (unencrypted)")
        assert refused > 0
        assert members(stranger) == {"stranger": "alive"}
        for name in NAMES:
            assert members(cluster.agents[name]) == dict.fromkeys(NAMES, "alive")
    finally:
        cluster.stop()

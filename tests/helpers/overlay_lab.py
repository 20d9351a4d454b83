"""A cluster of sandbox nodes joined by an underlay: what overlay networks span (root).

`OverlayCluster(n)` makes n `SandboxNode`s (each a node namespace with a real agent,
its own outside namespace beyond its default route) and an underlay: a switch
namespace with a bridge, a veth `ul0` from every node to it, node i at
192.168.77.i/24. Each agent advertises (gossip, and so its VTEP) on its underlay
address, node 1 is every other's `--join` seed, with the `local` gossip profile
(a crash is declared dead in about a second). Everything is removed by `close()`,
however the test ends: the nodes first (agents, sandboxes, namespaces), then the
underlay.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from mesh.sandbox.names import vxlan_name
from tests.helpers.agent import TEST_GOSSIP_KEY
from tests.helpers.netns import Lab
from tests.helpers.sandbox_lab import SandboxNode

UNDERLAY = "192.168.77"


class OverlayNode(SandboxNode):
    def __init__(self, index: int, keyring: Path | None = None) -> None:
        super().__init__()
        self.index = index
        self.underlay = f"{UNDERLAY}.{index}"
        self.keyring = keyring

    def agent_argv(self) -> list[str]:
        argv = super().agent_argv()
        at = argv.index("--advertise")
        argv[at + 1] = f"{self.underlay}:7946"
        argv += ["--gossip-profile", "local"]
        if self.index != 1:
            argv += ["--join", f"{UNDERLAY}.1:7946"]
        # Gossip is encrypted by default: without a keyring of the test's, every node
        # gets the one key of the lab (a joiner needs the cluster's key).
        argv += ["--keyring", str(self.keyring or self.lab_keyring())]
        return argv

    def lab_keyring(self) -> Path:
        """This node's copy of the shared test key (a keyring change rewrites the file)."""
        path = self.data_dir.parent / "keyring.json"
        if not path.exists():
            path.write_text(json.dumps({"keys": [TEST_GOSSIP_KEY]}))
            path.chmod(0o600)
        return path

    def agent_info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.api("GET", "/v1/agent", timeout=10)
        return info

    def overlays(self) -> dict[str, Any]:
        sandboxes = self.agent_info().get("sandboxes", {})
        overlays: dict[str, Any] = sandboxes.get("overlays", {})
        return overlays

    def fdb_macs(self, net_id: str) -> set[str]:
        """The MACs of the static entries on the network's VXLAN device (where to tunnel)."""
        done = self.node.run(
            ["bridge", "-j", "fdb", "show", "dev", vxlan_name(net_id)], check=False
        )
        if done.returncode != 0:
            return set()
        return {
            str(e["mac"]).lower()
            for e in json.loads(done.stdout or "[]")
            if e.get("dst") and e.get("mac") != "00:00:00:00:00:00"
        }

    def neighbours(self, net_id: str) -> set[str]:
        """The addresses of the network's VXLAN device's neighbour entries (proxy ARP)."""
        done = self.node.run(["ip", "-j", "neigh", "show", "dev", vxlan_name(net_id)], check=False)
        if done.returncode != 0:
            return set()
        return {str(e["dst"]) for e in json.loads(done.stdout or "[]")}


class OverlayCluster:
    def __init__(self, size: int = 3, keyring: Path | None = None) -> None:
        """`keyring`: a keyring file every agent starts with (`--keyring`; gossip is
        encrypted, and encrypted overlays can be made)."""
        self.underlay = Lab("t16ul")
        self.nodes: list[OverlayNode] = []
        try:
            switch = self.underlay.namespace("sw")
            bridge = self.underlay.bridge(switch, "br0")
            for index in range(1, size + 1):
                made = OverlayNode(index, keyring)
                self.nodes.append(made)
                port = f"p{index}"
                self.underlay.veth(made.node, "ul0", switch, port)
                switch.ip("link", "set", port, "master", bridge)
                made.node.add_address("ul0", f"{made.underlay}/24")
        except BaseException:
            self.close()
            raise

    def start(self, timeout: float = 60.0) -> float:
        """Start every agent, node 1 first; seconds until each sees all alive."""
        started = time.monotonic()
        for made in self.nodes:
            made.start_agent()
        deadline = started + timeout
        for made in self.nodes:
            while True:
                members = made.api("GET", "/v1/members", timeout=10)
                alive = [m for m in members if m["status"] == "alive"]
                if len(alive) == len(self.nodes):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{made.name} sees {members}:\n{made.log()}")
                time.sleep(0.2)
        return time.monotonic() - started

    def close(self) -> None:
        errors: list[str] = []
        for made in self.nodes:
            try:
                made.close()
            except Exception as exc:
                errors.append(str(exc))
        with contextlib.suppress(Exception):
            self.underlay.close()
        if errors:
            raise RuntimeError("; ".join(errors))

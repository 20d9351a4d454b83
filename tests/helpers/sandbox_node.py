"""An agent that makes sandboxes, running inside a test's own "node" namespace (root).

`NodeAgent` is the cluster tests' `NetnsAgent` started with `nsenter --net=` instead
of `ip netns exec`: `ip netns exec` gives the process a private mount namespace, so a
namespace the agent mounts under /run/netns would be invisible to the host, the CLI
and `ip netns exec`. Its node name is unique per test (the namespace's), so the
prefix of the sandbox namespaces it owns (`mp-<node_id>-`) is too.

`remove_sandboxes(node_name)` is the finalizer: every namespace under /run/netns with
that node's prefix (they are global files, not inside the node namespace) and its
/etc/netns directory.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from mesh.sandbox.names import netns_prefix
from tests.cluster.conftest import NetnsAgent
from tests.helpers.netns import NETNS_ETC, NETNS_RUN, Netns


class NodeAgent(NetnsAgent):
    """A `mesh agent` in `ns` by `nsenter --net`, sharing the host's mount namespace."""

    def __init__(
        self,
        ns: Netns,
        data_dir: Path,
        *,
        dns: tuple[str, int] | None = None,
        extra: list[str] | None = None,
    ) -> None:
        super().__init__(ns, data_dir, dns=dns, extra=extra)
        self.may_make_sandboxes = True  # in its own node namespace: the one place it may make them

    def argv(self) -> list[str]:
        inner = super().argv()
        assert inner[:4] == ["ip", "netns", "exec", self.ns.name]
        return ["nsenter", f"--net={NETNS_RUN / self.ns.name}", "--", *inner[4:]]

    @property
    def prefix(self) -> str:
        return netns_prefix(self.node_name)

    def sandboxes(self) -> list[str]:
        """The namespaces under /run/netns this agent's prefix names."""
        if not NETNS_RUN.exists():
            return []
        return sorted(p.name for p in NETNS_RUN.iterdir() if p.name.startswith(self.prefix))


def remove_sandboxes(node_name: str) -> None:
    """Remove every namespace of this node's prefix, however the test ended."""
    prefix = netns_prefix(node_name)
    if NETNS_RUN.exists():
        for path in NETNS_RUN.iterdir():
            if path.name.startswith(prefix):
                subprocess.run(
                    ["ip", "netns", "delete", path.name], capture_output=True, check=False
                )
    if NETNS_ETC.exists():
        for path in NETNS_ETC.iterdir():
            if path.name.startswith(prefix):
                shutil.rmtree(path, ignore_errors=True)

"""Whether this agent can make sandboxes: checked once, at start.

Making a named network namespace needs CAP_SYS_ADMIN (unshare, the bind mount under
/run/netns) and CAP_NET_ADMIN (links, addresses, routes, nftables), and a writable
/run/netns (or /run, to make it). Without them the agent keeps everything else it does
and answers a bridge network or a sandboxed task with 422 `needs_privileges`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mesh.errors import PRIVILEGES_NEEDED
from mesh.sandbox.names import NETNS_DIR

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21

#: What is off without privileges, for the one line the agent logs.
DISABLED = "bridge networks and sandboxed tasks (422 needs_privileges)"


def effective_capabilities(status: str) -> int:
    """The CapEff mask of a /proc/<pid>/status text (0 when absent)."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split(":", 1)[1].strip(), 16)
    return 0


def missing_privileges(
    status_path: str = "/proc/self/status", netns_dir: str = NETNS_DIR
) -> str | None:
    """Why this process cannot make sandboxes, in one line; None when it can."""
    try:
        caps = effective_capabilities(Path(status_path).read_text())
    except OSError as exc:
        return f"cannot read {status_path}: {exc.strerror}"
    lacking = [
        name
        for name, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))
        if not caps >> bit & 1
    ]
    if lacking:
        return f"{PRIVILEGES_NEEDED} (lacking {', '.join(lacking)})"
    directory = Path(netns_dir)
    where = directory if directory.exists() else directory.parent
    if not os.access(where, os.W_OK | os.X_OK):
        return f"{where} is not writable"
    return None

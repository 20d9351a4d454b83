"""Removing a host-side veth the state does not own (reconciliation's orphans).

The driver removes endpoints it knows the plan of (`Driver.leave`); an orphan is
known only by its name (`Driver.owned`), so it is removed by name here, and only a
veth whose name has our prefix. Deleting one end of a veth pair deletes both.
"""

from __future__ import annotations

import errno

from mesh.sandbox.names import VETH_PREFIX


def delete_veth(name: str) -> None:
    """Delete the veth `name` in this thread's namespace; one already gone is fine."""
    if not name.startswith(VETH_PREFIX):
        raise ValueError(f"{name} is not a veth of ours (prefix {VETH_PREFIX})")
    # pyroute2 on first use: importing it costs ~10 MB, and an agent without sandboxes
    # (or a kernel load balancer) never needs it.
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise

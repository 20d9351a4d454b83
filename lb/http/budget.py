"""The router's descriptor budget: how many sockets it may hold, and how many it holds.

Counted in descriptors, not clients: a client whose request is being
forwarded holds two (its own and its task's), as does an upgraded pipe; a
connection idle in the pool holds one. A client is taken only with room for
both of its descriptors, so a request never lacks the one for its task; the
pool keeps an idle connection only while there is room. The limit is
`RouterSettings.fd_budget` of the process's RLIMIT_NOFILE, which leaves a
reserve for the API and the health checks: a flood of slow clients fills
the router's budget and is refused (503, counted), never the process's table.
"""

from __future__ import annotations

#: what a client connection takes: itself and the connection to its task
PER_CLIENT = 2


class FdBudget:
    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, count: int) -> bool:
        """Hold `count` more descriptors if they fit; False (and nothing held) if not."""
        if self.held + count > self.limit:
            return False
        self.held += count
        return True

    def give(self, count: int) -> None:
        self.held = max(0, self.held - count)

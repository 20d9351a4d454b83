"""Task health checks run by the task's owning node (http, tcp and ttl, as Docker's HEALTHCHECK).

`core` is the sans-IO planner (trackers per task, fed changes and a clock);
`runner` is its asyncio shell (probes, one timer). The agent builds one
`HealthRunner`, subscribes it to the change feed and wires `report` to the store.
"""

from mesh.health.core import HealthPlanner, HealthTracker, ProbeOrder, Transition
from mesh.health.runner import HealthRunner, probe_http, probe_tcp

__all__ = [
    "HealthPlanner",
    "HealthRunner",
    "HealthTracker",
    "ProbeOrder",
    "Transition",
    "probe_http",
    "probe_tcp",
]

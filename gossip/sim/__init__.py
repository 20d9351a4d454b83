"""A deterministic simulator of N membership cores (aesthetics principle 11).

The very `gossip.membership.Membership` the agent runs, N times, over an
in-memory network with loss, delay, partitions, crashes and slow receivers,
in virtual time from one seeded `random.Random`: the same seed gives the same
run, event for event. No asyncio, no sockets, no real clock.

- `clock`: the event heap and virtual clock;
- `network`: `SimNetwork` / `NetProfile` (what arrives, when);
- `node`: `SimNode` and its `RecordingDelegate`;
- `cluster`: `SimCluster` (the nodes and the loop that feeds them);
- `sizes`: exact datagram sizes for object mode (`SizeCache`);
- `metrics`: kinship's detection / false-positive / dissemination metrics;
- `scenarios`: the benchmark's measured scenarios.
"""

from gossip.sim.clock import EventQueue
from gossip.sim.cluster import SimCluster, SimError
from gossip.sim.metrics import DetectionSummary, Metrics, percentile, spread
from gossip.sim.network import NetProfile, SimNetwork
from gossip.sim.node import RecordingDelegate, SimNode, node_addr
from gossip.sim.sizes import SizeCache

__all__ = [
    "DetectionSummary",
    "EventQueue",
    "Metrics",
    "NetProfile",
    "RecordingDelegate",
    "SimCluster",
    "SimError",
    "SimNetwork",
    "SimNode",
    "SizeCache",
    "node_addr",
    "percentile",
    "spread",
]

"""A worker's own process figures (RSS, CPU, descriptors), for the agent's `/metrics`.

A worker adds `process_figures()` to the counters it reports up the feed socket
every second (a few reads of /proc a second, nothing per request); the agent
exports them per pool and worker index. They come from prometheus-client's
process collector, the one the agent exports for itself.
"""

from __future__ import annotations

import os

from prometheus_client import ProcessCollector

from mesh.core.workers import WORKER_INDEX

_COLLECTOR = ProcessCollector(registry=None)


def process_figures() -> dict[str, float]:
    """`process_resident_memory_bytes`, `process_cpu_seconds_total`, `process_open_fds`,
    ... of this process, by sample name (empty where /proc is not there)."""
    return {
        sample.name: sample.value for family in _COLLECTOR.collect() for sample in family.samples
    }


def worker_index() -> int:
    """This worker's index in its pool (-1 when not started by a `WorkerPool`)."""
    try:
        return int(os.environ.get(WORKER_INDEX, "-1"))
    except ValueError:
        return -1

"""A worker's own process figures (RSS, CPU, descriptors), for the agent's `/metrics`.

A worker adds `process_figures()` to the counters it reports up the feed socket
(a few reads of /proc a report, nothing per request); the agent exports them per
pool and worker index. The names and values are those of prometheus-client's
process collector, the one the agent exports for itself; they are read here
directly from /proc so that a worker does not import prometheus-client (and the
http.server, urllib and email modules it brings: megabytes per worker).
"""

from __future__ import annotations

import os

from mesh.core.workers import WORKER_INDEX

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGESIZE = os.sysconf("SC_PAGESIZE")


def _boot_time() -> float:
    try:
        with open("/proc/stat", "rb") as stat:
            for line in stat:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


_BOOT_TIME = _boot_time()


def process_figures() -> dict[str, float]:
    """`process_resident_memory_bytes`, `process_cpu_seconds_total`, `process_open_fds`,
    ... of this process, by sample name (empty where /proc is not there)."""
    figures: dict[str, float] = {}
    if not _BOOT_TIME:
        return figures
    try:
        with open("/proc/self/stat", "rb") as stat:
            parts = stat.read().rsplit(b")", 1)[-1].split()
        figures["process_virtual_memory_bytes"] = float(parts[20])
        figures["process_resident_memory_bytes"] = float(parts[21]) * _PAGESIZE
        figures["process_start_time_seconds"] = float(parts[19]) / _TICKS + _BOOT_TIME
        figures["process_cpu_seconds_total"] = (float(parts[11]) + float(parts[12])) / _TICKS
    except OSError:
        pass
    try:
        max_fds = None
        with open("/proc/self/limits", "rb") as limits:
            for line in limits:
                if line.startswith(b"Max open file"):
                    max_fds = float(line.split()[3])
                    break
        figures["process_open_fds"] = len(os.listdir("/proc/self/fd"))
        if max_fds is not None:
            figures["process_max_fds"] = max_fds
    except OSError:
        pass
    return figures


def worker_index() -> int:
    """This worker's index in its pool (-1 when not started by a `WorkerPool`)."""
    try:
        return int(os.environ.get(WORKER_INDEX, "-1"))
    except ValueError:
        return -1

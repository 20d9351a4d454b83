"""The counters of worker processes, summed so that a worker's restart never takes them back.

Each worker reports its counters (a flat `name -> number` dict) over the feed
socket every second; `WorkerTotals` keeps each live worker's last report and,
once a worker is gone, folds its counters into a retired total (its levels,
such as connections open, are dropped: a dead worker holds nothing). The sum
of both only ever grows, while the agent runs, whatever the workers do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


class WorkerTotals:
    def __init__(self, is_level: Callable[[str], bool]) -> None:
        self._is_level = is_level
        self._live: dict[int, dict[str, int | float]] = {}
        self._retired: dict[str, int | float] = {}

    def report(self, worker: int, stats: Mapping[str, object]) -> None:
        """A worker's counters as it reports them now (numbers only; the rest is dropped)."""
        self._live[worker] = {
            name: value
            for name, value in stats.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }

    def gone(self, worker: int) -> None:
        """The worker's connection ended: what it counted stays, what it held goes."""
        last = self._live.pop(worker, None)
        if last is None:
            return
        for name, value in last.items():
            if not self._is_level(name):
                self._retired[name] = self._retired.get(name, 0) + value

    @property
    def workers(self) -> int:
        return len(self._live)

    def total(self) -> dict[str, int | float]:
        total = dict(self._retired)
        for stats in self._live.values():
            for name, value in stats.items():
                total[name] = total.get(name, 0) + value
        return total

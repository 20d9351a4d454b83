"""L4 counters per service, made from the backends' counters per virtual service (sans-IO).

A backend counts per virtual service (`VirtualKey`: a VIP and port, or a published
port) as it can: the userspace proxy in plain ints, nftables in a named counter
per service chain, IPVS in the kernel's own service stats. Those counts start
from zero whenever the backend makes the object anew (a published host-mode port
that lost its last task and got one again, an agent restart) and vanish with it.
`ServiceStats.fold` takes one reading of them (`Sample`), adds what each counter
grew since the previous reading to the totals of the service that owns the key
(a counter found smaller than last time was made anew: all of it is growth), so
a service's totals never go back while the agent runs, whatever happens to its
virtual services. Levels (`active`) are not added up over time: they are the
sum of the current values.

What a backend cannot count it leaves out of its sample: the totals then have no
such name for that service, and `GET /metrics` exports no series for it (never
a made-up 0). A service removed from the state is forgotten (`retain`), so its
series go away and memory stays bounded by the state.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping
from typing import TypeAlias

from lb.table import VirtualKey

#: virtual service -> counter name -> value since the backend made the object
Sample: TypeAlias = Mapping[VirtualKey, Mapping[str, int]]

#: the counter names a backend may report (`docs/metrics.md`)
COUNTERS = ("connections", "bytes_in", "bytes_out", "connect_errors", "failovers")
#: the level names (what is there now, not a count)
LEVELS = ("active",)


class ServiceStats:
    """Per service: the counters' totals over the backend's readings, and the levels now."""

    def __init__(self) -> None:
        self._last: dict[VirtualKey, dict[str, int]] = {}
        self._totals: dict[str, dict[str, int]] = {}
        self._levels: dict[str, dict[str, int]] = {}

    def fold(self, sample: Sample, owner: Callable[[VirtualKey], str | None]) -> None:
        """Take one reading; `owner` names the service of a key (None: nobody's now)."""
        levels: dict[str, dict[str, int]] = {}
        last: dict[VirtualKey, dict[str, int]] = {}
        for key, values in sample.items():
            before = self._last.get(key, {})
            last[key] = dict(values)
            service = owner(key)
            if service is None:
                continue
            totals = self._totals.setdefault(service, {})
            for name, value in values.items():
                if name in LEVELS:
                    mine = levels.setdefault(service, {})
                    mine[name] = mine.get(name, 0) + value
                    continue
                previous = before.get(name, 0)
                grown = value - previous if value >= previous else value
                totals[name] = totals.get(name, 0) + grown
        self._last = last
        # A service whose keys are all gone keeps its level names at 0 (it had some).
        for service, names in self._levels.items():
            if service in self._totals:
                mine = levels.setdefault(service, {})
                for name in names:
                    mine.setdefault(name, 0)
        self._levels = levels

    def retain(self, services: Container[str]) -> None:
        """Forget the services not in `services` (removed from the state)."""
        for table in (self._totals, self._levels):
            for gone in [name for name in table if name not in services]:
                del table[gone]

    def snapshot(self) -> dict[str, dict[str, int]]:
        """service -> name -> value: the counters' totals and the levels now."""
        out = {service: dict(totals) for service, totals in self._totals.items()}
        for service, levels in self._levels.items():
            out.setdefault(service, {}).update(levels)
        return out

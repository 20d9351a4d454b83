"""kinship's membership metrics, computed from what the nodes report.

- Detection: for every crash and every observer (a node up from the crash
  until the end of the watch), the time from the crash until that observer
  marks the crashed node failed; percentiles over (crash, observer) pairs, the
  time until the *last* observer knows, and the count of pairs never detected.
- False deaths and false suspicions: a node that is up, marked failed (or
  suspected) by anyone, counted once per (member, incarnation).
- Dissemination: for a user broadcast, the time until 50/99/99.9/100% of the
  live nodes hold it (the origin holds it from the start).
- Bytes per node per second, UDP and TCP alike, over a window.

Pure bookkeeping: the cluster calls `failed`, `suspected`, `delivered`; the
caller decides what is up (`is_up`) and what is slow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of nothing")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered) - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(slots=True)
class Crash:
    """One crash under watch: who crashed when, who must notice, who did when."""

    name: str
    at: float
    observers: set[str]
    detected: dict[str, float] = field(default_factory=dict)
    first_probed: float | None = None  # first direct Ping sent to it after the crash
    first_suspected: float | None = None  # by anyone: where the time before the verdict went

    @property
    def complete(self) -> bool:
        return self.observers <= self.detected.keys()

    def last(self) -> float | None:
        """Crash → the last observer knowing, if all of them know."""
        if not self.complete or not self.observers:
            return None
        return max(self.detected[o] for o in self.observers) - self.at


@dataclass(frozen=True, slots=True)
class DetectionSummary:
    crashes: int
    pairs: int
    p50: float
    p99: float
    max: float
    last_p50: float
    last_p99: float
    last_max: float
    undetected: int  # (crash, observer) pairs never detected
    missed: int  # crashes not known to every observer
    probe_p50: float  # crash -> first direct probe of it by anyone (the wait to be probed)
    probe_max: float
    suspect_p50: float  # crash -> first suspicion by anyone (SWIM: ~1 probe period + 1)
    suspect_max: float
    verdict_p50: float  # first suspicion -> first node marking it failed (the suspicion timeout)
    verdict_max: float
    spread_p50: float  # first node marking it failed -> last node (disseminating the verdict)
    spread_max: float


@dataclass(frozen=True, slots=True)
class Suspicion:
    member: str
    incarnation: int
    by: str
    at: float


class Metrics:
    """Everything a scenario measures, fed by the cluster."""

    def __init__(self, is_up: Callable[[str], bool]) -> None:
        self._is_up = is_up
        self.crashes: list[Crash] = []
        self._open: dict[str, Crash] = {}
        self.false_deaths: dict[tuple[str, int], float] = {}
        self.false_suspicions: dict[tuple[str, int], Suspicion] = {}

    def __repr__(self) -> str:
        return (
            f"<Metrics crashes={len(self.crashes)} false_deaths={len(self.false_deaths)} "
            f"false_suspicions={len(self.false_suspicions)}>"
        )

    # -- inputs (from the cluster) ------------------------------------------------

    def crashed(self, name: str, at: float, observers: Iterable[str]) -> Crash:
        crash = Crash(name, at, set(observers) - {name})
        self.crashes.append(crash)
        self._open[name] = crash
        return crash

    def restarted(self, name: str) -> None:
        """The crashed node is back: stop watching its old life."""
        self._open.pop(name, None)

    def observer_gone(self, observer: str) -> None:
        """An observer crashed too: it no longer has to notice anything."""
        for crash in self._open.values():
            if observer not in crash.detected:
                crash.observers.discard(observer)

    @property
    def watching(self) -> bool:
        """A crash is under watch (the cluster reports probes only then)."""
        return bool(self._open)

    def probed(self, at: float, member: str) -> None:
        """Someone sent `member` a direct probe (a Ping of its own, not a relayed one)."""
        crash = self._open.get(member)
        if crash is not None and crash.first_probed is None:
            crash.first_probed = at

    def failed(self, at: float, observer: str, member: str, incarnation: int) -> None:
        """`observer` marked `member` dead (not a graceful leave)."""
        crash = self._open.get(member)
        if crash is not None and observer in crash.observers:
            crash.detected.setdefault(observer, at)
        if self._is_up(member):
            self.false_deaths.setdefault((member, incarnation), at)

    def suspected(self, at: float, observer: str, member: str, incarnation: int, by: str) -> None:
        crash = self._open.get(member)
        if crash is not None and crash.first_suspected is None:
            crash.first_suspected = at
        if self._is_up(member) and (member, incarnation) not in self.false_suspicions:
            self.false_suspicions[(member, incarnation)] = Suspicion(member, incarnation, by, at)

    # -- results -------------------------------------------------------------------

    def detection(self) -> DetectionSummary:
        latencies = [
            t - c.at for c in self.crashes for o, t in c.detected.items() if o in c.observers
        ]
        lasts = [x for x in (c.last() for c in self.crashes) if x is not None]
        pairs = sum(len(c.observers) for c in self.crashes)
        suspects = [c.first_suspected - c.at for c in self.crashes if c.first_suspected is not None]
        probes = [c.first_probed - c.at for c in self.crashes if c.first_probed is not None]
        verdicts, spreads = [], []
        for crash in self.crashes:
            times = [t for o, t in crash.detected.items() if o in crash.observers]
            if crash.first_suspected is not None and times:
                verdicts.append(min(times) - crash.first_suspected)
            if crash.complete and times:
                spreads.append(max(times) - min(times))
        nan = math.nan
        return DetectionSummary(
            crashes=len(self.crashes),
            pairs=pairs,
            p50=percentile(latencies, 50) if latencies else nan,
            p99=percentile(latencies, 99) if latencies else nan,
            max=max(latencies, default=nan),
            last_p50=percentile(lasts, 50) if lasts else nan,
            last_p99=percentile(lasts, 99) if lasts else nan,
            last_max=max(lasts, default=nan),
            undetected=pairs - len(latencies),
            missed=sum(1 for c in self.crashes if not c.complete),
            probe_p50=percentile(probes, 50) if probes else nan,
            probe_max=max(probes, default=nan),
            suspect_p50=percentile(suspects, 50) if suspects else nan,
            suspect_max=max(suspects, default=nan),
            verdict_p50=percentile(verdicts, 50) if verdicts else nan,
            verdict_max=max(verdicts, default=nan),
            spread_p50=percentile(spreads, 50) if spreads else nan,
            spread_max=max(spreads, default=nan),
        )


SPREAD_QUANTILES = (0.5, 0.99, 0.999, 1.0)


def spread(
    arrivals: dict[str, float],
    origin: str,
    start: float,
    live: Sequence[str],
    quantiles: Sequence[float] = SPREAD_QUANTILES,
) -> dict[float, float | None]:
    """Time from `start` until each fraction of `live` nodes holds a broadcast.

    `arrivals` maps a node's name to when it got the payload; the origin
    counts as holding it at `start`. None: that fraction was never reached.
    """
    times = sorted(
        0.0 if name == origin else arrivals[name] - start
        for name in live
        if name == origin or name in arrivals
    )
    result: dict[float, float | None] = {}
    for q in quantiles:
        need = max(1, math.ceil(q * len(live) - 1e-9))
        result[q] = times[need - 1] if len(times) >= need else None
    return result


def bytes_per_node_second(sent: Sequence[int], before: Sequence[int], seconds: float) -> float:
    """Mean bytes sent per node per second between two snapshots of per-node counters."""
    if seconds <= 0 or not sent:
        return 0.0
    return sum(a - b for a, b in zip(sent, before, strict=True)) / len(sent) / seconds

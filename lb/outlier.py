"""Passive outlier detection on the kernel path: a real that leaves SYNs unanswered is ejected.

Failover on a suspect node (lb/failover.py) waits for gossip: a node that dies
whole is hidden 2 to 3 s after its death, and every connection sent to it
until about a second before that fails (its SYN, retransmitted 1 s later,
still meets the dead task). The node that balances the traffic sees sooner:
its conntrack table holds the flows it DNATed that no reply has reached. So,
as Envoy's outlier detection and the HTTP router's passive ejection do:

- the shell reads, every ~0.15 s while the table has reals of other nodes, the
  TCP flows this node DNATed that are still unanswered (SYN sent, no reply),
  each with the real it went to, and hands them to `observe`;
- a real with a flow unanswered for `threshold` seconds (0.3 s: well under the
  1 s SYN retransmit) becomes a *candidate*, and the shell checks it directly
  (TCP connects from this node; any answer, a refusal too, means alive);
- no answer: the real is *ejected* (`checked`): left out of the table handed
  to the backend, its flows flushed, so the retransmitted SYN is balanced anew;
  an answer: a false candidate (a lost SYN on a lossy path), counted, and the
  flows unanswered then are excused: they never make it a candidate again;
- an ejected real is checked again every `recheck` seconds and comes back when
  it answers; one that leaves the table (a gossip verdict) is forgotten.

The last real of weight > 0 of a virtual service is never ejected: the shell
asks the filter (`SuspectFilter.can_eject`) before it acts on a dead check.

Sans-IO: the caller passes the time, the flows and the checks' results.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lb.table import Real

#: Seconds a flow stays unanswered before its real is a candidate: a live task
#: answers a SYN within a round trip; the client retransmits after 1 s, and the
#: flow must be flushed before that: first seen up to a reading late (0.1 s), then
#: this, the check (0.3 s) and the backend's update, so this leaves some 0.25 s.
THRESHOLD = 0.25
#: Seconds between checks of an ejected real (and the least between two checks
#: of one real that answered)
RECHECK = 1.0
#: Flows followed at once: a poll reads no more than this (the rest waits)
MAX_FLOWS = 4096

#: A flow as conntrack keys it in the original direction: client address and port,
#: destination address and port (the virtual service's)
FlowKey = tuple[str, int, str, int]


@dataclass(frozen=True, slots=True)
class Unanswered:
    """One flow this node DNATed to `real` that no reply has reached yet."""

    flow: FlowKey
    real: Real


@dataclass(frozen=True, slots=True)
class OutlierCounts:
    ejected: list[str]  # reals out of the table now, "address:port"
    ejections: int  # times a real was ejected since start
    restored: int  # times an ejected real answered again and came back
    checks: int  # direct checks made (of candidates and of ejected reals)
    false_candidates: int  # candidates that answered the check: a lost SYN, not a dead real
    kept_last: int  # dead checks not acted on: the real was a service's last
    polls: int  # readings of the unanswered flows
    flows_unanswered: int  # unanswered flows in the last reading


class OutlierDetector:
    """Which reals leave SYNs unanswered, and which of them a direct check found dead."""

    def __init__(
        self, threshold: float = THRESHOLD, recheck: float = RECHECK, max_flows: int = MAX_FLOWS
    ) -> None:
        if threshold <= 0 or recheck <= 0 or max_flows <= 0:
            raise ValueError("threshold, recheck and max_flows must be > 0")
        self.threshold = threshold
        self.recheck = recheck
        self.max_flows = max_flows
        # flow -> (its real, when first seen unanswered)
        self._flows: dict[FlowKey, tuple[Real, float]] = {}
        # flows a check of their real answered: never a reason to check again
        self._excused: set[FlowKey] = set()
        self._checking: set[Real] = set()
        # candidate -> when its oldest unanswered flow was first seen (for the event)
        self._unanswered_since: dict[Real, float] = {}
        # real -> when it may be checked next (an ejected real: its recheck)
        self._not_before: dict[Real, float] = {}
        self._ejected: set[Real] = set()
        self.ejections = 0
        self.restored = 0
        self.checks = 0
        self.false_candidates = 0
        self.kept_last = 0
        self.polls = 0

    def __repr__(self) -> str:
        return f"<OutlierDetector ejected={sorted(self._ejected)} checking={len(self._checking)}>"

    @property
    def ejected(self) -> frozenset[Real]:
        return frozenset(self._ejected)

    def observe(self, now: float, flows: Iterable[Unanswered]) -> list[Real]:
        """One reading of the unanswered flows; the candidates to check now.

        A flow missing from the reading was answered (or closed): forgotten.
        """
        self.polls += 1
        seen: dict[FlowKey, tuple[Real, float]] = {}
        for flow in flows:
            if len(seen) >= self.max_flows:
                break
            before = self._flows.get(flow.flow)
            since = before[1] if before is not None and before[0] == flow.real else now
            seen[flow.flow] = (flow.real, since)
        self._flows = seen
        self._excused &= seen.keys()
        due: list[Real] = []
        for key, (real, since) in seen.items():
            if now - since < self.threshold or key in self._excused:
                continue
            if real in self._ejected or real in self._checking or real in due:
                continue
            if now < self._not_before.get(real, now):
                continue
            due.append(real)
        for real in due:
            self._start_check(real)
            self._unanswered_since[real] = min(since for r, since in seen.values() if r == real)
        return sorted(due)

    def next_due(self) -> float | None:
        """When an unanswered flow seen so far reaches the threshold (None: none will):
        the shell reads again then, not a whole interval later."""
        due = [
            max(since + self.threshold, self._not_before.get(real, 0.0))
            for key, (real, since) in self._flows.items()
            if key not in self._excused and real not in self._ejected and real not in self._checking
        ]
        return min(due) if due else None

    def due_rechecks(self, now: float) -> list[Real]:
        """The ejected reals whose next check is due; each counted as started."""
        due = [
            real
            for real in sorted(self._ejected)
            if real not in self._checking and now >= self._not_before.get(real, now)
        ]
        for real in due:
            self._start_check(real)
        return due

    def _start_check(self, real: Real) -> None:
        self._checking.add(real)
        self.checks += 1

    def checked(self, real: Real, alive: bool, now: float, *, can_eject: bool = True) -> str:
        """A check of `real` ended; what to do: "eject", "restore" or "" (nothing).

        `can_eject`: False when the real is the last of weight > 0 of every virtual
        service it is in: a dead check then ejects nothing.
        """
        self._checking.discard(real)
        self._unanswered_since.pop(real, None)
        self._not_before[real] = now + self.recheck
        if real in self._ejected:
            if alive:
                self._ejected.discard(real)
                self.restored += 1
                return "restore"
            return ""
        if alive:
            self.false_candidates += 1
            self._excused.update(key for key, (r, _) in self._flows.items() if r == real)
            return ""
        if not can_eject:
            self.kept_last += 1
            return ""
        self._ejected.add(real)
        self.ejections += 1
        # its flows are flushed; any left over must not count against it later
        self._flows = {key: value for key, value in self._flows.items() if value[0] != real}
        return "eject"

    def unanswered_since(self, real: Real) -> float | None:
        """When the oldest unanswered flow of a candidate being checked was first seen."""
        return self._unanswered_since.get(real)

    def retain(self, reals: Iterable[Real]) -> list[Real]:
        """Forget every real not in `reals` (the table's now); the ejected ones forgotten."""
        keep = set(reals)
        gone = sorted(self._ejected - keep)
        self._ejected &= keep
        self._not_before = {r: t for r, t in self._not_before.items() if r in keep}
        return gone

    def counts(self, flows_unanswered: int | None = None) -> OutlierCounts:
        return OutlierCounts(
            ejected=[f"{real.address}:{real.port}" for real in sorted(self._ejected)],
            ejections=self.ejections,
            restored=self.restored,
            checks=self.checks,
            false_candidates=self.false_candidates,
            kept_last=self.kept_last,
            polls=self.polls,
            flows_unanswered=len(self._flows) if flows_unanswered is None else flows_unanswered,
        )

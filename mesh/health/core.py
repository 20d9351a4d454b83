"""Task health as a pure state machine: which tasks to probe, when, and what results mean.

Theory of operation. The owning node of a task checks it (docs/design.md: the node
that registered a task is the only one that changes it). `HealthPlanner` is fed
the change feed (services and tasks, in order) and keeps one `HealthTracker`
per running task of this node whose service has a check. It has three inputs,
as every core here: changes (`on_change`), results (`record_probe`, `report`)
and the clock (`expire`, `due`), and its outputs are `Transition`s (the health
to record) and `ProbeOrder`s (the probes the shell must run). It reads no clock
and does no I/O: `now` is an argument, in the shell's monotonic seconds.

The semantics are Docker's HEALTHCHECK (moby `daemon/health.go`):

- a checked task starts `starting`; the first passing probe makes it healthy;
- `retries` consecutive failing probes make it unhealthy, and any pass makes
  it healthy again at once;
- while a task is still `starting` and inside its `start_period`, failures do
  not count; once it has passed (or been reported), every failure counts;
- a probe runs `interval` seconds after the previous one finished, so probes
  of one task never overlap, however long `timeout` is.

A ttl check is driven by the task itself (`report`): a healthy report arms a
deadline `ttl` seconds on, and a deadline that passes makes the task
unhealthy ("TTL expired"). A task that never reports is given `start_period`
plus one `ttl` before that happens, so it does not sit `starting` forever.

Tracker health is the authority on this node: health-only updates of a task
record (the feed echoing our own transitions) never reset a tracker. A change
of a service's check replaces the trackers of its tasks: counters, deadlines
and the probe schedule restart, but a task keeps the health it had, so
tuning a check does not take every task out of rotation at once.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

from mesh.core.model import Change, Health, HealthCheck, Service, Task, TaskState

TTL_EXPIRED = "TTL expired"
CHECK_REMOVED = "health check removed"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeOrder:
    """One probe for the shell to run and hand back to `HealthPlanner.record_probe`."""

    task_id: str
    #: which tracker asked: a result for a tracker since replaced is dropped.
    token: int
    check: HealthCheck
    host: str
    #: the task's actual port; None when neither the check nor the service names one.
    port: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    """A task's health changed: what the shell reports to the store."""

    task_id: str
    health: Health
    output: str


class HealthTracker:
    """The health of one task under one check (one per task; replaced when the check changes)."""

    def __init__(
        self,
        check: HealthCheck,
        *,
        now: float,
        start_period_end: float,
        health: Health = Health.STARTING,
        token: int = 0,
    ) -> None:
        self.check = check
        self.token = token
        #: which of the planner's deadline entries is this tracker's current one
        self.stamp = 0
        self.health = health
        self.output = ""
        self.failures = 0
        self.start_period_end = start_period_end
        self._in_flight = False
        probed = check.type != "ttl"
        self._probe_at = now + check.interval if probed else math.inf
        self._ttl_deadline = math.inf if probed else max(now, start_period_end) + check.ttl

    def __repr__(self) -> str:
        return (
            f"<HealthTracker {self.check.type} {self.health.value} "
            f"failures={self.failures} next={self.next_due():g}>"
        )

    def next_due(self) -> float:
        """When this tracker next needs the clock (math.inf: not until an input arrives)."""
        probe_at = math.inf if self._in_flight else self._probe_at
        return min(probe_at, self._ttl_deadline)

    def take_probe(self, now: float) -> bool:
        """Whether a probe is due now; if so it is in flight until its result is recorded."""
        if self._in_flight or now < self._probe_at:
            return False
        self._in_flight = True
        return True

    def abandon_probe(self) -> None:
        """The probe in flight will never report (the shell stopped): due again at once."""
        self._in_flight = False

    def postpone_probe(self, now: float) -> None:
        """The probe could not be made (this node is out of descriptors): it says
        nothing about the task, so no failure counts; it is tried again an interval on."""
        self._in_flight = False
        self._probe_at = now + self.check.interval

    def record_probe(self, passed: bool, output: str, now: float) -> Health | None:
        """Apply one probe result; the new health on a transition, else None."""
        self._in_flight = False
        self._probe_at = now + self.check.interval
        self.output = output
        if passed:
            self.failures = 0
            return self._become(Health.HEALTHY)
        if self.health is Health.STARTING and now < self.start_period_end:
            return None
        self.failures += 1
        if self.failures >= max(1, self.check.retries):
            return self._become(Health.UNHEALTHY)
        return None

    def report(self, healthy: bool, output: str, now: float) -> Health | None:
        """The task's own word: it sets the health at once (and re-arms a ttl deadline)."""
        self.output = output
        self.failures = 0
        if not healthy:
            self._ttl_deadline = math.inf
            return self._become(Health.UNHEALTHY)
        if self.check.type == "ttl":
            self._ttl_deadline = now + self.check.ttl
        return self._become(Health.HEALTHY)

    def expire(self, now: float) -> Health | None:
        """Turn unhealthy if the ttl deadline has passed without a healthy report."""
        if now < self._ttl_deadline:
            return None
        self._ttl_deadline = math.inf
        self.output = TTL_EXPIRED
        return self._become(Health.UNHEALTHY)

    def _become(self, health: Health) -> Health | None:
        if health is self.health:
            return None
        self.health = health
        return health


class HealthPlanner:
    """The trackers of this node's checked tasks, kept in step with the change feed."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._services: dict[str, Service] = {}
        self._tasks: dict[str, Task] = {}  # this node's running tasks, checked or not
        self._by_service: dict[str, set[str]] = {}
        self._trackers: dict[str, HealthTracker] = {}
        self._tokens = itertools.count(1)
        #: (when, stamp, task id): each tracker's next deadline, as a heap. A tracker's
        #: entry is current while its stamp matches; a replaced one is dropped when it
        #: comes to the top (or at a compaction), so the timer's work and a change's
        #: re-arm cost O(log n) in the checked tasks, not a scan of them.
        self._deadlines: list[tuple[float, int, str]] = []
        self._stamps = itertools.count(1)

    def __repr__(self) -> str:
        return (
            f"<HealthPlanner node={self.node!r} services={len(self._services)} "
            f"tasks={len(self._tasks)} trackers={len(self._trackers)}>"
        )

    def tracker(self, task_id: str) -> HealthTracker | None:
        return self._trackers.get(task_id)

    # -- inputs: changes ---------------------------------------------------

    def on_change(self, change: Change, now: float, wall_now: float) -> list[Transition]:
        """Follow one change of the feed. `wall_now` (time.time()) places `created_at`."""
        record = change.after
        if isinstance(record, Service):
            return self._on_service(record, now, wall_now)
        if isinstance(record, Task) and record.node == self.node:
            self._on_task(record, now, wall_now)
        return []

    def _on_service(self, service: Service, now: float, wall_now: float) -> list[Transition]:
        old = self._services.pop(service.name, None)
        if not service.deleted:
            self._services[service.name] = service
        old_check = None if old is None else old.health_check
        new_check = None if service.deleted else service.health_check
        if old is not None and old_check == new_check:
            return []  # ports or labels changed: orders read them afresh anyway
        released = self._health_of_tasks(service.name) if new_check is None else {}
        for task_id in sorted(self._by_service.get(service.name, ())):
            self._retrack(self._tasks[task_id], now, wall_now)
        if old_check is None or service.deleted:
            return []
        # Without a check a task is healthy (as at registration): lift what the check said.
        return [
            Transition(task_id=task_id, health=Health.HEALTHY, output=CHECK_REMOVED)
            for task_id, health in released.items()
            if health is not Health.HEALTHY
        ]

    def _on_task(self, task: Task, now: float, wall_now: float) -> None:
        if task.deleted or task.state is not TaskState.RUNNING:
            self._forget(task)
            return
        known = task.id in self._tasks
        self._tasks[task.id] = task
        self._by_service.setdefault(task.service, set()).add(task.id)
        if not known:
            self._retrack(task, now, wall_now)

    def _retrack(self, task: Task, now: float, wall_now: float) -> None:
        """Give a task a fresh tracker for its service's current check, or none."""
        previous = self._trackers.pop(task.id, None)
        service = self._services.get(task.service)
        check = None if service is None else service.health_check
        if check is None:
            return
        tracker = HealthTracker(
            check,
            now=now,
            token=next(self._tokens),
            health=task.health if previous is None else previous.health,
            start_period_end=now + (task.created_at + check.start_period - wall_now),
        )
        self._trackers[task.id] = tracker
        self._schedule(task.id, tracker)

    def _forget(self, task: Task) -> None:
        self._tasks.pop(task.id, None)
        self._trackers.pop(task.id, None)
        siblings = self._by_service.get(task.service)
        if siblings is not None:
            siblings.discard(task.id)
            if not siblings:
                del self._by_service[task.service]

    def _health_of_tasks(self, service: str) -> dict[str, Health]:
        """The health each task of a service has now, tracker first, record second."""
        found = {}
        for task_id in self._by_service.get(service, ()):
            tracker = self._trackers.get(task_id)
            found[task_id] = self._tasks[task_id].health if tracker is None else tracker.health
        return found

    # -- inputs: results -----------------------------------------------------

    def record_probe(
        self, order: ProbeOrder, passed: bool, output: str, now: float
    ) -> Transition | None:
        """Apply a probe result, unless its task is gone or its check was replaced."""
        tracker = self._trackers.get(order.task_id)
        if tracker is None or tracker.token != order.token:
            return None
        health = tracker.record_probe(passed, output, now)
        self._schedule(order.task_id, tracker)
        return _transition(order.task_id, tracker, health)

    def postpone(self, order: ProbeOrder, now: float) -> None:
        """A probe this node could not make (its own shortage, not the task's failure)."""
        tracker = self._trackers.get(order.task_id)
        if tracker is not None and tracker.token == order.token:
            tracker.postpone_probe(now)
            self._schedule(order.task_id, tracker)

    def abandon(self, order: ProbeOrder) -> None:
        """Forget a probe that was cancelled before its result, so its task is probed again."""
        tracker = self._trackers.get(order.task_id)
        if tracker is not None and tracker.token == order.token:
            tracker.abandon_probe()
            self._schedule(order.task_id, tracker)

    def report(self, task_id: str, healthy: bool, output: str, now: float) -> Transition | None:
        """A task's own report (`PUT /v1/tasks/{id}/health`); ignored unless it runs here.

        A task without a check may report too: its word is the only one there is.
        """
        tracker = self._trackers.get(task_id)
        if tracker is not None:
            health = tracker.report(healthy, output, now)
            self._schedule(task_id, tracker)
            return _transition(task_id, tracker, health)
        task = self._tasks.get(task_id)
        health = Health.HEALTHY if healthy else Health.UNHEALTHY
        if task is None or task.health is health:
            return None
        return Transition(task_id=task_id, health=health, output=output)

    # -- inputs: the clock ---------------------------------------------------

    def expire(self, now: float) -> list[Transition]:
        """Turn unhealthy every ttl-checked task whose deadline has passed."""
        found = []
        for task_id, tracker in self._take_due(now):
            if (transition := _transition(task_id, tracker, tracker.expire(now))) is not None:
                found.append(transition)
            self._schedule(task_id, tracker)
        return found

    def due(self, now: float) -> list[ProbeOrder]:
        """The probes to start now; each is in flight until `record_probe` gets its result."""
        orders = []
        for task_id, tracker in self._take_due(now):
            if tracker.take_probe(now):
                orders.append(self._order(task_id, tracker))
            self._schedule(task_id, tracker)
        return orders

    def next_deadline(self) -> float | None:
        """When `expire` or `due` next has work; None while nothing is scheduled."""
        deadlines = self._deadlines
        while deadlines and not self._is_current(deadlines[0]):
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def _schedule(self, task_id: str, tracker: HealthTracker) -> None:
        """File a tracker's next deadline after anything that may have moved it."""
        tracker.stamp = stamp = next(self._stamps)
        when = tracker.next_due()
        if when == math.inf:
            return
        heapq.heappush(self._deadlines, (when, stamp, task_id))
        if len(self._deadlines) > 2 * len(self._trackers) + 64:
            # replaced entries under a later current one (a ttl task reporting often):
            # drop them all at once, so the heap stays within twice the trackers
            self._deadlines = [entry for entry in self._deadlines if self._is_current(entry)]
            heapq.heapify(self._deadlines)

    def _take_due(self, now: float) -> list[tuple[str, HealthTracker]]:
        """The trackers with a deadline at or before `now`, taken off the heap (the
        caller files each one's next deadline after acting on it)."""
        taken = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, stamp, task_id = heapq.heappop(deadlines)
            tracker = self._trackers.get(task_id)
            if tracker is not None and tracker.stamp == stamp:
                taken.append((task_id, tracker))
        return taken

    def _is_current(self, entry: tuple[float, int, str]) -> bool:
        tracker = self._trackers.get(entry[2])
        return tracker is not None and tracker.stamp == entry[1]

    def _order(self, task_id: str, tracker: HealthTracker) -> ProbeOrder:
        task = self._tasks[task_id]
        service = self._services[task.service]
        target = tracker.check.port
        if target is None and service.ports:
            target = service.ports[0].target_port
        return ProbeOrder(
            task_id=task_id,
            token=tracker.token,
            check=tracker.check,
            host=task.address,
            port=None if target is None else task.actual_port(target),
        )


def _transition(task_id: str, tracker: HealthTracker, health: Health | None) -> Transition | None:
    if health is None:
        return None
    return Transition(task_id=task_id, health=health, output=tracker.output)

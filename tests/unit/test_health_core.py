"""The health planner, driven directly: a virtual clock, no sockets, no sleeps."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mesh.health.core
from mesh.core.model import (
    Change,
    Health,
    HealthCheck,
    Kind,
    PortConfig,
    Service,
    Task,
    TaskState,
)
from mesh.health.core import HealthPlanner, HealthTracker, ProbeOrder, Transition

NODE = "n1"
WALL = 1_700_000_000.0  # the wall clock at now = 0.0
HTTP = HealthCheck(type="http", path="/health", interval=1.0, timeout=0.5, retries=3)
TTL = HealthCheck(type="ttl", ttl=10.0)


def service(
    check: HealthCheck | None = HTTP, *, name: str = "web", ports: tuple[int, ...] = (80,)
) -> Service:
    return Service(
        name=name,
        id=f"s-{name}",
        health_check=check,
        ports=tuple(
            PortConfig(protocol="tcp", target_port=p, published_port=30000 + p) for p in ports
        ),
    )


def task(
    task_id: str = "t1",
    *,
    service: str = "web",
    node: str = NODE,
    health: Health = Health.STARTING,
    created_at: float = WALL,
) -> Task:
    return Task(
        id=task_id,
        name=f"{service}.1.{task_id}",
        service=service,
        slot=1,
        node=node,
        address="192.0.2.7",
        ports={80: 31001},
        health=health,
        created_at=created_at,
    )


def upsert(record: Service | Task, before: Service | Task | None = None) -> Change:
    kind = Kind.SERVICE if isinstance(record, Service) else Kind.TASK
    return Change(kind, record.key, before, record)


def planner_with(*records: Service | Task, now: float = 0.0) -> HealthPlanner:
    planner = HealthPlanner(NODE)
    for record in records:
        assert planner.on_change(upsert(record), now, WALL + now) == []
    return planner


def probe(planner: HealthPlanner, passed: bool, now: float) -> Transition | None:
    """Run the one due probe at `now` with the given result."""
    (order,) = planner.due(now)
    return planner.record_probe(order, passed, "ok" if passed else "HTTP 500", now)


def health(planner: HealthPlanner, task_id: str = "t1") -> Health:
    tracker = planner.tracker(task_id)
    assert tracker is not None
    return tracker.health


# -- the tracker ---------------------------------------------------------------


def test_first_pass_turns_starting_healthy() -> None:
    planner = planner_with(service(), task())
    assert planner.next_deadline() == 1.0  # one interval after registration (as Docker)
    assert planner.due(0.5) == []
    assert probe(planner, True, 1.0) == Transition(task_id="t1", health=Health.HEALTHY, output="ok")
    assert planner.next_deadline() == 2.0
    assert probe(planner, True, 2.0) is None  # no transition, nothing to report


def test_order_names_the_actual_port_and_the_check() -> None:
    planner = planner_with(service(), task())
    (order,) = planner.due(1.0)
    assert order == ProbeOrder(
        task_id="t1", token=order.token, check=HTTP, host="192.0.2.7", port=31001
    )


def test_check_port_is_mapped_and_no_port_is_none() -> None:
    explicit = planner_with(service(dataclasses.replace(HTTP, port=8080)), task())
    assert explicit.due(1.0)[0].port == 8080  # no mapping: the same port
    portless = planner_with(service(ports=()), task())
    assert portless.due(1.0)[0].port is None


def test_retries_consecutive_failures_turn_unhealthy_not_before() -> None:
    planner = planner_with(service(), task())
    probe(planner, True, 1.0)
    assert probe(planner, False, 2.0) is None
    assert probe(planner, False, 3.0) is None
    assert probe(planner, True, 4.0) is None  # a pass breaks the run
    assert probe(planner, False, 5.0) is None
    assert probe(planner, False, 6.0) is None
    assert probe(planner, False, 7.0) == Transition(
        task_id="t1", health=Health.UNHEALTHY, output="HTTP 500"
    )
    assert probe(planner, False, 8.0) is None  # already unhealthy


def test_starting_task_that_never_passes_turns_unhealthy() -> None:
    planner = planner_with(service(), task())
    assert [probe(planner, False, t) for t in (1.0, 2.0)] == [None, None]
    assert health(planner) is Health.STARTING
    assert probe(planner, False, 3.0) is not None
    assert health(planner) is Health.UNHEALTHY


def test_recovery_is_immediate() -> None:
    planner = planner_with(service(dataclasses.replace(HTTP, retries=1)), task())
    assert probe(planner, False, 1.0) is not None
    assert probe(planner, True, 2.0) == Transition(task_id="t1", health=Health.HEALTHY, output="ok")


def test_failures_inside_start_period_do_not_count() -> None:
    check = dataclasses.replace(HTTP, start_period=5.0)
    planner = planner_with(service(check), task())
    for t in (1.0, 2.0, 3.0, 4.0):
        assert probe(planner, False, t) is None
    assert health(planner) is Health.STARTING
    assert [probe(planner, False, t) for t in (5.0, 6.0)] == [None, None]
    assert probe(planner, False, 7.0) is not None  # the third failure past the period


def test_start_period_counts_from_created_at_not_from_now() -> None:
    check = dataclasses.replace(HTTP, start_period=5.0, retries=1)
    # Registered 10 s before the planner heard of it (an agent restart, say).
    planner = planner_with(service(check), task(created_at=WALL - 10.0))
    assert probe(planner, False, 1.0) is not None


def test_pass_inside_start_period_ends_it() -> None:
    check = dataclasses.replace(HTTP, start_period=100.0, retries=2)
    planner = planner_with(service(check), task())
    assert probe(planner, True, 1.0) is not None
    assert probe(planner, False, 2.0) is None
    assert probe(planner, False, 3.0) is not None  # counted: it had started (as Docker)


def test_probes_of_one_task_never_overlap() -> None:
    planner = planner_with(service(), task())
    (order,) = planner.due(1.0)
    assert planner.next_deadline() is None  # in flight: nothing else scheduled
    assert planner.due(50.0) == []
    planner.record_probe(order, True, "ok", 3.5)
    assert planner.next_deadline() == 4.5  # one interval after the result


def test_an_abandoned_probe_is_due_again() -> None:
    planner = planner_with(service(), task())
    (order,) = planner.due(1.0)
    planner.abandon(order)
    assert planner.next_deadline() == 1.0
    assert planner.due(1.0) != []


def test_ttl_healthy_report_arms_a_deadline_and_expires() -> None:
    planner = planner_with(service(TTL), task())
    assert planner.due(100.0) == []  # never probed
    assert planner.report("t1", True, "alive", 1.0) == Transition(
        task_id="t1", health=Health.HEALTHY, output="alive"
    )
    assert planner.next_deadline() == 11.0
    assert planner.expire(10.9) == []
    assert planner.report("t1", True, "", 9.0) is None  # refresh
    assert planner.expire(18.9) == []
    assert planner.expire(19.0) == [
        Transition(task_id="t1", health=Health.UNHEALTHY, output="TTL expired")
    ]
    assert planner.next_deadline() is None
    assert planner.report("t1", True, "back", 30.0) is not None


def test_ttl_task_that_never_reports_expires_after_start_period_plus_ttl() -> None:
    planner = planner_with(service(dataclasses.replace(TTL, start_period=5.0)), task())
    assert planner.next_deadline() == 15.0
    assert planner.expire(15.0)[0].health is Health.UNHEALTHY


def test_ttl_unhealthy_report_is_immediate_and_disarms() -> None:
    planner = planner_with(service(TTL), task())
    planner.report("t1", True, "", 0.0)
    assert planner.report("t1", False, "db down", 1.0) == Transition(
        task_id="t1", health=Health.UNHEALTHY, output="db down"
    )
    assert planner.next_deadline() is None


def test_explicit_reports_on_a_probed_task_then_probes_apply() -> None:
    planner = planner_with(service(), task())
    assert planner.report("t1", False, "maintenance", 0.5) is not None
    assert probe(planner, True, 1.0) is not None  # a pass heals at once
    assert planner.report("t1", False, "maintenance", 1.5) is not None
    assert planner.report("t1", True, "done", 1.6) is not None
    assert [probe(planner, False, t) for t in (2.0, 3.0, 4.0)][-1] is not None


def test_reports_for_unknown_or_unchecked_tasks() -> None:
    planner = planner_with(service(None), task(health=Health.HEALTHY))
    assert planner.report("nope", False, "", 0.0) is None
    assert planner.report("t1", True, "", 0.0) is None  # already healthy
    assert planner.report("t1", False, "bad", 0.0) == Transition(
        task_id="t1", health=Health.UNHEALTHY, output="bad"
    )


# -- the planner: which tasks, and when trackers change -------------------------


def test_unchecked_and_foreign_tasks_are_not_tracked() -> None:
    planner = planner_with(
        service(None), service(name="api"), task("t1"), task("t2", service="api", node="n2")
    )
    assert planner.tracker("t1") is None
    assert planner.tracker("t2") is None
    assert planner.next_deadline() is None


def test_task_before_its_service_is_tracked_once_the_service_arrives() -> None:
    planner = planner_with(task(), service())
    assert planner.tracker("t1") is not None


def test_draining_and_deleted_tasks_stop_being_probed() -> None:
    planner = planner_with(service(), task("t1"), task("t2"))
    drained = dataclasses.replace(task("t1"), state=TaskState.DRAINING, drain_until=WALL + 5)
    planner.on_change(upsert(drained, task("t1")), 0.5, WALL + 0.5)
    deleted = dataclasses.replace(task("t2"), deleted=True)
    planner.on_change(upsert(deleted, task("t2")), 0.5, WALL + 0.5)
    assert planner.due(1.0) == []
    assert planner.next_deadline() is None
    assert planner.report("t1", True, "", 1.0) is None


def test_result_for_a_gone_or_replaced_tracker_is_dropped() -> None:
    planner = planner_with(service(), task())
    (order,) = planner.due(1.0)
    planner.on_change(upsert(service(dataclasses.replace(HTTP, path="/ready"))), 1.1, WALL)
    assert planner.record_probe(order, True, "ok", 1.2) is None
    planner.on_change(upsert(dataclasses.replace(task(), deleted=True)), 1.3, WALL)
    assert planner.record_probe(order, True, "ok", 1.4) is None


def test_health_only_updates_do_not_reset_the_tracker() -> None:
    planner = planner_with(service(), task())
    probe(planner, True, 1.0)
    probe(planner, False, 2.0)
    echoed = dataclasses.replace(task(), health=Health.HEALTHY, health_output="ok")
    planner.on_change(upsert(echoed, task()), 2.1, WALL)
    tracker = planner.tracker("t1")
    assert tracker is not None
    assert tracker.failures == 1
    assert planner.next_deadline() == 3.0


def test_check_change_resets_counters_and_schedule_but_keeps_health() -> None:
    planner = planner_with(service(), task())
    probe(planner, True, 1.0)
    probe(planner, False, 2.0)
    probe(planner, False, 3.0)
    slower = dataclasses.replace(HTTP, interval=10.0)
    assert planner.on_change(upsert(service(slower), service()), 3.5, WALL) == []
    tracker = planner.tracker("t1")
    assert tracker is not None
    assert (tracker.check, tracker.health, tracker.failures) == (slower, Health.HEALTHY, 0)
    assert planner.next_deadline() == 13.5


def test_unchanged_check_keeps_the_tracker() -> None:
    planner = planner_with(service(), task())
    before = planner.tracker("t1")
    planner.on_change(upsert(service(ports=(81,)), service()), 0.5, WALL)
    assert planner.tracker("t1") is before


def test_removing_the_check_makes_tasks_healthy() -> None:
    planner = planner_with(service(), task("t1"), task("t2"))
    probe_all = planner.due(1.0)
    planner.record_probe(probe_all[0], True, "ok", 1.0)
    planner.record_probe(probe_all[1], False, "HTTP 500", 1.0)
    transitions = planner.on_change(upsert(service(None), service()), 1.5, WALL)
    assert transitions == [
        Transition(
            task_id=probe_all[1].task_id, health=Health.HEALTHY, output="health check removed"
        )
    ]
    assert planner.next_deadline() is None


def test_deleting_the_service_drops_its_trackers_silently() -> None:
    planner = planner_with(service(), task())
    gone = dataclasses.replace(service(), deleted=True)
    assert planner.on_change(upsert(gone, service()), 0.5, WALL) == []
    assert planner.tracker("t1") is None


def test_recorded_health_is_kept_across_a_restart() -> None:
    planner = planner_with(service(), task(health=Health.HEALTHY))
    assert health(planner) is Health.HEALTHY
    assert probe(planner, True, 1.0) is None


def test_reprs_say_what_they_hold() -> None:
    planner = planner_with(service(), task())
    assert repr(planner) == "<HealthPlanner node='n1' services=1 tasks=1 trackers=1>"
    assert repr(planner.tracker("t1")) == "<HealthTracker http starting failures=0 next=1>"


def test_core_imports_no_io() -> None:
    """The core is sans-IO: no asyncio, socket or time, so it runs under any clock."""
    tree = ast.parse(Path(mesh.health.core.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"asyncio", "socket", "time", "aiohttp", "random"}


# -- properties --------------------------------------------------------------------


def expected_health(results: list[tuple[float, bool]], start_period: float, retries: int) -> Health:
    """The spec, said declaratively: unhealthy iff the failures since the last pass that
    count reach `retries`; a failure counts unless it is inside the start period before
    any pass."""
    passed_once, run = False, 0
    for at, passed in results:
        if passed:
            passed_once, run = True, 0
        elif passed_once or at >= start_period:
            run += 1
    if run >= retries:
        return Health.UNHEALTHY
    return Health.HEALTHY if passed_once else Health.STARTING


@given(
    outcomes=st.lists(st.tuples(st.floats(0.0, 3.0), st.booleans()), max_size=40),
    retries=st.integers(1, 5),
    start_period=st.sampled_from([0.0, 2.5, 10.0]),
)
def test_health_follows_the_spec_and_reports_every_change(
    outcomes: list[tuple[float, bool]], retries: int, start_period: float
) -> None:
    check = dataclasses.replace(HTTP, retries=retries, start_period=start_period)
    tracker = HealthTracker(check, now=0.0, start_period_end=start_period)
    now, seen, shown = 0.0, [], Health.STARTING
    for gap, passed in outcomes:
        now += check.interval + gap
        assert tracker.take_probe(now)
        reported = tracker.record_probe(passed, "", now)
        seen.append((now, passed))
        want = expected_health(seen, start_period, retries)
        assert tracker.health is want
        assert reported is (None if want is shown else want)
        shown = want


@given(
    steps=st.lists(st.tuples(st.floats(0.0, 20.0), st.booleans()), max_size=30),
    ttl=st.sampled_from([1.0, 5.0]),
)
def test_ttl_is_unhealthy_iff_the_last_report_is_bad_or_stale(
    steps: list[tuple[float, bool]], ttl: float
) -> None:
    tracker = HealthTracker(dataclasses.replace(TTL, ttl=ttl), now=0.0, start_period_end=0.0)
    now, last = 0.0, None
    for gap, healthy in steps:
        now += gap
        tracker.expire(now)  # the timer fires before the report is handled
        tracker.report(healthy, "", now)
        last = (now, healthy)
    now += 0.5
    tracker.expire(now)
    assert last is None or tracker.health is (
        Health.HEALTHY if last[1] and now < last[0] + ttl else Health.UNHEALTHY
    )
    assert tracker.next_due() == (
        last[0] + ttl
        if last and tracker.health is Health.HEALTHY
        else (ttl if last is None and now < ttl else math.inf)
    )


# -- the deadline heap: the same answers as a scan of every tracker, without the scan ----


def _scanned_deadline(planner: HealthPlanner) -> float | None:
    """What `next_deadline` answered before the heap: the minimum over every tracker."""
    trackers = [planner.tracker(task_id) for task_id in sorted(planner._tasks)]
    deadline = min((t.next_due() for t in trackers if t is not None), default=math.inf)
    return None if deadline == math.inf else deadline


_STEP = st.one_of(
    st.tuples(st.just("register"), st.integers(0, 7)),
    st.tuples(st.just("drop"), st.integers(0, 7)),
    st.tuples(st.just("check"), st.sampled_from(["web", "api"]), st.sampled_from(["http", "ttl"])),
    st.tuples(st.just("uncheck"), st.sampled_from(["web", "api"])),
    st.tuples(st.just("report"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("advance"), st.floats(0.0, 12.0)),
    st.tuples(st.just("finish"), st.booleans()),
    st.tuples(st.just("abandon")),
)


@given(st.lists(_STEP, max_size=60))
def test_the_deadline_heap_answers_as_a_scan_of_every_tracker(steps: list[tuple[Any, ...]]) -> None:
    """Random registrations, removals, check changes, reports, probes and time: after
    every step `next_deadline` is the minimum over the trackers, and a timer at `now`
    expires and probes exactly the trackers a scan finds due."""
    checks = {"http": HTTP, "ttl": TTL}
    services = {name: service(name=name) for name in ("web", "api")}
    planner = planner_with(*services.values())
    now = 0.0
    in_flight: list[ProbeOrder] = []
    for step in steps:
        match step:
            case ("register", n):
                planner.on_change(
                    upsert(task(f"t{n}", service=("web", "api")[n % 2])), now, WALL + now
                )
            case ("drop", n):
                gone = dataclasses.replace(
                    task(f"t{n}", service=("web", "api")[n % 2]), deleted=True
                )
                planner.on_change(upsert(gone), now, WALL + now)
            case ("check", name, kind):
                services[name] = dataclasses.replace(services[name], health_check=checks[kind])
                planner.on_change(upsert(services[name]), now, WALL + now)
            case ("uncheck", name):
                services[name] = dataclasses.replace(services[name], health_check=None)
                planner.on_change(upsert(services[name]), now, WALL + now)
            case ("report", n, healthy):
                planner.report(f"t{n}", healthy, "", now)
            case ("advance", seconds):
                now += seconds
                trackers = {tid: planner.tracker(tid) for tid in planner._tasks}
                live = {tid: t for tid, t in trackers.items() if t is not None}
                expiring = {
                    tid
                    for tid, t in live.items()
                    if t._ttl_deadline <= now and t.health is not Health.UNHEALTHY
                }
                assert {transition.task_id for transition in planner.expire(now)} == expiring
                probing = {
                    tid for tid, t in live.items() if not t._in_flight and t._probe_at <= now
                }
                orders = planner.due(now)
                assert {order.task_id for order in orders} == probing
                in_flight += orders
            case ("finish", passed) if in_flight:
                planner.record_probe(in_flight.pop(0), passed, "", now)
            case ("abandon",) if in_flight:
                planner.abandon(in_flight.pop())
        assert planner.next_deadline() == _scanned_deadline(planner)
        assert len(planner._deadlines) <= 2 * len(planner._tasks) + 65


def test_a_change_costs_no_scan_of_the_checked_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 checked tasks on this node: a registration, a probe result and the timer's
    next deadline each look at a few trackers, not at all of them (a scan did 10,000)."""
    planner = planner_with(service())
    for n in range(10_000):
        planner.on_change(upsert(task(f"t{n}")), 0.0, WALL)
    looked = 0
    real_next_due = HealthTracker.next_due

    def counted(self: HealthTracker) -> float:
        nonlocal looked
        looked += 1
        return real_next_due(self)

    monkeypatch.setattr(HealthTracker, "next_due", counted)
    planner.on_change(upsert(task("t-new")), 0.5, WALL + 0.5)
    assert planner.next_deadline() == HTTP.interval
    (order, *others) = planner.due(HTTP.interval)
    assert len(others) == 9_999
    looked = 0
    planner.record_probe(order, True, "", 1.2)
    planner.on_change(upsert(task("t-newer")), 1.2, WALL + 1.2)
    assert planner.next_deadline() == 1.5  # t-new's first probe
    assert looked <= 4

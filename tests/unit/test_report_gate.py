"""A worker's reports: sent when its counters move, else only every heartbeat."""

from __future__ import annotations

from mesh.core.reportgate import ReportGate


def test_unchanged_counters_go_up_only_every_heartbeat() -> None:
    gate = ReportGate(heartbeat=10.0)
    sent = [t for t in range(60) if gate.due(({"queries": 5}, 7), float(t))]
    print(f"reports of an idle worker in 60 s: {len(sent)} (one a second before)")
    assert sent == [0, 10, 20, 30, 40, 50]


def test_a_change_goes_up_at_once() -> None:
    gate = ReportGate(heartbeat=10.0)
    counters = {"queries": 1}
    assert gate.due((counters, 1), 0.0)
    assert not gate.due((counters, 1), 1.0)
    counters["queries"] += 1  # the same dict, changed in place: still seen
    assert gate.due((counters, 1), 2.0)
    assert gate.due((counters, 2), 3.0)  # the feed moved on
    assert not gate.due((counters, 2), 4.0)

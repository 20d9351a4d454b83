"""Workers' counters summed: a restart never takes one backwards; levels go with the worker."""

from __future__ import annotations

from mesh.core.workertotals import WorkerTotals


def test_a_gone_worker_keeps_its_counts_and_drops_its_levels() -> None:
    totals = WorkerTotals(lambda name: name.endswith("_open"))
    totals.report(1, {"answered": 10, "tcp_open": 2, "note": "x", "flag": True})
    totals.report(2, {"answered": 5, "tcp_open": 1})
    assert totals.total() == {"answered": 15, "tcp_open": 3}
    totals.gone(1)
    totals.report(3, {"answered": 0, "tcp_open": 0})  # the replacement starts from zero
    assert totals.total() == {"answered": 15, "tcp_open": 1}
    assert totals.workers == 2
    totals.report(3, {"answered": 4, "tcp_open": 1})
    totals.report(2, {"answered": 6, "tcp_open": 0})
    assert totals.total() == {"answered": 20, "tcp_open": 1}
    totals.gone(99)  # never reported
    totals.gone(3)
    totals.gone(3)  # twice: counted once
    assert totals.total() == {"answered": 20, "tcp_open": 0}

"""Lifeguard's pieces alone: the local health score and one suspicion timer."""

from __future__ import annotations

import pytest

from gossip.awareness import Awareness
from gossip.suspicion import Suspicion


def test_awareness_is_clamped_and_scales_the_period() -> None:
    awareness = Awareness(8)
    assert awareness.apply_delta(-1) == 0
    assert awareness.scale(1.0) == 1.0
    assert awareness.apply_delta(3) == 3
    assert awareness.scale(0.5) == 2.0
    assert awareness.apply_delta(100) == 7
    assert awareness.scale(1.0) == 8.0  # LAN: never beyond 8 s
    assert repr(awareness) == "<Awareness 7/7>"


def test_suspicion_starts_at_max_and_decays_with_distinct_confirmations() -> None:
    s = Suspicion("b", k=3, min_timeout=2.0, max_timeout=30.0, start=10.0)
    assert s.deadline == 40.0
    assert not s.confirm("b")  # the accuser is not an independent confirmation
    assert s.confirm("c")
    assert not s.confirm("c")
    assert s.deadline == pytest.approx(10.0 + 16.0)  # 30 - 28 ln2/ln4
    assert s.confirm("d")
    assert s.deadline == pytest.approx(10.0 + 7.81)
    assert s.confirm("e")
    assert s.deadline == pytest.approx(12.0)
    assert not s.confirm("f")  # k reached: no more counting, no more re-gossip
    assert s.confirmations == 3
    assert "3/3" in repr(s)


def test_suspicion_without_wanted_confirmations_is_min() -> None:
    s = Suspicion("b", k=0, min_timeout=4.0, max_timeout=24.0, start=1.0)
    assert s.deadline == 5.0
    assert not s.confirm("c")

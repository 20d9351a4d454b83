"""mesh.core.heap: the start's heap is collected once, then frozen."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from mesh.core.heap import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()  # whatever an earlier test froze
    try:
        yield
    finally:
        gc.unfreeze()  # the rest of the session collects as it did


def test_the_garbage_goes_first_and_what_lives_is_no_longer_walked(unfrozen: None) -> None:
    garbage_a, garbage_b = _Node(), _Node()
    garbage_a.other, garbage_b.other = garbage_b, garbage_a  # a cycle: only gc frees it
    gone = weakref.ref(garbage_a)
    del garbage_a, garbage_b
    kept = _Node()
    kept.other = _Node()

    frozen = freeze_startup_heap()

    assert gone() is None, "the start's cyclic garbage was frozen, not collected"
    assert frozen == gc.get_freeze_count() > 0
    assert gc.is_tracked(kept)
    # A full collection walks generations 0-2; a frozen object is in none of them.
    walked = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
    assert id(kept) not in walked
    # Objects made afterwards are collected as before.
    late_a, late_b = _Node(), _Node()
    late_a.other, late_b.other = late_b, late_a
    late_gone = weakref.ref(late_a)
    del late_a, late_b
    gc.collect()
    assert late_gone() is None

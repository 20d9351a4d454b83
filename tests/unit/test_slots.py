"""The slot index a registration takes its slot from (mesh.state.slots): the lowest
slot no live task holds, as a scan of the tasks would find it, without the scan."""

from __future__ import annotations

import random

from mesh.state.slots import SlotIndex


def _lowest_by_scan(held: list[int]) -> int:
    slot = 1
    while slot in held:
        slot += 1
    return slot


def test_slots_fill_from_one_and_reuse_the_lowest_hole() -> None:
    slots = SlotIndex()
    for _ in range(5):
        slots.take(slots.lowest_free())
    assert slots.lowest_free() == 6
    slots.release(4)
    slots.release(2)
    assert slots.lowest_free() == 2
    slots.take(2)
    assert slots.lowest_free() == 4
    slots.take(4)
    assert slots.lowest_free() == 6


def test_a_slot_held_twice_is_free_only_when_both_let_go() -> None:
    slots = SlotIndex()
    slots.take(1)
    slots.take(1)  # two nodes gave slot 1 at the same moment
    slots.release(1)
    assert slots.lowest_free() == 2
    slots.release(1)
    assert slots.lowest_free() == 1
    assert len(slots) == 0


def test_random_takes_and_releases_agree_with_a_scan() -> None:
    rng = random.Random(20)
    slots = SlotIndex()
    held: list[int] = []
    for _ in range(5000):
        if held and rng.random() < 0.4:
            slot = held.pop(rng.randrange(len(held)))
            slots.release(slot)
        else:
            # mostly the lowest free slot (a registration), sometimes any (a peer's task)
            slot = slots.lowest_free() if rng.random() < 0.8 else rng.randint(1, 60)
            held.append(slot)
            slots.take(slot)
        assert slots.lowest_free() == _lowest_by_scan(held)

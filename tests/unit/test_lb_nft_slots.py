"""`lb.nft.slots`: how many numgen slots each real gets, so that a cycle of the map
gives each real its weight's share exactly, or within 1/MAX_SLOTS when capped."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from lb.nft.slots import MAX_SLOTS, share_error, slot_counts

weights_strategy = st.dictionaries(
    st.integers(0, 2000), st.integers(0, 1000), min_size=1, max_size=400
)


def test_one_to_three_is_four_slots_and_gcd_reduces() -> None:
    assert slot_counts({"a": 1, "b": 3}, weighted=True) == {"a": 1, "b": 3}
    assert slot_counts({"a": 250, "b": 750}, weighted=True) == {"a": 1, "b": 3}
    assert slot_counts({"a": 1000, "b": 1000, "c": 0}, weighted=True) == {"a": 1, "b": 1}


def test_round_robin_is_one_slot_per_ready_real_whatever_the_weight() -> None:
    assert slot_counts({"a": 7, "b": 1, "c": 0}, weighted=False) == {"a": 1, "b": 1}


def test_no_256_cap_weights_up_to_1000_with_300_reals() -> None:
    # 300 reals, weights 1..1000 with no common divisor: the map is capped, not refused.
    weights = {i: 1 + (i * 337) % 1000 for i in range(300)}
    counts = slot_counts(weights, weighted=True)
    assert sum(counts.values()) == MAX_SLOTS
    error = share_error(weights, counts)
    print(f"300 reals, weights 1..1000: {sum(counts.values())} slots, max share error {error:.6%}")
    assert error <= 1 / MAX_SLOTS


@settings(max_examples=300, deadline=None)
@given(weights_strategy)
def test_shares_are_exact_when_the_reduced_total_fits_else_within_one_slot(
    weights: dict[int, int],
) -> None:
    counts = slot_counts(weights, weighted=True)
    ready = {r: w for r, w in weights.items() if w > 0}
    assert counts.keys() == ready.keys(), "weight 0 has no slot, every other real has one"
    assert all(c >= 1 for c in counts.values())
    if not ready:
        return
    total_slots = sum(counts.values())
    total_weight = sum(ready.values())
    exact = all(
        Fraction(counts[r], total_slots) == Fraction(w, total_weight) for r, w in ready.items()
    )
    if exact:
        assert total_slots <= MAX_SLOTS
        return
    # Capped: each real within one slot of its quota, so its share within 1/MAX_SLOTS
    # of its weight's (a real lifted to its one slot is over by less than one slot).
    assert total_slots >= MAX_SLOTS
    lifted = sum(1 for r, w in ready.items() if w * MAX_SLOTS < total_weight)
    assert total_slots <= MAX_SLOTS + lifted
    for real, weight in ready.items():
        quota = Fraction(weight * MAX_SLOTS, total_weight)
        assert abs(counts[real] - quota) < 1 or counts[real] == 1
    assert share_error(weights, counts) <= (1 + lifted) / MAX_SLOTS


@settings(max_examples=50, deadline=None)
@given(weights_strategy)
def test_same_weights_same_map(weights: dict[int, int]) -> None:
    assert slot_counts(weights, weighted=True) == slot_counts(dict(weights), weighted=True)

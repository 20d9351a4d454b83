"""SWIM state precedence (table + lattice property), the member table and the probe ring."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossip.config import GossipConfig
from gossip.members import (
    PRECEDENCE,
    MemberInfo,
    MemberTable,
    ProbeRing,
    supersedes,
)
from gossip.membership import Membership
from gossip.messages import Alive, Dead, MemberState, Message, Suspect

RANK = {MemberState.ALIVE: 0, MemberState.SUSPECT: 1, MemberState.DEAD: 2, MemberState.LEFT: 3}


def _info(state: MemberState, incarnation: int) -> MemberInfo:
    return MemberInfo(name="x", addr=("10.0.0.9", 7946), state=state, incarnation=incarnation)


def test_table_covers_every_pair() -> None:
    assert set(PRECEDENCE) == set(itertools.product(MemberState, MemberState))


@pytest.mark.parametrize(
    ("held", "incoming", "delta", "wins"),
    [
        (MemberState.ALIVE, MemberState.ALIVE, 0, False),
        (MemberState.ALIVE, MemberState.ALIVE, 1, True),
        (MemberState.ALIVE, MemberState.SUSPECT, 0, True),  # suspect overrides alive at equal inc
        (MemberState.SUSPECT, MemberState.ALIVE, 0, False),  # refuting needs a higher inc
        (MemberState.SUSPECT, MemberState.ALIVE, 1, True),
        (MemberState.SUSPECT, MemberState.DEAD, 0, True),  # dead overrides suspect
        (
            MemberState.DEAD,
            MemberState.ALIVE,
            0,
            False,
        ),  # the dead come back only with a higher inc
        (MemberState.DEAD, MemberState.ALIVE, 1, True),
        (MemberState.DEAD, MemberState.SUSPECT, 0, False),
        (MemberState.DEAD, MemberState.LEFT, 0, True),  # a graceful leave outranks a failure
        (MemberState.LEFT, MemberState.DEAD, 0, False),
        (MemberState.ALIVE, MemberState.DEAD, -1, False),  # stale news never wins
    ],
)
def test_precedence_cases(held: MemberState, incoming: MemberState, delta: int, wins: bool) -> None:
    assert supersedes(_info(held, 5), incoming, 5 + delta) is wins


@given(
    st.sampled_from(MemberState), st.sampled_from(MemberState), st.integers(0, 5), st.integers(0, 5)
)
def test_precedence_is_lexicographic_on_incarnation_then_rank(
    held: MemberState, incoming: MemberState, held_inc: int, new_inc: int
) -> None:
    expected = (new_inc, RANK[incoming]) > (held_inc, RANK[held])
    assert supersedes(_info(held, held_inc), incoming, new_inc) is expected


updates = st.lists(
    st.tuples(
        st.sampled_from(["alive", "suspect", "dead", "leave"]),
        st.integers(0, 4),
        st.sampled_from(["b", "c", "a"]),
    ),
    max_size=12,
)


def _update(kind: str, incarnation: int, sender: str) -> Message:
    if kind == "alive":
        return Alive(incarnation=incarnation, node="x", addr=("10.0.0.9", 7946))
    if kind == "suspect":
        return Suspect(incarnation=incarnation, node="x", sender=sender)
    return Dead(incarnation=incarnation, node="x", sender="x" if kind == "leave" else sender)


def _final_state(order: list[tuple[str, int, str]], seed: int) -> tuple[MemberState, int]:
    core = Membership(GossipConfig.lan(), "a", ("10.0.0.1", 7946), rng=random.Random(seed), now=0.0)
    core.handle_packet(
        [Alive(incarnation=0, node="x", addr=("10.0.0.9", 7946))], ("10.0.0.9", 7946), 0.0
    )
    for kind, incarnation, sender in order:
        core.handle_packet([_update(kind, incarnation, sender)], ("10.0.0.2", 7946), 1.0)
    (x,) = [m for m in core.members() if m.name == "x"]
    return x.state, x.incarnation


@given(updates, st.randoms(use_true_random=False))
def test_any_interleaving_converges(
    order: list[tuple[str, int, str]], shuffler: random.Random
) -> None:
    """SWIM precedence is a join semilattice: two tables fed the same updates in any
    order end in the same state, the maximum by (incarnation, rank)."""
    other = order[:]
    shuffler.shuffle(other)
    assert _final_state(order, 1) == _final_state(other, 2)
    if order:
        best = max(order, key=lambda u: (u[1], RANK[_state_of(u[0])]))
        if (best[1], RANK[_state_of(best[0])]) > (0, 0):
            assert _final_state(order, 1) == (_state_of(best[0]), best[1])


def _state_of(kind: str) -> MemberState:
    return {
        "alive": MemberState.ALIVE,
        "suspect": MemberState.SUSPECT,
        "dead": MemberState.DEAD,
        "leave": MemberState.LEFT,
    }[kind]


def test_member_table_indexes_addresses() -> None:
    table = MemberTable()
    table.set(_info(MemberState.ALIVE, 1))
    assert table.name_at(("10.0.0.9", 7946)) == "x"
    table.set(MemberInfo(name="x", addr=("10.0.0.8", 1), state=MemberState.ALIVE, incarnation=2))
    assert table.name_at(("10.0.0.9", 7946)) is None
    assert table.name_at(("10.0.0.8", 1)) == "x"
    assert len(table) == 1 and "x" in table
    table.remove("x")
    assert table.get("x") is None and table.name_at(("10.0.0.8", 1)) is None


def test_probe_ring_visits_everyone_once_per_pass_and_reshuffles() -> None:
    ring = ProbeRing(lambda names: names)
    rng = random.Random(7)
    for name in "abcdef":
        ring.add(name, rng)
    ring.add("a", rng)  # already there
    assert len(ring) == 6
    passes = [[ring.next(lambda n: n != "a", rng) for _ in range(5)] for _ in range(4)]
    for visited in passes:
        assert sorted(visited) == list("bcdef")  # type: ignore[type-var]
    assert len({tuple(p) for p in passes}) > 1


def test_probe_ring_on_wrap_filters_and_gives_up_when_nothing_is_probeable() -> None:
    ring = ProbeRing(lambda names: [n for n in names if n != "dead"])
    rng = random.Random(1)
    for name in ("me", "dead", "b"):
        ring.add(name, rng)
    assert ring.next(lambda n: n == "nobody", rng) is None
    assert "dead" not in ring and len(ring) == 2
    assert ring.next(lambda n: n == "b", rng) == "b"

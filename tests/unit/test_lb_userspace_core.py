"""The userspace proxy's sans-IO parts: schedulers and the PROXY v2 header."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.table import Real, Scheduler
from lb.userspace import proxy_protocol
from lb.userspace.proxy_protocol import ProxyHeaderError
from lb.userspace.scheduler import Pool

A, B, C = Real("10.0.0.1", 80), Real("10.0.0.2", 80), Real("10.0.0.3", 80)


def picks(pool: Pool, count: int) -> Counter[Real | None]:
    return Counter(pool.pick() for _ in range(count))


def test_round_robin_alternates_and_skips_weight_zero() -> None:
    pool = Pool()
    for real in (A, B, C):
        pool.set(real, 1)
    assert picks(pool, 30) == {A: 10, B: 10, C: 10}
    pool.set(B, 0)
    assert picks(pool, 20) == {A: 10, C: 10}
    pool.remove(A)
    pool.remove(C)
    assert pool.pick() is None


def test_weighted_round_robin_follows_weights_smoothly() -> None:
    pool = Pool(Scheduler.WEIGHTED_ROUND_ROBIN)
    pool.set(A, 3)
    pool.set(B, 1)
    sequence = [pool.pick() for _ in range(8)]
    assert Counter(sequence) == {A: 6, B: 2}
    assert sequence[:4].count(B) == 1  # spread out, not a a a b in a burst of one


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 300), min_size=1, max_size=6),
    st.lists(st.integers(0, 300), min_size=1, max_size=6),
)
def test_weighted_round_robin_is_exact_over_every_cycle_and_after_a_change(
    first: list[int], second: list[int]
) -> None:
    """Each cycle of sum(weights) picks gives each real exactly its weight (0: never)."""
    pool = Pool(Scheduler.WEIGHTED_ROUND_ROBIN)
    reals = [Real(f"10.0.0.{i + 1}", 80) for i in range(6)]
    for weights in (first, second):
        for real, weight in zip(reals, weights, strict=False):
            pool.set(real, weight)
        wanted = {r: pool.weights[r] for r in reals if pool.weights.get(r, 0) > 0}
        total = sum(wanted.values())
        for _ in range(2):  # two whole cycles, each exact
            assert picks(pool, total) == Counter(wanted) if total else pool.pick() is None


def test_weights_up_to_1000_canary_one_to_three_exact() -> None:
    pool = Pool(Scheduler.WEIGHTED_ROUND_ROBIN)
    pool.set(A, 1)
    pool.set(B, 3)
    assert picks(pool, 4000) == {A: 1000, B: 3000}
    pool.set(A, 1000)
    pool.set(B, 0)  # drained: never picked
    pool.set(C, 1)
    assert picks(pool, 1001) == {A: 1000, C: 1}


def test_least_connections_counts_open_connections_per_weight() -> None:
    pool = Pool(Scheduler.LEAST_CONNECTIONS)
    pool.set(A, 1)
    pool.set(B, 2)
    for _ in range(2):
        pool.opened(A)
    pool.opened(B)
    assert pool.pick() == B  # 1/2 < 2/1
    pool.closed(A)
    pool.closed(A)
    assert pool.pick() == A


def test_pick_skips_the_reals_already_tried() -> None:
    for scheduler in Scheduler:
        pool = Pool(scheduler)
        pool.set(A, 1)
        pool.set(B, 1)
        assert pool.pick({A}) == B
        assert pool.pick({A, B}) is None


def test_proxy_v2_round_trip_ipv4_and_ipv6() -> None:
    header = proxy_protocol.build("tcp", ("192.0.2.7", 40000), ("10.0.1.2", 80))
    assert header.startswith(proxy_protocol.SIGNATURE)
    assert len(header) == 16 + 12
    parsed = proxy_protocol.parse(header + b"GET /")
    assert parsed == proxy_protocol.ProxyHeader("tcp", ("192.0.2.7", 40000), ("10.0.1.2", 80), 28)
    six = proxy_protocol.build("udp", ("2001:db8::1", 5), ("2001:db8::2", 53))
    assert proxy_protocol.parse(six) == proxy_protocol.ProxyHeader(
        "udp", ("2001:db8::1", 5), ("2001:db8::2", 53), 16 + 36
    )


def test_proxy_v2_parse_waits_for_more_and_refuses_garbage() -> None:
    header = proxy_protocol.build("tcp", ("192.0.2.7", 1), ("10.0.1.2", 2))
    assert proxy_protocol.parse(header[:5]) is None
    assert proxy_protocol.parse(header[:20]) is None
    with pytest.raises(ProxyHeaderError):
        proxy_protocol.parse(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProxyHeaderError):
        proxy_protocol.parse(proxy_protocol.SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12))

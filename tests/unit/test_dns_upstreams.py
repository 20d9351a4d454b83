"""The upstream pool's back-off rule (dns.upstreams) on a virtual clock: no sockets, no sleep."""

from __future__ import annotations

import pytest

from dns.upstreams import Upstream, UpstreamPool

A, B, C = Upstream("192.0.2.1"), Upstream("192.0.2.2"), Upstream("192.0.2.3")


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_pool(
    *upstreams: Upstream, base: float = 5.0, cap: float = 40.0
) -> tuple[UpstreamPool, Clock]:
    clock = Clock()
    return UpstreamPool(
        upstreams or (A, B, C), clock=clock, backoff_base=base, backoff_max=cap
    ), clock


def fail(pool: UpstreamPool, upstream: Upstream) -> None:
    pool.failed(upstream, pool.now())


def test_all_healthy_in_order() -> None:
    pool, _ = make_pool()
    assert pool.plan() == [A, B, C]
    assert (pool.skipped, pool.backoffs, pool.down()) == (0, 0, [])


def test_failed_upstream_is_skipped_for_the_backoff_then_tried_again() -> None:
    pool, clock = make_pool()
    fail(pool, A)
    assert pool.plan() == [B, C]
    assert pool.down() == [A] and pool.backoff_left(A) == 5.0
    clock.now += 4.9
    assert pool.plan() == [B, C]
    clock.now += 0.1
    assert pool.plan() == [A, B, C]
    assert (pool.skipped, pool.backoffs) == (2, 1)


def test_backoff_doubles_up_to_the_cap_and_success_resets_it() -> None:
    pool, clock = make_pool(base=5.0, cap=40.0)
    waits = []
    for _ in range(6):
        fail(pool, A)
        waits.append(pool.backoff_left(A))
        clock.now += waits[-1]  # its back-off ends: it is tried, and fails again
    assert waits == [5.0, 10.0, 20.0, 40.0, 40.0, 40.0]
    pool.succeeded(A)
    assert pool.down() == [] and pool.plan() == [A, B, C]
    fail(pool, A)
    assert pool.backoff_left(A) == 5.0  # from the start again


def test_failures_of_attempts_already_waiting_do_not_raise_the_backoff() -> None:
    """Many queries waiting on a dead upstream all time out: that is one failure, not many."""
    pool, clock = make_pool()
    started = [pool.now() for _ in range(50)]  # 50 queries sent before anything failed
    clock.now += 2.0  # they all time out now
    for begun in started:
        pool.failed(A, begun)
    assert pool.backoff_left(A) == 5.0 and pool.backoffs == 1


def test_every_upstream_down_still_tries_the_one_whose_backoff_ends_first() -> None:
    pool, clock = make_pool()
    fail(pool, B)
    clock.now += 1
    fail(pool, A)
    clock.now += 1
    fail(pool, C)
    assert pool.plan() == [B]  # B's back-off ends first (at +5), A's at +6, C's at +7
    assert pool.skipped == 2
    fail(pool, B)  # tried while still in back-off, and failed again: longer back-off
    assert pool.backoff_left(B) == 10.0
    assert pool.plan() == [A]


def test_a_single_upstream_is_always_tried() -> None:
    pool, _ = make_pool(A)
    fail(pool, A)
    assert pool.plan() == [A]
    assert pool.skipped == 0


def test_no_upstreams_plans_nothing() -> None:
    pool, _ = make_pool(Upstream("192.0.2.9"))
    assert UpstreamPool(()).plan() == []
    assert pool.plan() == [Upstream("192.0.2.9")]


@pytest.mark.parametrize(("base", "cap"), [(-1.0, 5.0), (10.0, 5.0)])
def test_bad_backoff_settings(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="back-off"):
        UpstreamPool((A,), backoff_base=base, backoff_max=cap)

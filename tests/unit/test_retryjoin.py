"""Retry-join's sans-IO core: SRV order, seed picking, the bounded back-off, giving up."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mesh.core.net import HostPort
from mesh.retryjoin import (
    MAX_SEEDS,
    Backoff,
    RetryJoin,
    SrvTarget,
    is_ip_literal,
    order_srv,
    pick_seeds,
    srv_name,
)


def test_names_need_dns_literals_do_not() -> None:
    plan = RetryJoin(
        (HostPort("10.0.0.1", 7946), HostPort("::1", 7000), HostPort("seeds.mesh", 7946))
    )
    assert plan.names() == [HostPort("seeds.mesh", 7946)]
    assert plan.literal_seeds() == [("10.0.0.1", 7946), ("::1", 7000)]
    assert is_ip_literal("fe80::1") and not is_ip_literal("localhost")
    assert srv_name("meshplane.kube-system.svc.cluster.local.") == (
        "_mesh._tcp.meshplane.kube-system.svc.cluster.local"
    )


def test_srv_lower_priority_always_first_and_dot_target_dropped() -> None:
    answers = [
        SrvTarget(20, 0, 1, "backup"),
        SrvTarget(10, 5, 2, "a"),
        SrvTarget(10, 5, 3, "b"),
        SrvTarget(10, 0, 4, "."),
    ]
    for seed in range(50):
        ordered = order_srv(answers, random.Random(seed))
        assert [a.target for a in ordered][-1] == "backup"
        assert {a.target for a in ordered[:2]} == {"a", "b"}
        assert len(ordered) == 3


def test_srv_weights_bias_the_first_pick() -> None:
    answers = [SrvTarget(0, 90, 1, "heavy"), SrvTarget(0, 10, 2, "light")]
    rng = random.Random(7)
    firsts = Counter(order_srv(answers, rng)[0].target for _ in range(2000))
    print(f"first picks over 2000 orders: {dict(firsts)}")
    assert 1600 < firsts["heavy"] < 1990  # 90 % expected
    # Weight 0 among weighted answers still comes last, never lost.
    ordered = order_srv([SrvTarget(0, 0, 1, "zero"), SrvTarget(0, 10, 2, "ten")], rng)
    assert [a.target for a in ordered] == ["ten", "zero"]


def test_pick_seeds_dedups_spreads_and_bounds() -> None:
    many = [(f"10.0.{i // 256}.{i % 256}", 7946) for i in range(1000)]
    picked = pick_seeds([*many, *many], random.Random(1))
    assert len(picked) == MAX_SEEDS and len(set(picked)) == MAX_SEEDS
    firsts = {pick_seeds(many[:4], random.Random(s))[0] for s in range(40)}
    assert len(firsts) > 1  # joiners do not all ask the same seed first


def test_backoff_grows_to_its_ceiling_with_jitter_below() -> None:
    backoff = Backoff(first=1.0, factor=2.0, ceiling=30.0, jitter=0.2)
    rng = random.Random(3)
    delays = [backoff.delay(n, rng) for n in range(1, 12)]
    print("delays:", [round(d, 2) for d in delays])
    bases = [1, 2, 4, 8, 16, 30, 30, 30, 30, 30, 30]
    for delay, base in zip(delays, bases, strict=True):
        assert base * 0.8 <= delay <= base
    assert backoff.delay(10_000, rng) <= 30.0  # no overflow on a long outage


def test_rounds_fail_until_max_then_give_up_with_the_injected_clock() -> None:
    plan = RetryJoin((HostPort("seeds", 7946),), max_rounds=3, rng=random.Random(0))
    now = 100.0
    verdicts = []
    for _ in range(3):
        plan.begin_round(now)
        verdict = plan.round_failed(now + 1)
        verdicts.append(verdict)
        now += 1 + verdict.delay
    assert [v.round for v in verdicts] == [1, 2, 3]
    assert [v.give_up for v in verdicts] == [False, False, True]
    assert verdicts[0].elapsed == pytest.approx(1.0)
    assert verdicts[2].elapsed > verdicts[1].elapsed > verdicts[0].elapsed


def test_zero_max_never_gives_up() -> None:
    plan = RetryJoin((HostPort("seeds", 7946),), max_rounds=0)
    plan.begin_round(0.0)
    assert not any(plan.round_failed(float(n)).give_up for n in range(10_000))
    assert plan.joined(12.5) == 12.5


async def test_a_name_that_raises_fails_its_round_without_ending_the_join() -> None:
    from mesh.seeds import ResolveError, SeedResolver

    class Broken(SeedResolver):
        async def resolve(self, name: HostPort) -> list[tuple[str, int]]:
            if name.host == "odd":
                raise RuntimeError("no channel")
            if name.host == "nx":
                raise ResolveError("Domain name not found")
            return [("10.0.0.1", name.port)]

    resolved = await Broken().resolve_all(
        [HostPort("odd", 1), HostPort("nx", 2), HostPort("ok", 3)]
    )
    assert resolved.seeds == [("10.0.0.1", 3)]
    assert resolved.failures == {
        "odd": "RuntimeError: no channel",
        "nx": "Domain name not found",
    }

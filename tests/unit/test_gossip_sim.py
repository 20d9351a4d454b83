"""gossip.sim: the deterministic simulator around the real membership core.

Everything runs in virtual time (no sleeps, no sockets): determinism of
traces and metrics, convergence, crash detection, partitions healing, the
slow-node model, exact byte accounting, the metrics' arithmetic, and one
bounded run of the benchmark's --quick mode.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from gossip import codec
from gossip.config import GossipConfig
from gossip.messages import Ack, Alive, Dead, MemberState, Message, Ping, Suspect, User
from gossip.sim import (
    EventQueue,
    Metrics,
    NetProfile,
    SimCluster,
    SimNetwork,
    SizeCache,
    percentile,
    spread,
)
from gossip.sim.clock import CALL
from gossip.sim.metrics import Crash
from gossip.sim.scenarios import bring_up

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gossip_sim.py"


def up(size: int, *, seed: int = 1, **kwargs: object) -> SimCluster:
    cluster = SimCluster(size, seed=seed, **kwargs)  # type: ignore[arg-type]
    bring_up(cluster)
    return cluster


def everywhere(crash: Crash) -> Callable[[], bool]:
    return lambda: crash.complete


# -- the clock and the network -----------------------------------------------------------


def test_event_queue_orders_by_time_then_scheduling_order() -> None:
    queue = EventQueue()
    queue.push(2.0, CALL, 0, "c")
    queue.push(1.0, CALL, 0, "a")
    queue.push(1.0, CALL, 0, "b")
    queue.push(-5.0, CALL, 0, "clamped to now")
    assert [queue.pop()[4] for _ in range(4)] == ["clamped to now", "a", "b", "c"]
    assert queue.now == 2.0
    assert len(queue) == 0


def test_network_delay_loss_partition_crash() -> None:
    net = SimNetwork(NetProfile(delay=0.002, jitter=0.001), random.Random(1))
    at = net.packet_arrival(0, 1, 10.0)
    assert at is not None and 10.001 <= at <= 10.003
    net.partition({0, 1}, {2})
    assert net.packet_arrival(0, 2, 0.0) is None and net.stream_arrival(2, 1, 0.0) is None
    assert net.packet_arrival(1, 0, 0.0) is not None
    assert net.packet_arrival(3, 4, 0.0) is not None  # unlisted nodes: one more group
    assert net.packet_arrival(3, 0, 0.0) is None
    net.heal()
    net.crashed.add(1)
    assert net.packet_arrival(0, 1, 0.0) is None and net.stream_arrival(1, 0, 0.0) is None
    net.crashed.clear()
    net.set_link(0, 1, loss=1.0)
    assert net.packet_arrival(1, 0, 0.0) is None  # both directions
    assert net.stream_arrival(0, 1, 0.0) is not None  # TCP does not lose packets
    net.clear_links()
    net.loss = 0.2
    lost = sum(net.packet_arrival(0, 1, 0.0) is None for _ in range(10_000))
    assert 1800 < lost < 2200


def test_network_slow_node_is_late_to_receive_only() -> None:
    net = SimNetwork(NetProfile.lan(), random.Random(2))
    net.slow = {1}
    into = [net.packet_arrival(0, 1, 0.0) for _ in range(500)]
    out = [net.packet_arrival(1, 0, 0.0) for _ in range(500)]
    assert all(t is not None and 0.501 <= t <= 2.503 for t in into)
    assert all(t is not None and t <= 0.003 for t in out)
    assert max(t for t in into if t is not None) > 2.0  # the whole range is used


def test_profile_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="loss"):
        NetProfile(loss=1.5)
    with pytest.raises(ValueError, match="jitter"):
        NetProfile(delay=0.001, jitter=0.002)


# -- determinism -------------------------------------------------------------------------


def _scripted_run(seed: int) -> tuple[list[str], str, list[int], str]:
    cluster = SimCluster(8, seed=seed, profile=NetProfile.lan(0.05), trace=True)
    bring_up(cluster)
    cluster.broadcast(3, b"state update")
    cluster.crash(5)
    cluster.run_for(20.0)
    assert cluster.trace is not None
    metrics = (
        repr(cluster.metrics.detection()),
        sorted(cluster.metrics.false_suspicions),
        sorted(cluster.metrics.false_deaths),
    )
    return cluster.trace, repr(metrics), cluster.sent_bytes(), repr(sorted(cluster.stats.items()))


def test_same_seed_same_trace_and_metrics_other_seed_differs() -> None:
    first, again, other = _scripted_run(11), _scripted_run(11), _scripted_run(12)
    assert len(first[0]) > 1000
    assert first == again
    assert first[0] != other[0]
    assert first[2] != other[2]


TRACE_DIGEST = """
import hashlib
from gossip.sim import NetProfile, SimCluster
from gossip.sim.scenarios import bring_up
cluster = SimCluster(12, seed=4, profile=NetProfile.lan(0.1), trace=True)
bring_up(cluster)
cluster.set_slow([3])
cluster.crash(5)
cluster.broadcast(2, b"x")
cluster.run_for(30.0)
print(hashlib.sha256("\\n".join(cluster.trace or []).encode()).hexdigest())
"""


def test_runs_replay_across_processes_whatever_the_hash_seed() -> None:
    root = Path(__file__).resolve().parents[2]
    digests = {
        subprocess.run(
            [sys.executable, "-c", TRACE_DIGEST],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
        ).stdout
        for hash_seed in (1, 2)
    }
    assert len(digests) == 1 and len(digests.pop().strip()) == 64


# -- membership through the simulator ----------------------------------------------------


def test_ten_nodes_converge_and_the_event_view_matches_members() -> None:
    cluster = up(10, seed=7)
    names = {n.name for n in cluster.nodes}
    for node in cluster.nodes:
        alive = {m.name for m in node.core.members() if m.state is MemberState.ALIVE}
        assert alive == names
        assert node.known == names - {node.name}
    assert cluster.stats["packets"] > 0 and cluster.stats["streams"] == 9


def test_a_crash_is_detected_by_every_node_and_a_restart_rejoins() -> None:
    cluster = up(10, seed=3, profile=NetProfile.lan(0.01))
    cluster.crash(4)
    crash = cluster.metrics.crashes[-1]
    assert cluster.run_until_true(everywhere(crash), 60.0)
    summary = cluster.metrics.detection()
    assert summary.pairs == 9 and summary.undetected == 0 and summary.missed == 0
    # SWIM floor at 10 nodes: a probe period, then the 4 s minimum suspicion (4 * log10 10 * 1 s)
    assert 4.0 < summary.p50 <= summary.last_max < 30.0
    assert summary.suspect_max < summary.p50
    assert summary.verdict_max >= 4.0  # no verdict before the minimum suspicion timeout
    assert 0.0 <= summary.probe_max < 30.0  # the cluster reported the probes of n4
    assert not cluster.metrics.false_deaths
    for node in cluster.up_nodes():
        assert {m.name: m.state for m in node.core.members()}["n4"] is MemberState.DEAD
    cluster.restart(4)
    assert cluster.run_until_true(cluster.converged, 60.0)
    assert cluster.node("n4").core.incarnation > 0  # it refuted its old life's death


def test_a_graceful_leave_is_neither_a_crash_nor_a_false_death() -> None:
    cluster = up(10, seed=5)
    cluster.leave(6)
    assert cluster.run_until_true(cluster.converged, 10.0)
    cluster.run_for(5.0)
    assert not cluster.node("n6").up
    for node in cluster.up_nodes():
        assert {m.name: m.state for m in node.core.members()}["n6"] is MemberState.LEFT
    assert not cluster.metrics.false_deaths and not cluster.metrics.crashes


def test_a_short_partition_heals_by_refutation() -> None:
    cluster = up(10, seed=3)
    cluster.network.partition(range(5), range(5, 10))
    cluster.run_for(3.0)
    assert cluster.metrics.false_suspicions  # each side suspects the other ...
    cluster.network.heal()
    assert cluster.run_until_true(cluster.converged, 30.0)
    assert not cluster.metrics.false_deaths  # ... but nobody was declared dead


def test_after_a_long_partition_a_join_re_merges_by_push_pull() -> None:
    cluster = up(10, seed=3)
    cluster.network.partition(range(5), range(5, 10))
    cluster.run_for(20.0)
    assert len(cluster.metrics.false_deaths) == 10  # both sides hold the other dead
    cluster.network.heal()
    cluster.run_for(1.0)
    assert not cluster.converged()  # nothing crosses on its own (no Serf-style reconnect)
    cluster.join(0, [7])  # what a reconnect does: a push-pull across
    assert cluster.run_until_true(cluster.converged, 10.0)


def test_a_join_re_merges_even_after_gossip_to_the_dead_time() -> None:
    cluster = up(10, seed=3)
    cluster.network.partition(range(5), range(5, 10))
    cluster.run_for(20.0 + cluster.config.gossip_to_the_dead_time)
    cluster.network.heal()
    cluster.join(0, [7])
    assert cluster.run_until_true(cluster.converged, 60.0)


def test_slow_node_receives_late_but_sends_and_probes_on_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = up(6, seed=2, lifeguard=False)  # no Lifeguard: the probe period stays 1 s
    sends: list[tuple[int, int, float, float | None]] = []
    real = cluster.network.packet_arrival

    def spy(src: int, dst: int, now: float) -> float | None:
        at = real(src, dst, now)
        sends.append((src, dst, now, at))
        return at

    monkeypatch.setattr(cluster.network, "packet_arrival", spy)
    cluster.set_slow([1])
    probes = cluster.nodes[1].core.stats["probes"]
    cluster.run_for(30.0)
    to_slow = [at - now for src, dst, now, at in sends if dst == 1 and at is not None]
    from_slow = [at - now for src, dst, now, at in sends if src == 1 and at is not None]
    assert to_slow and min(to_slow) >= 0.5 and max(to_slow) <= 2.503
    assert from_slow and max(from_slow) <= 0.003
    assert 29 <= cluster.nodes[1].core.stats["probes"] - probes <= 31  # timers on time
    assert any(s.by == "n1" for s in cluster.metrics.false_suspicions.values())


# -- sizes and metrics -------------------------------------------------------------------


def test_object_mode_counts_exactly_the_bytes_the_codec_would_send() -> None:
    runs = [
        SimCluster(10, seed=5, profile=NetProfile.lan(0.1), wire=wire) for wire in (True, False)
    ]
    for cluster in runs:
        bring_up(cluster)
        cluster.broadcast(2, b"x" * 100)
        cluster.run_for(20.0)
    assert runs[0].sent_bytes() == runs[1].sent_bytes()
    assert runs[0].stats == runs[1].stats


@pytest.mark.parametrize("count", [1, 2, 15, 16, 40])
def test_size_cache_matches_the_codec(count: int) -> None:
    rng = random.Random(count)
    kinds: list[Callable[[int], Message]] = [
        lambda i: Alive(incarnation=i, node=f"n{i}", addr=(f"10.0.0.{i % 250}", 7946)),
        lambda i: Suspect(incarnation=i, node=f"n{i}", sender="n1"),
        lambda i: Dead(incarnation=i, node=f"n{i}", sender="n2"),
        lambda i: User(payload=bytes(rng.randrange(300))),
        lambda i: Ping(seq=i, target=f"n{i}", source="n0"),
        lambda i: Ack(seq=i),
    ]
    messages = [rng.choice(kinds)(i) for i in range(count)]
    cache = SizeCache()
    for _ in range(2):  # cold, then cached
        assert cache.packet(messages) == len(codec.encode_packet(messages, 65_000))


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError, match="nothing"):
        percentile([], 50)


def test_spread_counts_the_origin_and_reports_unreached_fractions() -> None:
    live = [f"n{i}" for i in range(10)]
    arrivals = {f"n{i}": 10.0 + i / 10 for i in range(1, 9)}  # n9 never got it
    times = spread(arrivals, "n0", 10.0, live)
    assert times[0.5] == pytest.approx(0.4)  # n0 (at 0) and n1..n4
    assert times[0.99] is None and times[1.0] is None


def test_false_positives_count_once_per_member_and_incarnation() -> None:
    up_now = {"a", "b"}
    metrics = Metrics(lambda name: name in up_now)
    metrics.suspected(1.0, "b", "a", 0, by="b")
    metrics.suspected(1.5, "c", "a", 0, by="c")  # the same suspicion, seen elsewhere
    metrics.suspected(2.0, "b", "a", 1, by="b")  # after a refutation: a new one
    metrics.failed(3.0, "b", "a", 1)
    metrics.failed(3.1, "c", "a", 1)
    assert sorted(metrics.false_suspicions) == [("a", 0), ("a", 1)]
    assert metrics.false_suspicions[("a", 0)].by == "b"
    assert metrics.false_deaths == {("a", 1): 3.0}


def test_detection_summary_drops_observers_that_crash_too() -> None:
    up_now = {"b", "c", "d"}
    metrics = Metrics(lambda name: name in up_now)
    metrics.crashed("a", 10.0, ["a", "b", "c", "d"])
    metrics.probed(9.5, "b")  # not a crashed member: ignored
    metrics.probed(10.2, "a")
    metrics.probed(10.4, "a")
    metrics.suspected(11.0, "b", "a", 0, by="b")
    metrics.failed(19.0, "b", "a", 0)
    metrics.observer_gone("d")
    up_now.discard("d")
    assert not metrics.crashes[0].complete
    metrics.failed(20.0, "c", "a", 0)
    summary = metrics.detection()
    assert (summary.pairs, summary.undetected, summary.missed) == (2, 0, 0)
    assert (summary.p50, summary.last_max, summary.suspect_max) == (9.0, 10.0, 1.0)
    # where the 10 s went: 1 s to the first suspicion, 8 s to the first verdict, 1 s to spread
    assert (summary.verdict_max, summary.spread_max) == (8.0, 1.0)
    assert summary.probe_max == pytest.approx(0.2)
    assert not metrics.false_deaths
    empty = Metrics(lambda name: True).detection()
    assert empty.crashes == 0 and math.isnan(empty.p50)


def test_a_stuck_core_timer_is_reported_not_spun_on() -> None:
    cluster = SimCluster(2, seed=1, config=GossipConfig.local())
    core = cluster.nodes[0].core
    core.next_timer = lambda: 0.0  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="next_timer"):
        cluster.run_for(1.0)


# -- the benchmark -----------------------------------------------------------------------


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gossip_sim_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_quick_mode_runs_and_checks_its_smoke_targets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = _load_bench()
    assert bench.main(["--quick", "--jobs", "1", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "dissemination 100 n, 20% loss" in out
    assert "detection 20 n, 1% loss, 3 crashes" in out
    assert "Lifeguard off" in out and "MISSED" not in out

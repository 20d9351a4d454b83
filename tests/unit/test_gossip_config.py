"""GossipConfig profiles and validation; the scaling formulas against memberlist's numbers."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gossip.config import (
    GossipConfig,
    push_pull_scale,
    remaining_suspicion_time,
    retransmit_limit,
    suspicion_confirmations_wanted,
    suspicion_max_timeout,
    suspicion_min_timeout,
    suspicion_timeout,
)
from gossip.errors import ConfigError


def test_lan_profile_is_memberlist_default_lan_config() -> None:
    cfg = GossipConfig.lan()
    assert (cfg.probe_interval, cfg.probe_timeout, cfg.indirect_checks) == (1.0, 0.5, 3)
    assert (cfg.retransmit_mult, cfg.suspicion_mult, cfg.suspicion_max_timeout_mult) == (4, 4, 6)
    assert cfg.awareness_max_multiplier == 8
    assert (cfg.gossip_interval, cfg.gossip_nodes, cfg.gossip_to_the_dead_time) == (0.2, 3, 30.0)
    assert (cfg.push_pull_interval, cfg.udp_buffer_size, cfg.tcp_timeout) == (30.0, 1400, 10.0)
    assert cfg.dead_node_reclaim_time == 0.0
    assert cfg == GossipConfig()


def test_wan_profile_is_memberlist_default_wan_config() -> None:
    cfg = GossipConfig.wan()
    assert (cfg.probe_interval, cfg.probe_timeout, cfg.suspicion_mult) == (5.0, 3.0, 6)
    assert (cfg.gossip_interval, cfg.gossip_nodes, cfg.gossip_to_the_dead_time) == (0.5, 4, 60.0)
    assert (cfg.push_pull_interval, cfg.tcp_timeout) == (60.0, 30.0)


def test_local_profile_is_fast() -> None:
    cfg = GossipConfig.local()
    assert (cfg.probe_interval, cfg.probe_timeout, cfg.gossip_interval) == (0.2, 0.1, 0.05)
    assert cfg.push_pull_interval == 2.0


def test_config_is_frozen_and_slotted() -> None:
    cfg = GossipConfig.lan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.probe_interval = 2.0  # type: ignore[misc]
    assert not hasattr(cfg, "__dict__")
    assert cfg.packet_budget == 1400
    assert dataclasses.replace(cfg, packet_overhead=29).packet_budget == 1371


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"probe_interval": 0}, "probe_interval"),
        ({"probe_timeout": 1.0}, "probe_timeout must be < probe_interval"),
        ({"gossip_interval": -1}, "gossip_interval"),
        ({"push_pull_interval": -1}, "push_pull_interval"),
        ({"indirect_checks": -1}, "indirect_checks"),
        ({"retransmit_mult": 0}, "retransmit_mult"),
        ({"gossip_nodes": 0}, "gossip_nodes"),
        ({"awareness_max_multiplier": 0}, "awareness_max_multiplier"),
        ({"udp_buffer_size": 100}, "udp_buffer_size"),
        ({"udp_buffer_size": 70000}, "udp_buffer_size"),
        ({"packet_overhead": 1300}, "packet_overhead"),
        ({"tombstone_timeout": 1.0}, "tombstone_timeout"),
    ],
)
def test_invalid_values_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(GossipConfig.lan(), **changes)
    assert issubclass(ConfigError, ValueError)


def test_push_pull_zero_disables_periodic_sync() -> None:
    assert GossipConfig(push_pull_interval=0).push_pull_interval == 0


# gossip-anchors.md §3.2: retransmits, suspicion min/max and push-pull period at LAN defaults.
@pytest.mark.parametrize(
    ("n", "retransmits", "min_s", "max_s", "push_pull_s"),
    [
        (10, 8, 4.0, 24.0, 30.0),
        (50, 8, 6.792, 40.752, 60.0),
        (100, 12, 8.0, 48.0, 90.0),
        (200, 12, 9.204, 55.224, 120.0),
        (1000, 16, 12.0, 72.0, 180.0),
        (10000, 20, 16.0, 96.0, 300.0),
    ],
)
def test_lan_scaling_table(
    n: int, retransmits: int, min_s: float, max_s: float, push_pull_s: float
) -> None:
    assert retransmit_limit(4, n) == retransmits
    low = suspicion_min_timeout(4, n, 1.0)
    assert low == pytest.approx(min_s)
    assert suspicion_max_timeout(6, low) == pytest.approx(max_s)
    assert push_pull_scale(30.0, n) == push_pull_s


@pytest.mark.parametrize(("n", "expected"), [(0, 0), (1, 4), (9, 4), (10, 8), (99, 8)])
def test_retransmit_limit_small_clusters(n: int, expected: int) -> None:
    assert retransmit_limit(4, n) == expected


def test_wan_suspicion_at_1000_nodes() -> None:
    assert suspicion_min_timeout(6, 1000, 5.0) == pytest.approx(90.0)


@pytest.mark.parametrize("n", [0, 1, 2, 10])
def test_suspicion_min_never_below_one_scale(n: int) -> None:
    assert suspicion_min_timeout(4, n, 1.0) == 4.0


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, 30.0), (32, 30.0), (33, 60.0), (64, 60.0), (65, 90.0), (128, 90.0), (129, 120.0)],
)
def test_push_pull_scale_steps(n: int, expected: float) -> None:
    assert push_pull_scale(30.0, n) == expected


# memberlist state_test.go TestMemberList_ProbeNode_Suspect_Dogpile: ProbeInterval 100 ms,
# SuspicionMult 5, SuspicionMaxTimeoutMult 2; n counts ourselves.
@pytest.mark.parametrize(
    ("n", "confirmations", "expected"),
    [
        (2, 0, 0.500),
        (3, 0, 0.500),
        (4, 0, 0.500),
        (5, 0, 1.000),
        (6, 0, 1.000),
        (6, 1, 0.750),
        (6, 2, 0.604),
        (6, 3, 0.500),
        (6, 4, 0.500),
        (6, 5, 0.500),
    ],
)
def test_lifeguard_dogpile_vectors(n: int, confirmations: int, expected: float) -> None:
    k = suspicion_confirmations_wanted(5, n)
    low = suspicion_min_timeout(5, n, 0.1)
    high = suspicion_max_timeout(2, low)
    # memberlist measures 604 ms with a tolerance; the exact value 603.76 ms floors to 603.
    assert suspicion_timeout(min(confirmations, k), k, low, high) == pytest.approx(
        expected, abs=0.0011
    )


def test_confirmations_wanted() -> None:
    assert suspicion_confirmations_wanted(4, 100) == 2
    assert suspicion_confirmations_wanted(4, 4) == 2
    assert suspicion_confirmations_wanted(4, 3) == 0
    assert suspicion_confirmations_wanted(5, 4) == 0


# memberlist suspicion_test.go TestSuspicion_remainingSuspicionTime (exact, floored to ms).
@pytest.mark.parametrize(
    ("n", "k", "elapsed", "low", "high", "expected"),
    [
        (0, 3, 0.0, 2.0, 30.0, 30.0),
        (1, 3, 2.0, 2.0, 30.0, 14.0),
        (2, 3, 3.0, 2.0, 30.0, 4.81),
        (3, 3, 4.0, 2.0, 30.0, -2.0),
        (4, 3, 5.0, 2.0, 30.0, -3.0),
        (5, 3, 10.0, 2.0, 30.0, -8.0),
    ],
)
def test_remaining_suspicion_time(
    n: int, k: int, elapsed: float, low: float, high: float, expected: float
) -> None:
    assert remaining_suspicion_time(n, k, elapsed, low, high) == pytest.approx(expected)


def test_suspicion_timeout_without_wanted_confirmations_is_min() -> None:
    assert suspicion_timeout(0, 0, 4.0, 24.0) == 4.0

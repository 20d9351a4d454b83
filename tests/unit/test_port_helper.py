"""The tests' port helper: below the ephemeral range, never twice, disjoint per xdist worker."""

from __future__ import annotations

import pytest

from tests.helpers import agent


@pytest.mark.parametrize("worker", ["gw0", "gw1", "gw2"])
def test_each_worker_hands_out_only_its_own_residue(
    monkeypatch: pytest.MonkeyPatch, worker: str
) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    monkeypatch.setattr(agent, "_HANDED_OUT", set())
    ports = agent.free_ports(100)
    low, _ = agent._ephemeral_range()
    assert {port % 3 for port in ports} == {int(worker[2:])}
    assert len(set(ports)) == 100
    assert all(10000 <= port < low for port in ports)
    assert not set(agent.free_ports(100)) & set(ports)  # never twice in one process


def test_without_xdist_every_port_of_the_range_may_be_handed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    monkeypatch.setattr(agent, "_HANDED_OUT", set())
    assert {port % 2 for port in agent.free_ports(200)} == {0, 1}

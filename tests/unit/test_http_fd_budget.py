"""The router's descriptor budget, the request body's clock, and what counts as a shortage."""

from __future__ import annotations

import errno

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from lb.fds import is_fd_shortage
from lb.http.budget import FdBudget
from lb.http.settings import RouterSettings
from mesh.core.model import Health, HealthCheck
from mesh.health.core import HealthTracker


def test_budget_is_the_limit_less_what_is_held_and_a_reserve() -> None:
    settings = RouterSettings()
    assert settings.fd_budget(limit=1024, held=30) == 1024 - 30 - 256  # reserve: a quarter
    assert settings.fd_budget(limit=20_000, held=50) == 10_000  # max_connections bounds it
    assert settings.fd_budget(limit=8000, held=50) == 8000 - 50 - 1024
    assert settings.fd_budget(limit=16, held=40) == 2  # never below one client


def test_budget_take_and_give() -> None:
    budget = FdBudget(5)
    assert budget.take(2) and budget.take(2)
    assert not budget.take(2) and budget.held == 4  # refused whole, nothing held
    assert budget.take(1)
    budget.give(2)
    assert budget.held == 3
    budget.give(10)
    assert budget.held == 0


def test_body_clock_stall_deadline_and_rate() -> None:
    settings = RouterSettings(body_timeout=60, body_deadline=300, body_min_rate=1000, body_grace=10)
    # A fast body: only the gap between reads bounds it.
    assert settings.body_due(started=0, received=10_000_000, now=5) == 65
    # A trickle: 2,000 bytes cover 2 s of the rate past the 10 s grace.
    assert settings.body_due(started=0, received=2000, now=11) == 12
    # However fast, the whole body ends at its deadline.
    assert settings.body_due(started=0, received=10**12, now=299) == 300
    # Neither a deadline nor a rate: the gap only.
    off = RouterSettings(body_timeout=60, body_deadline=0, body_min_rate=0)
    assert off.body_due(started=0, received=0, now=1000) == 1060


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
def test_fd_shortage_errnos(code: int) -> None:
    assert is_fd_shortage(OSError(code, "x"))
    key = ConnectionKey("127.0.0.1", 80, False, True, None, None, None)
    assert is_fd_shortage(aiohttp.ClientConnectorError(key, OSError(code, "x")))
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = OSError(code, "x")
    assert is_fd_shortage(wrapped)


@pytest.mark.parametrize("code", [errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH])
def test_a_tasks_failure_is_no_shortage(code: int) -> None:
    assert not is_fd_shortage(OSError(code, "x"))
    key = ConnectionKey("127.0.0.1", 80, False, True, None, None, None)
    assert not is_fd_shortage(aiohttp.ClientConnectorError(key, OSError(code, "x")))
    assert not is_fd_shortage(TimeoutError())


def test_a_postponed_probe_counts_no_failure() -> None:
    check = HealthCheck(type="tcp", interval=1.0, retries=1)
    tracker = HealthTracker(check, now=0.0, start_period_end=0.0, health=Health.HEALTHY)
    due = tracker.next_due()
    assert tracker.take_probe(due)
    tracker.postpone_probe(due + 0.5)
    assert tracker.health is Health.HEALTHY and tracker.failures == 0
    assert tracker.next_due() == due + 1.5  # tried again an interval on
    assert tracker.take_probe(due + 1.5)
    assert tracker.record_probe(False, "refused", due + 1.6) is Health.UNHEALTHY

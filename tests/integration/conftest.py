"""Fixtures for integration tests that talk to a real `mesh agent` process.

`agent` is a fresh agent per test (its own data dir and API port), so every
test sees exactly the built-in state; `start_agent` starts one with extra
command-line arguments (a bearer token, say). Every agent started here is
stopped after the test, and a test fails if its agent logged an unhandled
error (`api_internal_error`): a 500 must never happen, even when a test only
looked at the status.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.agent import AgentProcess

StartAgent = Callable[..., AgentProcess]


def stop_and_check(agent: AgentProcess) -> None:
    """Stop an agent (killing it if it hangs) and fail on any unhandled error in its log."""
    if agent.proc is None:
        return
    try:
        agent.stop()
    except Exception:  # a hung agent must not outlive its test
        if agent.proc.poll() is None:
            agent.proc.send_signal(signal.SIGKILL)
            agent.proc.wait(10)
    log = agent.log()
    if "api_internal_error" in log:
        pytest.fail(f"the agent answered a request with an internal error:\n{log}")


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[StartAgent]:
    started: list[AgentProcess] = []

    def start(*, extra: list[str] | None = None, name: str = "data") -> AgentProcess:
        agent = AgentProcess(tmp_path / name, extra=extra)
        started.append(agent)
        return agent.start()

    yield start
    for agent in started:
        stop_and_check(agent)


@pytest.fixture
def agent(start_agent: StartAgent) -> AgentProcess:
    return start_agent()


@pytest.fixture(scope="module")
def module_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent shared by a whole module (for tests that only add state of their own)."""
    agent = AgentProcess(tmp_path_factory.mktemp("agent") / "data")
    try:
        agent.start()
        yield agent
    finally:
        stop_and_check(agent)

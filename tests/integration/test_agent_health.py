"""Health through the whole agent: real HTTP servers, the API, the store and the runner."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess
from tests.integration.conftest import StartAgent

INTERVAL, RETRIES = 0.2, 2
SLACK = 5.0  # seconds of scheduling noise allowed on top of interval x retries


class ToggleServer:
    """A real HTTP server whose /healthz answers `status`."""

    def __init__(self) -> None:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code = owner.status if self.path == "/healthz" else 404
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.status = 200
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backend() -> Iterator[ToggleServer]:
    server = ToggleServer()
    yield server
    server.close()


def wait_for_health(agent: AgentProcess, task_id: str, wanted: str, within: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        status, task = agent.request("GET", f"/v1/tasks/{task_id}")
        assert status == 200
        if task["health"] == wanted:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"task did not turn {wanted} within {within}s: {task}")


def test_http_check_turns_unhealthy_and_recovers(
    start_agent: StartAgent, backend: ToggleServer
) -> None:
    agent = start_agent()
    status, _ = agent.request(
        "POST",
        "/v1/services",
        {
            "name": "web",
            "ports": [{"target_port": 80, "published_port": 18081}],
            "health_check": {
                "type": "http",
                "path": "/healthz",
                "interval": INTERVAL,
                "timeout": 1,
                "retries": RETRIES,
            },
        },
    )
    assert status == 201
    status, task = agent.request(
        "POST", "/v1/services/web/tasks", {"address": "127.0.0.1", "ports": {"80": backend.port}}
    )
    assert status == 201 and task["health"] == "starting"
    wait_for_health(agent, task["id"], "healthy", SLACK)

    backend.status = 500
    took = wait_for_health(agent, task["id"], "unhealthy", INTERVAL * RETRIES + SLACK)
    print(
        f"\nunhealthy {took:.2f}s after the check began failing "
        f"(interval x retries = {INTERVAL * RETRIES:.2f}s)"
    )
    output = agent.request("GET", f"/v1/tasks/{task['id']}")[1]["health_output"]
    assert "500" in output

    backend.status = 200
    took = wait_for_health(agent, task["id"], "healthy", INTERVAL + SLACK)
    print(f"healthy again {took:.2f}s after it recovered")


def test_ttl_check_expires_without_heartbeats(start_agent: StartAgent) -> None:
    agent = start_agent()
    agent.request(
        "POST", "/v1/services", {"name": "worker", "health_check": {"type": "ttl", "ttl": 0.5}}
    )
    _, task = agent.request("POST", "/v1/services/worker/tasks", {"address": "127.0.0.1"})
    status, reported = agent.request(
        "PUT", f"/v1/tasks/{task['id']}/health", {"status": "healthy", "output": "ok"}
    )
    assert status == 200 and reported["health"] == "healthy"
    wait_for_health(agent, task["id"], "unhealthy", 0.5 + SLACK)
    assert (
        agent.request("PUT", f"/v1/tasks/{task['id']}/health", {"status": "healthy"})[1]["health"]
        == "healthy"
    )


def test_task_without_check_is_healthy_and_delete_drains(start_agent: StartAgent) -> None:
    agent = start_agent()
    agent.request("POST", "/v1/services", {"name": "web"})
    _, task = agent.request("POST", "/v1/services/web/tasks", {"address": "127.0.0.1"})
    assert task["health"] == "healthy"
    status, drained = agent.request("DELETE", f"/v1/tasks/{task['id']}")
    assert status == 202 and drained["state"] == "draining"
    deadline = time.monotonic() + SLACK
    while agent.request("GET", f"/v1/tasks/{task['id']}")[0] != 404:
        assert time.monotonic() < deadline, "the drained task was never removed"
        time.sleep(0.05)

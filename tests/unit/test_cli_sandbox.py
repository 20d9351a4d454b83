"""The sandbox commands without an agent: `task run/exec/add --sandbox`, `mesh run`.

The agent is a recording fake (Client.request patched); the command runs for
real, but outside any namespace (`inside.netns_argv` patched to run it as is):
what is checked is the CLI's side, the exit status passed through, the
signals forwarded, and the task (and `mesh run`'s service) removed whatever
ended the command.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mesh.cli import client as client_module
from mesh.cli import inside
from mesh.cli.errors import CliError
from mesh.cli.main import main, split_command
from mesh.cli.task import format_addresses

NETNS = "/run/netns/mp-abcdef-t1"
TASK = {
    "id": "t1",
    "name": "web.1.t1",
    "service": "web",
    "address": "10.0.1.5",
    "addresses": {"a": "10.0.1.5", "b": "10.0.2.5"},
    "sandbox": {"netns": NETNS, "adopted": False, "endpoints": []},
}


class FakeAgent:
    def __init__(self, network: dict[str, Any] | None = None) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.network = network or {"name": "a", "attachable": True}

    def request(
        self, client: Any, method: str, path: str, *, body: Any = None, query: Any = None
    ) -> Any:
        self.calls.append((method, path, body))
        if method == "POST" and path.endswith("/tasks"):
            return dict(TASK)
        if method == "GET" and path.startswith("/v1/networks/"):
            return self.network
        if method == "GET" and path.startswith("/v1/tasks/"):
            return dict(TASK)
        return {}

    def methods(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _ in self.calls]


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> FakeAgent:
    fake = FakeAgent()

    def request(client: Any, method: str, path: str, **kwargs: Any) -> Any:
        return fake.request(client, method, path, **kwargs)

    monkeypatch.setattr(client_module.Client, "request", request)
    monkeypatch.delenv("MESH_API", raising=False)
    return fake


@pytest.fixture
def entered(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Commands run as they are; the namespaces they were to enter, recorded."""
    seen: list[str] = []

    def argv_as_is(netns: str, argv: Sequence[str]) -> list[str]:
        seen.append(netns)
        return list(argv)

    monkeypatch.setattr(inside, "netns_argv", argv_as_is)
    return seen


def test_the_command_after_the_double_dash_is_the_commands_own() -> None:
    assert split_command(["task", "run", "web", "--", "ls", "--", "-l"]) == (
        ["task", "run", "web"],
        ["ls", "--", "-l"],
    )
    assert split_command(["task", "ls"]) == (["task", "ls"], None)


def test_a_command_that_runs_nothing_refuses_one(agent: FakeAgent) -> None:
    assert main(["task", "ls", "--", "ls"]) == 2
    assert main(["task", "run", "web"]) == 2  # no command, not detached
    assert agent.calls == []


def test_task_run_passes_the_exit_status_through_and_removes_the_task(
    agent: FakeAgent, entered: list[str]
) -> None:
    assert main(["task", "run", "web", "--port", "80=8080", "--", "sh", "-c", "exit 7"]) == 7
    assert entered == [NETNS]
    method, path, body = agent.calls[0]
    assert (method, path) == ("POST", "/v1/services/web/tasks")
    assert body == {"sandbox": {"netns": None}, "ports": {"80": 8080}}
    assert agent.methods()[-1] == ("DELETE", "/v1/tasks/t1")


def test_task_run_forwards_sigterm_and_still_removes_the_task(
    agent: FakeAgent, entered: list[str]
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    started = time.monotonic()
    timer.start()
    try:
        status = main(["task", "run", "web", "--", "sleep", "30"])
    finally:
        timer.cancel()
    elapsed = time.monotonic() - started
    print(f"sleep ended by the forwarded SIGTERM after {elapsed:.2f} s")
    assert status == 128 + signal.SIGTERM
    assert elapsed < 10
    assert agent.methods()[-1] == ("DELETE", "/v1/tasks/t1")
    assert signal.getsignal(signal.SIGTERM) is before  # the handler restored


def test_task_run_detached_leaves_the_task(
    agent: FakeAgent, entered: list[str], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    assert main(["task", "run", "web", "--detach", "--", "touch", str(marker)]) == 0
    assert ("DELETE", "/v1/tasks/t1") not in agent.methods()
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists()


def test_task_add_sandbox_prints_the_namespace(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["task", "add", "web", "--sandbox", "--netns", "/proc/1/ns/net"]) == 0
    assert capsys.readouterr().out.strip() == NETNS
    assert agent.calls[0][2] == {"sandbox": {"netns": "/proc/1/ns/net"}}
    assert main(["task", "add", "web", "--address", "10.0.0.1", "--sandbox"]) == 2
    assert main(["task", "add", "web", "--address", "10.0.0.1", "--netns", "x"]) == 2


def test_task_exec_runs_in_the_tasks_namespace(agent: FakeAgent, entered: list[str]) -> None:
    assert main(["task", "exec", "web.1.t1", "--", "sh", "-c", "exit 3"]) == 3
    assert entered == [NETNS]
    assert ("DELETE", "/v1/tasks/t1") not in agent.methods()


def test_task_exec_of_a_host_task_is_one_clear_line(
    agent: FakeAgent, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(TASK, "sandbox", None)
    assert main(["task", "exec", "t1", "--", "true"]) == 1
    assert "has no sandbox" in capsys.readouterr().err


def test_mesh_run_makes_and_removes_a_temporary_service(
    agent: FakeAgent, entered: list[str]
) -> None:
    assert main(["run", "--network", "a", "--alias", "probe", "--", "sh", "-c", "exit 4"]) == 4
    posts = [(p, b) for m, p, b in agent.calls if m == "POST"]
    service = posts[0][1]
    assert posts[0][0] == "/v1/services"
    assert service["name"].startswith("run-") and len(service["name"]) == 12
    assert service["networks"] == ["a"] and service["aliases"] == {"a": ["probe"]}
    assert posts[1] == (f"/v1/services/{service['name']}/tasks", {"sandbox": {"netns": None}})
    assert agent.methods()[-2:] == [
        ("DELETE", "/v1/tasks/t1"),
        ("DELETE", f"/v1/services/{service['name']}"),
    ]


def test_mesh_run_refuses_a_network_that_is_not_attachable(
    agent: FakeAgent, entered: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    agent.network = {"name": "a", "attachable": False}
    assert main(["run", "--network", "a", "--", "true"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not attachable" in err
    assert [m for m, _ in agent.methods()] == ["GET"]


def test_the_namespace_is_entered_with_its_resolver_when_it_has_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run, etc = tmp_path / "run", tmp_path / "etc"
    monkeypatch.setattr(inside, "NETNS_RUN", run)
    monkeypatch.setattr(inside, "NETNS_ETC", etc)
    (etc / "mp-1").mkdir(parents=True)
    run.mkdir()
    (run / "mp-1").touch()
    (run / "other").touch()
    (etc / "mp-1" / "resolv.conf").write_text("nameserver 127.0.0.11\n")
    assert inside.netns_argv(str(run / "mp-1"), ["curl", "x"])[1:] == [
        "netns",
        "exec",
        "mp-1",
        "curl",
        "x",
    ]
    own = f"/proc/{os.getpid()}/ns/net"
    assert inside.netns_argv(own, ["sh"])[1:] == [f"--net={own}", "--", "sh"]
    assert inside.netns_argv("other", ["sh"])[1:] == [f"--net={run / 'other'}", "--", "sh"]
    with pytest.raises(CliError, match="does not exist on this host"):
        inside.netns_argv(str(run / "gone"), ["sh"])


def test_task_ls_shows_each_network_address_of_a_sandboxed_task() -> None:
    assert format_addresses(TASK) == "a:10.0.1.5,b:10.0.2.5"
    assert format_addresses({"address": "10.0.0.9", "sandbox": None}) == "10.0.0.9"


def test_a_signal_while_the_task_is_made_removes_it_and_runs_nothing(
    agent: FakeAgent, entered: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    answer = agent.request

    def slow_create(client: Any, method: str, path: str, **kwargs: Any) -> Any:
        if method == "POST":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the agent makes the sandbox
        return answer(client, method, path, **kwargs)

    monkeypatch.setattr(client_module.Client, "request", slow_create)
    assert main(["task", "run", "web", "--", "true"]) == 128 + signal.SIGTERM
    assert entered == []
    assert agent.methods()[-1] == ("DELETE", "/v1/tasks/t1")

"""GET /v1/events: every change as a server-sent event, resumable with Last-Event-ID."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import aiohttp

from tests.helpers.agent import REPO, AgentProcess


async def read_events(resp: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    while len(events) < count:
        line = (await asyncio.wait_for(resp.content.readline(), 10)).decode().rstrip("\n")
        if not line:
            if "data" in current:
                events.append(current)
            current = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(": ")
            current[field] = json.loads(value) if field == "data" else value
    return events


async def _exercise(agent: AgentProcess) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{agent.api}/v1/events") as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            await asyncio.to_thread(agent.request, "POST", "/v1/services", {"name": "web"})
            await asyncio.to_thread(
                agent.request, "POST", "/v1/services/web/tasks", {"address": "127.0.0.1"}
            )
            await asyncio.to_thread(agent.request, "DELETE", "/v1/services/web")
            events = await read_events(resp, 4)
        assert [(e["event"], e["data"]["op"]) for e in events] == [
            ("service", "upsert"),
            ("task", "upsert"),
            ("task", "delete"),
            ("service", "delete"),
        ]
        assert events[0]["data"]["object"]["name"] == "web"
        first_id = events[0]["id"]
        # A reconnecting client names the last event it saw and gets the rest.
        async with session.get(
            f"http://{agent.api}/v1/events", headers={"Last-Event-ID": first_id}
        ) as resp:
            replay = await read_events(resp, 3)
        assert [e["id"] for e in replay] == [e["id"] for e in events[1:]]


def test_events_stream_and_resume(agent: AgentProcess) -> None:
    asyncio.run(_exercise(agent))


class Cli:
    """`mesh events ...` running, its stdout and stderr read line by line by threads."""

    def __init__(self, agent: AgentProcess, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", "events", "--api", agent.api, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        threading.Thread(target=self._errors, args=(self.proc.stderr,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.out.put(line.rstrip("\n"))

    def _errors(self, stream: IO[str]) -> None:
        for line in stream:
            self.err.append(line.rstrip("\n"))

    def wait_for(self, needle: str, timeout: float = 10.0) -> tuple[str, list[str]]:
        """The first line holding `needle`, and the lines before it."""
        before: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.out.get(timeout=max(0.01, left))
            except queue.Empty:
                raise AssertionError(f"no line with {needle!r}; saw {before}, {self.err}") from None
            if needle in line:
                return line, before
            before.append(line)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def wait_until_following(agent: AgentProcess, cli: Cli) -> None:
    """A change made before `mesh events` has connected is not shown (no --since), and
    a loaded machine can take seconds to start the CLI: make changes until one shows."""
    deadline = time.monotonic() + 30
    for attempt in range(1000):
        name = f"warmup{attempt}"
        assert agent.request("POST", "/v1/services", {"name": name})[0] == 201
        try:
            cli.wait_for(f"service {name}", timeout=0.5)
            return
        except AssertionError:
            assert time.monotonic() < deadline, "mesh events never showed a change"


def test_mesh_events_resumes_after_the_agent_restarts(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "data").start()
    cli: Cli | None = None
    try:
        cli = Cli(agent)
        wait_until_following(agent, cli)
        assert agent.request("POST", "/v1/services", {"name": "before"})[0] == 201
        line, _ = cli.wait_for("service before")
        assert re.fullmatch(r"#\d+ upsert service before.*", line), line
        agent.stop()
        agent.start()
        started = time.monotonic()
        assert agent.request("POST", "/v1/services", {"name": "after"})[0] == 201
        line, between = cli.wait_for("service after", timeout=20)
        print(
            f"after the restart, the new change was printed in {time.monotonic() - started:.2f} s"
        )
        assert re.fullmatch(r"#\d+ upsert service after.*", line), line
        assert not any("service before" in b for b in between)  # nothing printed twice
        assert any(b.startswith("-- gap") for b in between), between  # said, not hidden
        assert any("reconnecting" in e or "retrying" in e for e in cli.err), cli.err
        assert cli.proc.poll() is None  # still following
    finally:
        if cli is not None:
            cli.stop()
        agent.stop()


def test_mesh_events_since_json_and_type(agent: AgentProcess) -> None:
    assert agent.request("POST", "/v1/services", {"name": "web"})[0] == 201
    assert agent.request("POST", "/v1/services/web/tasks", {"address": "127.0.0.1"})[0] == 201
    cli = Cli(agent, "--since", "0", "--json", "--type", "task")
    try:
        line, before = cli.wait_for('"event":"task"')
        # 0 is before this agent's first change: a gap first (what came before is not
        # known), then every change the feed holds; the service's one is filtered out
        assert [json.loads(b)["event"] for b in before] == ["gap"]
        obj = json.loads(line)
        assert obj["op"] == "upsert" and obj["object"]["service"] == "web"
        assert isinstance(obj["id"], int) and obj["id"] >= 2
    finally:
        cli.stop()

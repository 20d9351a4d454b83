"""The health runner against real servers on 127.0.0.1.

Timings are upper bounds with generous slack (machines are noisy); what is
asserted exactly is the sequence of reported transitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest
from aiohttp import web

from mesh.core.model import (
    Change,
    Health,
    HealthCheck,
    Kind,
    PortConfig,
    Service,
    Task,
    TaskState,
)
from mesh.health import HealthRunner

NODE = "n1"
INTERVAL = 0.1
SLACK = 5.0  # seconds on top of any bound the semantics give


class HealthServer:
    """An HTTP server whose /health answers `status`, counting the requests it gets."""

    def __init__(self) -> None:
        self.status = 200
        self.hits = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/moved", self._moved)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, _: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(status=self.status, text="ok" if self.status < 400 else "bad")

    async def _moved(self, _: web.Request) -> web.Response:
        raise web.HTTPFound("/nowhere")


class Reports:
    """The runner's `report` callable: keeps every call, and lets a test wait for one."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Health, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, task_id: str, health: Health, output: str) -> None:
        self.calls.append((task_id, health, output))
        self._changed.set()

    def of(self, task_id: str) -> list[Health]:
        return [health for tid, health, _ in self.calls if tid == task_id]

    def output(self, task_id: str) -> str:
        return [output for tid, _, output in self.calls if tid == task_id][-1]

    async def wait(self, task_id: str, count: int, within: float) -> float:
        """Wait until `task_id` has `count` reports; returns the seconds it took."""
        started = time.monotonic()
        async with asyncio.timeout(within):
            while len(self.of(task_id)) < count:
                self._changed.clear()
                await self._changed.wait()
        return time.monotonic() - started


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    server = HealthServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def reports() -> Reports:
    return Reports()


@pytest.fixture
async def runner(reports: Reports) -> AsyncIterator[HealthRunner]:
    runner = HealthRunner(NODE, reports)
    await runner.start()
    yield runner
    await runner.stop()


def free_port() -> int:
    """A port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def register(
    runner: HealthRunner,
    check: HealthCheck,
    *,
    port: int | None,
    task_id: str = "t1",
    node: str = NODE,
) -> Task:
    """Feed the runner a service with `check` and one task of it listening on `port`."""
    ports = (
        () if port is None else (PortConfig(protocol="tcp", target_port=80, published_port=30080),)
    )
    service = Service(name=f"svc-{task_id}", id=f"s-{task_id}", ports=ports, health_check=check)
    task = Task(
        id=task_id,
        name=f"svc-{task_id}.1.{task_id}",
        service=service.name,
        slot=1,
        node=node,
        address="127.0.0.1",
        ports={} if port is None else {80: port},
        created_at=time.time(),
    )
    runner.on_change(Change(Kind.SERVICE, service.name, None, service))
    runner.on_change(Change(Kind.TASK, task.id, None, task))
    return task


HTTP_CHECK = HealthCheck(type="http", path="/health", interval=INTERVAL, timeout=1.0, retries=2)


async def test_http_check_turns_unhealthy_and_recovers(
    runner: HealthRunner, server: HealthServer, reports: Reports
) -> None:
    register(runner, HTTP_CHECK, port=server.port)
    await reports.wait("t1", 1, within=INTERVAL + SLACK)
    assert reports.calls == [("t1", Health.HEALTHY, "HTTP 200")]

    server.status = 500
    await reports.wait("t1", 2, within=INTERVAL * 2 + SLACK)
    assert reports.calls[-1] == ("t1", Health.UNHEALTHY, "HTTP 500")

    server.status = 204
    await reports.wait("t1", 3, within=INTERVAL + SLACK)
    assert reports.of("t1") == [Health.HEALTHY, Health.UNHEALTHY, Health.HEALTHY]


async def test_http_check_fails_when_the_server_is_gone(
    runner: HealthRunner, server: HealthServer, reports: Reports
) -> None:
    register(runner, HTTP_CHECK, port=server.port)
    await reports.wait("t1", 1, within=INTERVAL + SLACK)
    await server.stop()
    await reports.wait("t1", 2, within=INTERVAL * 2 + SLACK)
    assert reports.of("t1") == [Health.HEALTHY, Health.UNHEALTHY]
    assert reports.output("t1").startswith(f"GET http://127.0.0.1:{server.port}/health: ")


async def test_http_check_does_not_follow_redirects(
    runner: HealthRunner, server: HealthServer, reports: Reports
) -> None:
    register(runner, replace(HTTP_CHECK, path="/moved", status_max=299), port=server.port)
    await reports.wait("t1", 1, within=INTERVAL * 2 + SLACK)
    assert reports.calls == [("t1", Health.UNHEALTHY, "HTTP 302")]


async def test_tcp_check_against_listening_and_closed_ports(
    runner: HealthRunner, reports: Reports
) -> None:
    listener = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    async with listener:
        port = listener.sockets[0].getsockname()[1]
        check = HealthCheck(type="tcp", interval=INTERVAL, timeout=1.0, retries=2)
        register(runner, check, port=port, task_id="open")
        register(runner, check, port=free_port(), task_id="closed")
        await reports.wait("open", 1, within=INTERVAL + SLACK)
        await reports.wait("closed", 1, within=INTERVAL * 2 + SLACK)
    assert reports.of("open") == [Health.HEALTHY]
    assert reports.of("closed") == [Health.UNHEALTHY]
    assert reports.output("closed").startswith("connect 127.0.0.1:")


async def test_a_check_without_a_port_fails(runner: HealthRunner, reports: Reports) -> None:
    register(runner, HealthCheck(type="tcp", interval=INTERVAL, retries=1), port=None)
    await reports.wait("t1", 1, within=INTERVAL + SLACK)
    assert reports.calls == [("t1", Health.UNHEALTHY, "no port to check")]


async def test_ttl_check_expires_and_heartbeats_revive_it(
    runner: HealthRunner, reports: Reports
) -> None:
    ttl = 0.5
    register(runner, HealthCheck(type="ttl", ttl=ttl), port=None)
    runner.heartbeat("t1", True, "alive")
    assert reports.calls == [("t1", Health.HEALTHY, "alive")]
    for _ in range(4):  # heartbeats well inside the ttl keep it healthy
        await asyncio.sleep(ttl / 10)
        runner.heartbeat("t1", True, "alive")
    took = await reports.wait("t1", 2, within=ttl + SLACK)
    assert took >= ttl * 0.9  # not before the deadline
    assert reports.calls[-1] == ("t1", Health.UNHEALTHY, "TTL expired")
    runner.heartbeat("t1", True, "back")
    assert reports.of("t1") == [Health.HEALTHY, Health.UNHEALTHY, Health.HEALTHY]


async def test_draining_and_foreign_tasks_are_not_probed(
    runner: HealthRunner, server: HealthServer, reports: Reports
) -> None:
    register(runner, HTTP_CHECK, port=server.port, task_id="other", node="n2")
    task = register(runner, HTTP_CHECK, port=server.port)
    await reports.wait("t1", 1, within=INTERVAL + SLACK)
    draining = replace(task, state=TaskState.DRAINING, drain_until=time.time() + 10)
    runner.on_change(Change(Kind.TASK, task.id, task, draining))
    await asyncio.sleep(INTERVAL * 5)  # let a probe already in flight land
    hits = server.hits
    await asyncio.sleep(INTERVAL * 5)
    assert server.hits == hits
    assert reports.of("other") == []


async def test_stop_cancels_probes_in_flight(reports: Reports) -> None:
    runner = HealthRunner(NODE, reports, loop_time=time.monotonic)
    held: list[asyncio.StreamWriter] = []  # accepted, never answered
    blackhole = await asyncio.start_server(lambda _r, w: held.append(w), "127.0.0.1", 0)
    async with blackhole:
        port = blackhole.sockets[0].getsockname()[1]
        register(runner, replace(HTTP_CHECK, timeout=30.0), port=port)
        await runner.start()
        await asyncio.sleep(INTERVAL * 3)  # a probe is now waiting for an answer
        async with asyncio.timeout(SLACK):
            await runner.stop()
        assert "stopped probes=0" in repr(runner)
        assert runner.planner.next_deadline() is not None  # a restart probes it again
        for writer in held:
            writer.close()
    assert reports.calls == []


@contextlib.contextmanager
def descriptors_exhausted() -> Iterator[None]:
    """Lower this process's soft RLIMIT_NOFILE below any free descriptor: every new
    socket() fails with EMFILE until the block ends (the limit is restored then)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The limit bounds descriptor numbers, and a new one takes the lowest free number:
    # a limit at that number leaves none free.
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_out_of_descriptors_is_not_the_tasks_failure(
    runner: HealthRunner, server: HealthServer, reports: Reports
) -> None:
    """EMFILE on the checker's side says nothing of the task: no failure is counted."""
    register(runner, HTTP_CHECK, port=server.port, task_id="web")
    register(
        runner,
        HealthCheck(type="tcp", interval=INTERVAL, timeout=1.0, retries=2),
        port=server.port,
        task_id="raw",
    )
    await reports.wait("web", 1, within=INTERVAL + SLACK)
    await reports.wait("raw", 1, within=INTERVAL + SLACK)
    with descriptors_exhausted():
        await asyncio.sleep(INTERVAL * 10)  # ten probes of each, with retries 2
    assert reports.of("web") == [Health.HEALTHY] and reports.of("raw") == [Health.HEALTHY], (
        reports.calls
    )
    print(f"\nprobes postponed for want of descriptors: {runner.fd_shortage}")
    assert runner.fd_shortage >= 4
    hits = server.hits
    await asyncio.sleep(INTERVAL * 3)
    assert server.hits > hits  # probing goes on once descriptors are there again

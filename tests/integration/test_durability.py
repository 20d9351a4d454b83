"""Durability: what the API answered 2xx survives a restart and a kill -9 at any moment."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp

from tests.helpers.agent import AgentProcess
from tests.integration.conftest import StartAgent

BURST = 1000


def test_restart_restores_the_same_state(start_agent: StartAgent) -> None:
    # A long drain: the draining task must come back still draining, not yet removed.
    agent = start_agent(extra=["--drain-grace", "300"])
    assert agent.request("POST", "/v1/networks", {"name": "backend"})[0] == 201
    status, service = agent.request(
        "POST",
        "/v1/services",
        {
            "name": "web",
            "networks": ["backend"],
            "labels": {"tier": "front"},
            "ports": [{"target_port": 80, "published_port": 18080}],
        },
    )
    assert status == 201
    for port in (31001, 31002):
        assert (
            agent.request(
                "POST", "/v1/services/web/tasks", {"address": "127.0.0.1", "ports": {"80": port}}
            )[0]
            == 201
        )
    task_id = agent.request("GET", "/v1/tasks")[1][0]["id"]
    assert agent.request("DELETE", f"/v1/tasks/{task_id}")[0] == 202
    before = {
        path: agent.request("GET", path)[1]
        for path in ("/v1/networks", "/v1/services", "/v1/tasks")
    }

    assert agent.stop() == 0
    agent.start()

    after = {path: agent.request("GET", path)[1] for path in before}
    assert after == before
    # A new service still gets a fresh VIP: the allocations came back too.
    status, other = agent.request("POST", "/v1/services", {"name": "api", "networks": ["backend"]})
    assert status == 201
    assert other["vips"][0]["address"] not in {v["address"] for v in service["vips"]}


def test_a_drain_interrupted_by_a_restart_still_completes(start_agent: StartAgent) -> None:
    agent = start_agent(extra=["--drain-grace", "1"])
    assert agent.request("POST", "/v1/services", {"name": "web"})[0] == 201
    _, task = agent.request("POST", "/v1/services/web/tasks", {"address": "127.0.0.1"})
    assert agent.request("DELETE", f"/v1/tasks/{task['id']}")[0] == 202
    agent.kill()
    agent.start()
    deadline = time.monotonic() + 15
    while agent.request("GET", f"/v1/tasks/{task['id']}")[0] != 404:
        assert time.monotonic() < deadline, "the drained task was never removed"
        time.sleep(0.1)


async def _register_burst(
    api: str,
    count: int,
    answered: list[dict[str, object]],
    kill_after: int,
    agent: AgentProcess,
    offset: int = 0,
) -> None:
    """Fire `count` concurrent registrations; kill -9 the agent once `kill_after` are answered."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    killed = asyncio.Event()

    async def register(session: aiohttp.ClientSession, index: int) -> None:
        body = {
            "address": f"127.0.{index // 250}.{index % 250 + 1}",
            "ports": {"80": 8000 + offset},
        }
        try:
            async with session.post(f"http://{api}/v1/services/web/tasks", json=body) as resp:
                if resp.status == 201:
                    answered.append(await resp.json())
                else:
                    assert resp.status == 503, await resp.text()
        except (TimeoutError, aiohttp.ClientError):
            return  # in flight when the agent died: never acknowledged
        if len(answered) >= kill_after and not killed.is_set():
            killed.set()
            assert agent.proc is not None
            # Freeze it first (all its threads, at once), then kill: the crash lands
            # at this instant, however fast the agent answers the rest meanwhile.
            agent.proc.send_signal(signal.SIGSTOP)
            agent.proc.kill()

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(register(session, i) for i in range(count)))


def test_kill_9_during_a_burst_of_registrations_loses_nothing_answered(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "data").start()
    try:
        assert agent.request("POST", "/v1/services", {"name": "web"})[0] == 201
        answered: list[dict[str, object]] = []
        asyncio.run(_register_burst(agent.api, BURST, answered, kill_after=BURST // 3, agent=agent))
        assert agent.proc is not None
        agent.proc.wait(10)
        acknowledged = {str(t["id"]): t for t in answered}
        print(f"\nburst: {BURST} registrations, {len(acknowledged)} answered 201 before kill -9")
        assert BURST // 3 <= len(acknowledged) < BURST

        agent.start()
        status, tasks = agent.request("GET", "/v1/tasks?service=web")
        assert status == 200
        restored = {t["id"]: t for t in tasks}
        missing = set(acknowledged) - set(restored)
        assert not missing, f"{len(missing)} acknowledged registrations were lost"
        for task_id, task in acknowledged.items():
            assert restored[task_id] == task
        print(f"restored {len(restored)} tasks; every acknowledged one is back unchanged")
        # And the agent keeps its promises after recovery: slots and endpoints stay unique.
        assert len({t["slot"] for t in tasks}) == len(tasks)
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()


def test_repeated_kill_9_always_leaves_a_state_that_loads(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "data").start()
    try:
        _kill_repeatedly(agent)
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.kill()


def _kill_repeatedly(agent: AgentProcess) -> None:
    assert agent.request("POST", "/v1/services", {"name": "web"})[0] == 201
    acknowledged: set[str] = set()
    for round_ in range(4):
        answered: list[dict[str, object]] = []
        # Kill at a different point each round: early, middle, late.
        asyncio.run(
            _register_burst(
                agent.api, 200, answered, kill_after=10 + 50 * round_, agent=agent, offset=round_
            )
        )
        assert agent.proc is not None
        agent.proc.wait(10)
        acknowledged |= {str(t["id"]) for t in answered}
        agent.start()
        status, tasks = agent.request("GET", "/v1/tasks")
        assert status == 200
        assert acknowledged <= {t["id"] for t in tasks}
        assert agent.request("POST", "/v1/services", {"name": f"svc-{round_}"})[0] == 201
    assert agent.stop() == 0


def test_tombstones_are_forgotten_after_the_reap_interval(start_agent: StartAgent) -> None:
    agent = start_agent(extra=["--tombstone-reap", "1"])
    assert agent.request("POST", "/v1/services", {"name": "gone"})[0] == 201
    assert agent.request("DELETE", "/v1/services/gone")[0] == 204

    def rows() -> int:
        with sqlite3.connect(agent.data_dir / "state.db") as db:
            found: int = db.execute(
                "SELECT count(*) FROM records WHERE kind = 'service' AND key = 'gone'"
            ).fetchone()[0]
            return found

    assert rows() == 1  # the tombstone, durable
    deadline = time.monotonic() + 15
    while rows():
        assert time.monotonic() < deadline, "the tombstone was never reaped"
        time.sleep(0.2)
    assert "tombstones_reaped" in agent.log()
    # The name is free, and a new service of that name is a new record.
    assert agent.request("POST", "/v1/services", {"name": "gone"})[0] == 201

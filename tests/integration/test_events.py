"""GET /v1/events: every change as a server-sent event, resumable with Last-Event-ID."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.helpers.agent import AgentProcess


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

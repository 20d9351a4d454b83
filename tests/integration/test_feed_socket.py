"""The feed socket both ways: a snapshot and changes down, a worker's reports up."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from mesh.core.feed import ChangeFeed
from mesh.core.feedclient import FeedClient
from mesh.core.model import Change, Kind, Network, Record
from mesh.feedserver import FeedServer


async def test_snapshot_changes_and_reports(tmp_path: Path) -> None:
    records: list[Record] = [
        Network(name="ingress", id="n1", driver="overlay", subnet="10.0.0.0/24", gateway="10.0.0.1")
    ]
    feed = ChangeFeed(lambda: records)
    reports: list[dict[str, Any]] = []
    gone: list[dict[str, Any]] = []
    server = FeedServer(feed, tmp_path / "feed.sock", reports.append, gone.append)
    await server.start()
    client = FeedClient(server.path)
    try:
        assert [r.key for r in await client.open()] == ["ingress"]
        seen: list[Change] = []
        follower = asyncio.create_task(client.follow(seen.append))
        added = Network(
            name="backend", id="n2", driver="overlay", subnet="10.0.1.0/24", gateway="10.0.1.1"
        )
        feed.publish([Change(Kind.NETWORK, "backend", None, added)])
        client.report({"http_worker": 7, "stats": {"requests": 3}})
        assert client._writer is not None
        client._writer.write(b"not json\n[1, 2]\n")  # dropped and counted, the feed goes on
        client.report({"http_worker": 7, "stats": {"requests": 4}})
        for _ in range(200):
            if len(reports) == 2 and seen:
                break
            await asyncio.sleep(0.01)
        assert [c.after.key for c in seen] == ["backend"] and seen[0].before is None
        assert reports == [
            {"http_worker": 7, "stats": {"requests": 3}},
            {"http_worker": 7, "stats": {"requests": 4}},
        ]
        assert server.bad_reports == 2
        assert gone == []
        follower.cancel()
    finally:
        client.close()
        for _ in range(200):
            if gone:
                break
            await asyncio.sleep(0.01)
        await server.stop()
    # The connection's end hands its last report on: the worker is gone.
    assert gone == [{"http_worker": 7, "stats": {"requests": 4}}]

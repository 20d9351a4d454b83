"""The state writer: what a commit writes, and that a reopened data dir loads it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from mesh.core.codec import record_json
from mesh.core.model import Task, Version
from mesh.state import persist


def _task(n: int, clock: int) -> Task:
    return Task(
        id=f"t{n}",
        name=f"web.{n}.t{n}",
        service="web",
        slot=n,
        node="n1",
        address=f"10.0.0.{n}",
        version=Version(clock, "n1"),
    )


async def test_commits_write_records_meta_and_forgets_and_a_restart_loads_them(
    tmp_path: Path,
) -> None:
    persist.load(tmp_path)  # makes the database, as an agent's start does
    writer = persist.StateWriter(tmp_path)
    writer.start(asyncio.get_running_loop())
    try:
        await writer.write([_task(1, 1), _task(2, 2)], clock=2)
        await writer.write([], clock=3, meta={"cluster": "c1"})  # meta alone
        await writer.write([_task(3, 4)], clock=4)
        await writer.write([], clock=5, forget=[("task", "t2")])  # a reaped tombstone
    finally:
        writer.close()
    assert writer.commits >= 1 and writer.batches == 4

    loaded = persist.load(tmp_path)
    assert sorted(r.key for r in loaded.records) == ["t1", "t3"]
    assert loaded.clock == 5
    assert loaded.meta["cluster"] == "c1"
    assert loaded.meta["schema"] == str(persist.SCHEMA_VERSION)
    with sqlite3.connect(tmp_path / persist.DB_NAME) as conn:
        (body,) = conn.execute("SELECT body FROM records WHERE key = 't3'").fetchone()
    assert body == record_json(_task(3, 4))  # the compact text gossip and the feed share

"""The worker's end of the change feed (`mesh.feedserver`): a snapshot, then every change.

A worker process (DNS, the L7 router) connects, loads the snapshot into its
views, then applies each change as it arrives. The feed sends records, not
changes; `Replica` remembers what it was sent so that each record becomes a
`Change` with its `before`, as the in-process feed delivers it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh.core.codec import record_from_dict
from mesh.core.model import KIND_OF, Change, Kind, Record

#: the longest feed line: a snapshot of a large cluster
LINE_LIMIT = 1 << 30


class Replica:
    """The records as the feed has delivered them, to give each change its `before`."""

    def __init__(self) -> None:
        self._records: dict[tuple[Kind, str], Record] = {}

    def load(self, records: list[Record]) -> None:
        for record in records:
            self._records[(KIND_OF[type(record)], record.key)] = record

    def change(self, record: Record) -> Change:
        key = (KIND_OF[type(record)], record.key)
        before = self._records.get(key)
        self._records[key] = record
        return Change(key[0], record.key, before, record)


class FeedClient:
    """Connect with `open()` (returns the snapshot), then `follow()` until the feed ends."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.replica = Replica()
        self.seq = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> list[Record]:
        self._reader, self._writer = await asyncio.open_unix_connection(self.path, limit=LINE_LIMIT)
        first = json.loads(await self._reader.readline())
        records = [record_from_dict(r) for r in first["records"]]
        self.seq = int(first["snapshot"])
        self.replica.load(records)
        return records

    async def follow(self, on_change: Callable[[Change], None]) -> None:
        """Apply every change; returns when the agent ends the feed."""
        assert self._reader is not None
        while line := await self._reader.readline():
            message = json.loads(line)
            self.seq = int(message["seq"])
            on_change(self.replica.change(record_from_dict(message["record"])))

    def report(self, message: dict[str, Any]) -> None:
        """Send the agent one JSON line (a worker's counters); FeedServer's `on_report` gets it."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

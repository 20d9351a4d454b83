"""The change feed over a Unix socket, for worker processes: a snapshot, then every delta.

A worker (the DNS worker today; the proxy and the L7 router later) connects
to `<data-dir>/feed.sock` and reads newline-delimited JSON:

    {"snapshot": SEQ, "records": [RECORD, ...]}     once, first
    {"seq": SEQ, "record": RECORD}                  for every later change

RECORD is `mesh.core.codec.record_to_dict` (tombstones included, so a
removal is a record with "deleted": true). A worker may write JSON lines back
(its counters, say); each goes to `on_report`, and a line that is not a JSON
object is dropped and counted. When the connection ends, its last report goes
to `on_gone` once more: the worker is gone, and its sink folds what it counted
into a total that the next worker only adds to (a scrape never sees a counter
go backwards when a worker restarts). Snapshot and subscription happen in
the same tick of the loop, so no change falls between them. A worker that
reads too slowly is cut off once a few MiB wait for it; it reconnects and
starts again from a snapshot, which is the whole recovery story.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mesh.core.codec import record_json, record_to_dict
from mesh.core.feed import ChangeFeed
from mesh.core.logs import event
from mesh.core.model import Change, Record

log = logging.getLogger(__name__)

#: bytes waiting for one worker before it is cut off
MAX_BACKLOG = 8 << 20
#: the longest line a worker may report
MAX_REPORT = 16 << 20


#: sun_path holds 108 bytes; a deep data dir puts the socket in a private temp dir
_SUN_PATH_MAX = 100


def feed_socket_path(data_dir: Path) -> Path:
    path = data_dir / "feed.sock"
    if len(str(path)) <= _SUN_PATH_MAX:
        return path
    return Path(tempfile.mkdtemp(prefix="meshplane-")) / "feed.sock"


def encode_line(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode() + b"\n"


class _Follower:
    """One worker's connection, as a view of the feed: the snapshot line, then a line
    per change, until the worker reads too slowly."""

    def __init__(self, feed: ChangeFeed, writer: asyncio.StreamWriter) -> None:
        self._feed = feed
        self._writer = writer

    def load(self, records: Iterable[Record]) -> None:
        self._writer.write(
            encode_line(
                {"snapshot": self._feed.seq, "records": [record_to_dict(r) for r in records]}
            )
        )

    def on_change(self, change: Change) -> None:
        writer = self._writer
        if writer.is_closing():
            return
        if writer.transport.get_write_buffer_size() > MAX_BACKLOG:
            event(log, "feed_client_too_slow", logging.WARNING, backlog=MAX_BACKLOG)
            writer.close()
            return
        # encode_line({"seq": ..., "record": record_to_dict(...)}), byte for byte, with the
        # record's text shared by every worker (and gossip, and the disk)
        line = f'{{"seq":{self._feed.seq},"record":{record_json(change.after)}}}\n'
        writer.write(line.encode())


class FeedServer:
    def __init__(
        self,
        feed: ChangeFeed,
        path: Path,
        on_report: Callable[[dict[str, Any]], None] | None = None,
        on_gone: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._feed = feed
        self.path = path
        self._on_report = on_report
        self._on_gone = on_gone
        self.bad_reports = 0
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by an agent that was killed
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_REPORT
        )
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        unfollow = self._feed.follow(_Follower(self._feed, writer))
        last: dict[str, Any] | None = None
        try:
            while line := await reader.readline():  # EOF: the worker is gone
                last = self._report(line) or last
        except (ConnectionError, ValueError):  # ValueError: a line past MAX_REPORT
            pass
        finally:
            unfollow()
            if last is not None and self._on_gone is not None:
                self._on_gone(last)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._clients.discard(task)

    def _report(self, line: bytes) -> dict[str, Any] | None:
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.bad_reports += 1
            return None
        if self._on_report is not None:
            self._on_report(message)
        return message

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

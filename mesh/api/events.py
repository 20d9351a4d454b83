"""`GET /v1/events`: the change feed as server-sent events.

Each event is `id: <seq>`, `event: <kind>`, `data: {"op", "kind", "key",
"object"}`. A client that reconnects with `Last-Event-ID` gets the changes it
missed while the feed still holds them; one that fell too far behind (or
reads too slowly) gets `event: gap` and should re-read the lists. `<seq>` grows
across agent restarts: a client of an earlier run gets `gap`, then every change
of this run the feed still holds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from mesh.api import convert
from mesh.api.app import DEPS
from mesh.core.feed import ChangeFeed, Gap, Numbered
from mesh.core.model import Change, Network, Node, Record, Service, Task

QUEUE_LIMIT = 1024
KEEPALIVE_SECONDS = 15.0
#: What a stream's queue carries: a numbered change, OVERFLOW, or END (shutdown).
Item = tuple[int, Change] | str
OVERFLOW, END = "overflow", "end"
_STREAMS = web.AppKey("event_streams", set[asyncio.Queue[Item]])
#: An event's id is this plus the feed's number: the agent's start time in microseconds,
#: so ids keep growing across restarts (the feed numbers from 0 again) and a client's
#: Last-Event-ID from an earlier run is told apart from one of this run.
_BASE = web.AppKey("event_id_base", int)


def _object(record: Record, node_status: Callable[[str], str]) -> dict[str, Any]:
    match record:
        case Network():
            return convert.network_out(record)
        case Service():
            return convert.service_out(record)
        case Task():
            return convert.task_out(record, node_status(record.node))
        case Node():
            return {"name": record.name, "vtep": record.vtep, "addresses": dict(record.addresses)}
    raise TypeError(record)


def _frame(seq: int, change: Change, node_status: Callable[[str], str]) -> bytes:
    data = {
        "op": "delete" if change.after.deleted else "upsert",
        "kind": change.kind.value,
        "key": change.key,
        "object": _object(change.after, node_status),
    }
    return f"id: {seq}\nevent: {change.kind.value}\ndata: {json.dumps(data)}\n\n".encode()


class _Stream:
    """One client's stream as a view of the feed: it starts from the client's
    Last-Event-ID (the backlog), not from a snapshot, so `load` takes nothing."""

    def __init__(self, feed: ChangeFeed, queue: asyncio.Queue[Item]) -> None:
        self._feed = feed
        self._queue = queue
        self._overflowed = False

    def load(self, records: Iterable[Record]) -> None:
        pass

    def on_change(self, change: Change) -> None:
        if self._overflowed:
            return  # a reader this slow reconnects and re-reads; it is being told so
        if self._queue.qsize() >= QUEUE_LIMIT:
            self._overflowed = True
            self._queue.put_nowait(OVERFLOW)
        else:
            self._queue.put_nowait((self._feed.seq, change))


def _resume(feed: ChangeFeed, base: int, last: str) -> tuple[list[Numbered], bool]:
    """What a client that saw `last` missed, and whether it missed more than that
    (a gap): a number below `base` is from before this agent started."""
    if not (last.isascii() and last.isdigit() and len(last) < 19):  # int() refuses "²"
        return [], False
    seen = int(last) - base
    try:
        if seen < 0:
            # From an earlier run of the agent (or `--since 0`): what that run did
            # after it is not known here, so a gap; then every change of this run.
            return feed.since(0), True
        if seen > feed.seq:
            raise Gap(last)  # a number this agent never gave
        return feed.since(seen), False
    except Gap:
        return [], True


async def stream_events(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    feed = deps.control.feed
    # One slot more than the changes it buffers, so OVERFLOW always fits.
    queue: asyncio.Queue[Item] = asyncio.Queue(QUEUE_LIMIT + 1)

    base = request.app[_BASE]
    backlog, gap = _resume(feed, base, request.headers.get("Last-Event-ID", ""))
    unfollow = feed.follow(_Stream(feed, queue))
    streams = request.app[_STREAMS]
    streams.add(queue)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    try:
        await response.prepare(request)
        await response.write(b": connected\n\n")
        if gap:
            await response.write(b"event: gap\ndata: {}\n\n")
        status = deps.node_status()
        for numbered in backlog:
            await response.write(_frame(base + numbered.seq, numbered.change, status))
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if item == OVERFLOW:
                await response.write(b"event: gap\ndata: {}\n\n")
            if isinstance(item, str):
                break
            seq, change = item
            await response.write(_frame(base + seq, change, deps.node_status()))
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        unfollow()
        streams.discard(queue)
    return response


async def _close_streams(app: web.Application) -> None:
    streams: set[asyncio.Queue[Item]] = app[_STREAMS]
    for queue in list(streams):
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(END)


def setup(app: web.Application) -> None:
    """The streams' registry and their closing at shutdown; the route is in `table`."""
    app[_STREAMS] = set()
    app[_BASE] = time.time_ns() // 1000
    app.on_shutdown.append(_close_streams)

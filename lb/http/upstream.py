"""Connections to tasks: one HTTP/1.1 response parser each, kept alive in a pool per task.

An `UpstreamConnection` belongs to at most one client exchange at a time (its
`owner`); it parses the task's responses with llhttp and hands the owner each
event. Between exchanges it waits in the `Pool`, keyed by (address, port),
newest first, until `pool_idle_timeout`; anything a task sends while its
connection is idle is a protocol error and closes it.

A response to HEAD carries no body whatever its Content-Length says, which
llhttp cannot be told: the head's callback stops the parser instead, and a
fresh parser takes the next response.

A response is handed over as done only once the bytes of its read are all
parsed: a task that sends more after a response (an answer to a request it
thinks it was smuggled, say) has that connection closed, never pooled, so
those bytes can never be taken for the answer to the next request sent on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import httptools

from lb.http.budget import FdBudget
from lb.http.heads import ResponseHead, read_response


class Owner(Protocol):
    """What a client exchange offers the connection carrying its request."""

    def on_upstream_head(self, head: ResponseHead) -> None: ...
    def on_upstream_body(self, data: bytes) -> None: ...
    def on_upstream_done(self) -> None: ...
    def on_upstream_upgrade(self, rest: bytes) -> None: ...
    def on_upstream_failed(self, reason: str) -> None: ...
    def on_upstream_timeout(self) -> None: ...
    def upstream_paused(self, paused: bool) -> None: ...
    def batch(self) -> None: ...
    def flush(self) -> None: ...


def _not_connected(data: object) -> None:
    raise AssertionError("a write before the connection was made")


class _HeadDone(Exception):
    """Raised from the head callback of a HEAD response: the message ends there."""


class _Unsolicited(Exception):
    """Raised when a second response begins before another request was sent."""


Key = tuple[str, int]


class PoolSide(Protocol):
    """What a connection asks of its pool (`Pool` is one): typed as a Protocol, so that the
    compiled build (buildtools/mypyc_build.py) takes any object with these, as Python does."""

    upstream_timeout: float

    def now(self) -> float: ...
    def forget(self, conn: UpstreamConnection) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: PoolSide, key: Key) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.owner: Owner | None = None
        self.deadline = 0.0  # swept by the router; 0: none
        self.reusable = True
        self.head_request = False  # the request was HEAD: the response has no body
        self.close_delimited = False  # the response body ends when the task closes
        self.in_body = False
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._head_seen = False
        self._done = False
        self._feeding = False  # inside data_received: a finished response waits for its end
        self._finished: Owner | None = None  # whose response ended in the read being parsed
        #: the transport's own methods once connected: the request's bytes, with no call between
        self.write: Callable[[bytes], None] = _not_connected
        self.writelines: Callable[[Sequence[bytes]], None] = _not_connected

    # -- the exchange's side ------------------------------------------------------

    def begin(self, owner: Owner, head_request: bool, deadline: float) -> None:
        self.owner = owner
        self.head_request = head_request
        self.deadline = deadline
        self._done = False
        self._head_seen = False
        self.in_body = False
        self.close_delimited = False

    def pause_reading(self) -> None:
        """The client does not take more of the response yet."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        self.reusable = False
        self.owner = None
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, though they are ones in kind
        self.transport = cast(asyncio.Transport, transport)
        self.write = self.transport.write
        self.writelines = self.transport.writelines

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:  # a task talking on an idle connection: drop it
            self.close()
            return
        self.deadline = self.pool.now() + self.pool.upstream_timeout
        owner.batch()
        self._feeding = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.owner = None
            self.reusable = False
            owner.on_upstream_upgrade(data[upgrade.args[0] :])
        except httptools.HttpParserCallbackError as error:
            if isinstance(error.__context__, _HeadDone):
                self._parser = httptools.HttpResponseParser(self)
                # Bytes after the head would belong to no request: do not reuse then.
                self.reusable = self.reusable and data.endswith(b"\r\n\r\n")
                self.on_message_complete()
            elif isinstance(error.__context__, _Unsolicited):
                self.close()  # the response before it still ends, below
            else:
                self._fail(f"bad response: {error}")
        except httptools.HttpParserError as error:
            self._fail(f"bad response: {error}")
        finally:
            self._feeding = False
            finished, self._finished = self._finished, None
            try:
                if finished is not None:
                    # Now, not from inside the parser: handed back to the pool there,
                    # this connection could carry the next request while the rest of
                    # this read was still to be parsed as its answer.
                    finished.on_upstream_done()
            finally:
                owner.flush()

    def _fail(self, reason: str) -> None:
        owner = self.owner
        self.close()
        if owner is not None:
            owner.on_upstream_failed(reason)

    def on_message_begin(self) -> None:
        if self._done:  # the response was whole and no request has been sent since
            self.reusable = False
            raise _Unsolicited
        self._headers = []

    def on_status(self, reason: bytes) -> None:
        self._reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_seen:  # trailers of a chunked body are dropped
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        head = read_response(
            status, self._reason, self._headers, parser.get_http_version() == "1.1"
        )
        if status >= 200:
            self._head_seen = True
            no_body = self.head_request or status in (204, 304)
            self.close_delimited = (
                not no_body and head.content_length is None and not head.chunked and status != 101
            )
            self.in_body = not no_body
            if head.upstream_close or self.close_delimited:
                self.reusable = False
        owner = self.owner
        assert owner is not None
        owner.on_upstream_head(head)
        if self.head_request and status >= 200:
            raise _HeadDone

    def on_body(self, data: bytes) -> None:
        if self.owner is not None:
            self.owner.on_upstream_body(data)

    def on_message_complete(self) -> None:
        if not self._head_seen:
            return  # an interim (1xx) response; the real one follows
        self._done = True
        self.in_body = False
        owner = self.owner
        self.owner = None
        self.deadline = 0.0
        if owner is None:
            return
        if self._feeding:
            self._finished = owner
        else:
            owner.on_upstream_done()

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost finishes or fails the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.pool.forget(self)
        owner = self.owner
        if owner is None:
            return
        if self.close_delimited and self._head_seen and not self._done:
            self.on_message_complete()  # the close is the end of this body
        else:
            self.owner = None
            owner.on_upstream_failed(
                "connection closed by the task" if exc is None else f"connection lost: {exc}"
            )

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_paused(False)

    def on_deadline(self) -> None:
        owner = self.owner
        if owner is None:
            self.close()  # idle in the pool for too long
        else:
            self.owner = None
            self.close()
            owner.on_upstream_timeout()


class Pool:
    """Idle kept-alive connections per task, and the making of new ones."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        size: int,
        idle_timeout: float,
        upstream_timeout: float,
        budget: FdBudget | None = None,
    ) -> None:
        self._loop = loop
        #: an idle connection holds a descriptor of its own (one in use is its client's)
        self.budget = budget if budget is not None else FdBudget(1 << 30)
        self.size = size
        self.idle_timeout = idle_timeout
        self.upstream_timeout = upstream_timeout
        self.idle: dict[Key, list[UpstreamConnection]] = {}
        self.live: set[UpstreamConnection] = set()
        self.now = loop.time

    def acquire(self, key: Key) -> UpstreamConnection | None:
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()
            self.budget.give(1)
            if conn.reusable and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def open(self, key: Key) -> UpstreamConnection:
        _, conn = await self._loop.create_connection(
            lambda: UpstreamConnection(self, key), key[0], key[1]
        )
        self.live.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        idle = self.idle.get(conn.key)
        if idle is None:  # (not setdefault: that would make an empty list on every call)
            idle = self.idle[conn.key] = []
        if (
            not conn.reusable
            or len(idle) >= self.size
            or conn.transport is None
            or conn.transport.is_closing()
            or not self.budget.take(1)
        ):
            conn.close()
            return
        conn.owner = None
        conn.deadline = self.now() + self.idle_timeout
        idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self.live.discard(conn)
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            self.budget.give(1)
            if not idle:
                del self.idle[conn.key]

    def sweep(self, now: float) -> None:
        for conn in [c for c in self.live if c.deadline and c.deadline <= now]:
            conn.on_deadline()

    def close(self) -> None:
        for conn in list(self.live):
            with contextlib.suppress(Exception):
                conn.close()
        self.budget.give(sum(len(idle) for idle in self.idle.values()))
        self.idle.clear()

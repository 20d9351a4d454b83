"""The state of one client connection and the ways an exchange ends (base of `proxy`).

`ClientConnection` (proxy.py) is three layers: this one holds the state of the
connection and of the exchange being answered, the writes (batched per read,
so a small response leaves in one send), the reasons reading is paused, and
the endings (an answer from the router itself, a relayed answer finished,
close, abort); `forward.ForwardingConnection` sends a request to a task and
relays the answer; `proxy.ClientConnection` parses the client's bytes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING

import httptools

from lb.http.heads import BadRequest, RequestHead, local_response
from lb.http.routes import Endpoint, Match
from lb.http.stats import RouteStats
from lb.http.upstream import UpstreamConnection
from mesh.core.logs import event

if TYPE_CHECKING:
    from lb.http.router import Router

access_log = logging.getLogger("lb.http.access")

# Why reading from the client is paused (bits; reading resumes when none is left).
PIPELINED = 1  # a second request waits behind the one being answered
BUFFERED = 2  # body bytes wait for the task's connection
UPSTREAM_FULL = 4  # the task's connection does not take more yet
UPGRADING = 8  # an upgrade request waits for the task's 101

#: a second piece of a batch this small is joined to the first rather than sent by writelines
_JOIN_LIMIT = 4096


class Request:
    """A request as read so far; the head of the queue is the one being answered."""

    __slots__ = ("body", "buffered", "complete", "error", "head", "received")

    def __init__(self) -> None:
        self.head: RequestHead | None = None
        self.error: BadRequest | None = None
        self.body: list[bytes] = []
        self.buffered = 0
        self.received = 0
        self.complete = False


class ConnectionCore:
    def __init__(self, router: Router, proto: str = "http") -> None:
        self.r = router
        self._settings = router.settings  # bound once: read on every request
        self._clock = router.loop.time
        self.proto = proto
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.deadline = 0.0
        self.closed = False
        self._parser = httptools.HttpRequestParser(self)
        self._queue: collections.deque[Request] = collections.deque()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._pauses = 0
        self._broken = False  # no more requests are read (a parse error, an upgrade, EOF)
        self._upgrade_rest = b""
        # The exchange being answered (the head of the queue).
        self._req: Request | None = None
        self._match: Match | None = None
        self._route_stats: RouteStats | None = None
        self._endpoint: Endpoint | None = None
        self._tried: list[str] = []
        self._upstream: UpstreamConnection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._reused = False
        self._upstream_head = b""
        self._forwarding_for: tuple[str, bytes | None, bytes | None] | None = None
        self._forwarding = b""
        self._streaming = False  # the head went to the task: body bytes follow directly
        self._body_sent = False
        self._request_sent = False
        self._response_started = False
        self._response_chunked = False
        self._keep_alive = False
        self._status = 0
        self._set_cookie: bytes | None = None
        self._started = 0.0
        # The body's clock (RouterSettings.body_due): restarted when reading resumes
        # after the task would not take more, so that its slowness is not the client's.
        self._body_started = 0.0
        self._body_base = 0
        self._bytes_out = 0
        self._out: list[bytes] | None = None  # writes held back while a batch runs

    # -- connection ---------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pause_reading()
        self._pauses |= reason

    def _resume(self, reason: int) -> None:
        if self._pauses & reason:
            self._pauses &= ~reason
            if not self._pauses and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def _local(self, status: int, message: str, *, close: bool = False,
               extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """Answer the current request from the router itself."""
        req = self._req
        assert req is not None
        head = req.head
        keep = (not close and req.complete and not self._broken and head is not None
                and head.keep_alive)
        self._write(local_response(status, message, keep_alive=keep,
                                   head_only=head is not None and head.method == b"HEAD",
                                   extra=extra))
        self._finish(status, keep)

    def _log_access(self, status: int, elapsed: float) -> None:
        req = self._req
        head = req.head if req is not None else None
        endpoint = self._endpoint
        event(access_log, "http_request", client=self.peer_ip, proto=self.proto,
              method=head.method.decode("latin-1") if head else "-",
              host=head.host if head else "-", path=head.path if head else "-",
              status=status, bytes=self._bytes_out, ms=round(elapsed * 1000, 3),
              service=self._match.route.service if self._match else "-",
              task=endpoint.task_id if endpoint else "-",
              upstream=f"{endpoint.address}:{endpoint.port}" if endpoint else "-")

    def _record(self, status: int) -> None:
        """Count the exchange (and log it): once per request, however it ended."""
        elapsed = self._clock() - self._started
        self.r.stats.requests += 1
        route_stats = self._route_stats
        if route_stats is not None:  # RouteStats.record, inline: this runs per request
            route_stats.by_class[min(status // 100, 5)] += 1
            route_stats.latency_sum += elapsed
            route_stats.latency_count += 1
        if self._settings.access_log:
            self._log_access(status, elapsed)

    def _finish(self, status: int, keep_alive: bool) -> None:
        self._record(status)
        # The exchange's state, reset for the next request.
        self._req = None
        self._match = None
        self._route_stats = None
        self._endpoint = None
        self._upstream = None
        self._streaming = False
        self._body_sent = False
        self._request_sent = False
        self._response_started = False
        self._response_chunked = False
        self._keep_alive = False
        self._set_cookie = None
        self._bytes_out = 0
        queue = self._queue
        if queue:
            queue.popleft()
        if not keep_alive or self.closed:
            self._close()
            return
        if queue:
            if len(queue) == 1:
                self._resume(PIPELINED)
            following = queue[0]
            head = following.head
            if following.complete or following.error is not None or (
                    head is not None and (head.has_body or head.upgrade is not None)):
                self._start(following)
            else:
                self.deadline = self.r.now + self._settings.header_timeout
        else:
            self.deadline = self.r.now + self._settings.keepalive_timeout
            if self._pauses:
                self._resume(PIPELINED | BUFFERED | UPSTREAM_FULL)

    def _start_body_clock(self, req: Request) -> None:
        now = self._body_started = self._clock()  # exact: `r.now` lags by up to a tick
        self._body_base = req.received
        self.deadline = self._settings.body_due(now, 0, now)

    def _drop_upstream(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.close()

    def batch(self) -> None:
        """Collect writes until `flush`: a small response goes out in one send, not three."""
        self._out = []

    def flush(self) -> None:
        out, self._out = self._out, None
        if out and self.transport is not None and not self.closed:
            if len(out) == 1:
                self.transport.write(out[0])
            elif len(out) == 2 and len(out[1]) <= _JOIN_LIMIT:
                # A head and a small body: uvloop's write of one joined buffer costs
                # ~0.15 us less than writelines of two (both are one send).
                self.transport.write(out[0] + out[1])
            else:
                self.transport.writelines(out)

    def _write(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def _close(self) -> None:
        self._broken = True  # whatever the parser still holds is not answered
        self.flush()
        self._drop_upstream()
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        """End a response midway: the client must see it was cut, not a short body."""
        self._drop_upstream()
        if self.transport is not None:
            self.transport.abort()

    def _start(self, req: Request) -> None:
        raise NotImplementedError  # forward.ForwardingConnection answers a request

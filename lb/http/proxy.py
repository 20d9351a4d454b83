"""One client connection of the router: parse requests, route them, relay the responses.

Everything runs in protocol callbacks (no task per request): llhttp parses
the client's bytes; a request head is checked (`heads.read_request`), routed
(`RouteTable.match`), given a task (`Balancer.pick`) and a pooled connection
to it, and its body is streamed as it arrives. The task's response comes back
through `UpstreamConnection` and is streamed to the client. Bodies are never
held whole: when one side cannot take more, the other side stops reading.

Pipelined requests are queued (their bytes are at most one read ahead, since
reading pauses while a second request waits) and answered in order. After a
101 both connections become a raw pipe (`pipe.splice`).

Deadlines (header read, body read, keep-alive idle) are plain numbers swept
by the router's ticker, so a request allocates no timer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, cast

import httptools

from lb.http.heads import (
    IDEMPOTENT,
    BadRequest,
    RequestHead,
    ResponseHead,
    client_response,
    cookie_value,
    local_response,
    read_request,
    strip_prefix,
    upstream_request,
)
from lb.http.pipe import splice
from lb.http.routes import Endpoint, Match
from lb.http.stats import RouteStats
from lb.http.upstream import UpstreamConnection
from mesh.logs import event

if TYPE_CHECKING:
    from lb.http.router import Router

log = logging.getLogger(__name__)
access_log = logging.getLogger("lb.http.access")

# Why reading from the client is paused (bits; reading resumes when none is left).
_PIPELINED = 1  # a second request waits behind the one being answered
_BUFFERED = 2  # body bytes wait for the task's connection
_UPSTREAM_FULL = 4  # the task's connection does not take more yet
_UPGRADING = 8  # an upgrade request waits for the task's 101

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Request:
    __slots__ = ("body", "buffered", "complete", "error", "head", "received")

    def __init__(self) -> None:
        self.head: RequestHead | None = None
        self.error: BadRequest | None = None
        self.body: list[bytes] = []
        self.buffered = 0
        self.received = 0
        self.complete = False


class ClientConnection(asyncio.Protocol):
    def __init__(self, router: Router, proto: str = "http") -> None:
        self.r = router
        self.proto = proto
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.deadline = 0.0
        self.closed = False
        self._parser = httptools.HttpRequestParser(self)
        self._queue: collections.deque[_Request] = collections.deque()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._pauses = 0
        self._broken = False  # no more requests are read (a parse error, an upgrade, EOF)
        self._upgrade_rest = b""
        # The exchange being answered (the head of the queue).
        self._req: _Request | None = None
        self._match: Match | None = None
        self._route_stats: RouteStats | None = None
        self._endpoint: Endpoint | None = None
        self._tried: list[str] = []
        self._upstream: UpstreamConnection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._reused = False
        self._upstream_head = b""
        self._streaming = False  # the head went to the task: body bytes follow directly
        self._body_sent = False
        self._request_sent = False
        self._response_started = False
        self._response_chunked = False
        self._keep_alive = False
        self._status = 0
        self._set_cookie: bytes | None = None
        self._started = 0.0
        self._bytes_out = 0
        self._out: list[bytes] | None = None  # writes held back while a batch runs

    # -- connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, though they are ones in kind
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else ""
        self.deadline = self.r.now + self.r.settings.header_timeout
        self.r.conns.add(self)
        stats = self.r.stats
        stats.connections_open += 1
        stats.connections_total += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.r.conns.discard(self)
        self.r.stats.connections_open -= 1
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.close()

    def eof_received(self) -> bool | None:
        self._broken = True
        req = self._req
        if req is not None and req.complete:
            return True  # a half-close after a whole request: still answer it
        return None

    def pause_writing(self) -> None:
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()

    def _pause(self, reason: int) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pause_reading()
        self._pauses |= reason

    def _resume(self, reason: int) -> None:
        if self._pauses & reason:
            self._pauses &= ~reason
            if not self._pauses and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._broken:
            if self._pauses & _UPGRADING:
                self._upgrade_rest += data  # early bytes of the upgraded protocol
            return
        self._out = []  # local answers of this read go out in one send
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._broken = True
            self._upgrade_rest = data[upgrade.args[0]:]
            self._pause(_UPGRADING)
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, BadRequest):
                self._parse_failed(cause.status, cause.reason)
            else:
                event(log, "http_internal_error", logging.ERROR, error=repr(cause))
                self._parse_failed(500, "internal error")
        except httptools.HttpParserError as error:
            self._parse_failed(400, str(error))
        finally:
            self.flush()

    def _parse_failed(self, status: int, reason: str) -> None:
        if self._broken:
            return  # the connection is being closed already
        self._broken = True
        self.r.stats.reject(status)
        if self.transport is not None:
            self.transport.pause_reading()
        req = self._queue[-1] if self._queue else None
        if req is None:
            self._write(local_response(status, reason, keep_alive=False))
            self._close()
        elif req is self._req:
            if self._response_started:
                self._abort()
            else:
                self._drop_upstream()
                self._local(status, reason, close=True)
        else:
            req.error = BadRequest(status, reason)
            req.complete = True
            if self._req is None:
                self._start(req)

    # -- llhttp callbacks (requests) ---------------------------------------------

    def on_message_begin(self) -> None:
        if self._broken:
            raise BadRequest(400, "no more requests on this connection")
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._queue.append(_Request())
        if len(self._queue) > 1:
            self._pause(_PIPELINED)
        elif self._req is None:
            # The header timeout runs from a request's first byte (and from accept).
            self.deadline = self.r.now + self.r.settings.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self.r.settings.max_head:
            raise BadRequest(414 if len(self._url) > self.r.settings.max_head else 431,
                             "request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.r.settings.max_head:
            raise BadRequest(431, "request head too large")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._broken:
            return
        req = self._queue[-1]
        parser = self._parser
        try:
            head = req.head = read_request(parser.get_method(), self._url,
                                           parser.get_http_version(), self._headers,
                                           parser.should_keep_alive())
            limit = self.r.settings.max_body
            if limit and head.content_length is not None and head.content_length > limit:
                raise BadRequest(413, f"request body over {limit} bytes")
        except BadRequest as error:
            req.error = error
            self.r.stats.reject(error.status)
        # A request without a body is answered once whole (so that an answer from the
        # router keeps the connection); one with a body starts now, to stream it.
        streams = req.error is not None or (req.head is not None and (
            req.head.has_body or req.head.upgrade is not None))
        if streams and self._req is None and req is self._queue[0]:
            self._start(req)

    def on_body(self, data: bytes) -> None:
        if self._broken:
            return
        req = self._queue[-1]
        if req.error is not None:
            return
        req.received += len(data)
        limit = self.r.settings.max_body
        if limit and req.received > limit:
            raise BadRequest(413, f"request body over {limit} bytes")
        if req is self._req:
            self.deadline = self.r.now + self.r.settings.body_timeout
            if self._streaming:
                self._send_body(data)
                return
        req.body.append(data)
        req.buffered += len(data)
        if req.buffered > self.r.settings.buffer_limit:
            self._pause(_BUFFERED)

    def on_message_complete(self) -> None:
        if self._broken:
            return
        req = self._queue[-1]
        req.complete = True
        if req is self._req:
            self.deadline = 0.0
            if self._streaming:
                self._end_body()
        elif self._req is None and req is self._queue[0]:
            self._start(req)

    # -- answering ----------------------------------------------------------------

    def _start(self, req: _Request) -> None:
        self._req = req
        self._started = self.r.loop.time()
        self.deadline = 0.0 if req.complete else self.r.now + self.r.settings.body_timeout
        head = req.head
        if req.error is not None or head is None:
            error = req.error or BadRequest(400, "bad request")
            self._local(error.status, error.reason, close=True)
            return
        match = self.r.table.match(head.host, head.path)
        if match is None:
            self.r.stats.no_route += 1
            self._local(404, "no service is routed for this host")
            return
        route = match.route
        self._match = match
        self._route_stats = stats = self.r.balancer.stats(route)
        if route.redirect:
            location = route.redirect.rstrip("/").encode("latin-1") + head.target
            self._local(301, f"moved to {route.redirect}", extra=[(b"Location", location)])
            return
        sticky = None
        if route.sticky_cookie:
            sticky = cookie_value(head.cookies, route.sticky_cookie.encode("latin-1"))
        endpoint = self.r.balancer.pick(match, sticky, stats=stats) if match.endpoints else None
        if endpoint is None:
            self.r.stats.no_endpoint += 1
            self._local(503, "no healthy task serves this route")
            return
        target = strip_prefix(head.target, route.path_prefix) if route.strip_prefix \
            else head.target
        self._upstream_head = upstream_request(head, target, self.peer_ip, self.proto)
        self._tried = [endpoint.task_id]
        self._connect(endpoint)

    def _connect(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        conn = self.r.pool.acquire((endpoint.address, endpoint.port))
        if conn is not None:
            self._attach(conn, reused=True)
        else:
            self._connecting = self.r.loop.create_task(self._open(endpoint))

    async def _open(self, endpoint: Endpoint) -> None:
        timed_out = False
        try:
            conn = await asyncio.wait_for(self.r.pool.open((endpoint.address, endpoint.port)),
                                          self.r.settings.connect_timeout)
        except TimeoutError:
            timed_out = True
        except OSError as error:
            event(log, "http_connect_failed", logging.WARNING, task=endpoint.task_id,
                  address=f"{endpoint.address}:{endpoint.port}", error=error.strerror or error)
        else:
            self._connecting = None
            if self.closed or self._req is None:
                self.r.pool.release(conn)
            else:
                self._attach(conn, reused=False)
            return
        self._connecting = None
        if timed_out:
            event(log, "http_connect_timeout", logging.WARNING, task=endpoint.task_id,
                  address=f"{endpoint.address}:{endpoint.port}")
        if not self.closed and self._req is not None:
            self.r.stats.connect_failures += 1
            self.r.balancer.connect_failed(endpoint.task_id)
            if not self._retry():
                if timed_out:
                    self.r.stats.upstream_timeouts += 1
                self._local(504 if timed_out else 502,
                            "the task did not answer in time" if timed_out
                            else "could not connect to any task of the service",
                            close=not self._req.complete)

    def _retry(self, exclude: bool = True) -> bool:
        """Send the request to another task (or again, over a fresh connection)."""
        assert self._match is not None
        endpoint = self.r.balancer.pick(self._match, exclude=self._tried if exclude else ())
        if endpoint is None:
            return False
        self._tried.append(endpoint.task_id)
        self.r.stats.retries += 1
        if self._route_stats is not None:
            self._route_stats.retries += 1
        self._connect(endpoint)
        return True

    def _attach(self, conn: UpstreamConnection, reused: bool) -> None:
        req = self._req
        assert req is not None and req.head is not None and self._endpoint is not None
        head = req.head
        self._upstream = conn
        self._reused = reused
        route = self._match.route if self._match is not None else None
        if route is not None and route.sticky_cookie:
            sticky = cookie_value(head.cookies, route.sticky_cookie.encode("latin-1"))
            task = self._endpoint.task_id
            self._set_cookie = None if sticky == task else (
                f"{route.sticky_cookie}={task}; Path=/; HttpOnly".encode("latin-1"))
        conn.begin(self, head.method == b"HEAD", self.r.now + self.r.settings.upstream_timeout)
        conn.write(self._upstream_head)
        self._streaming = True
        if head.expect_continue and not req.complete and not req.body:
            self._write(_CONTINUE)
        if req.body:
            for chunk in req.body:
                self._send_body(chunk)
            req.body.clear()
            req.buffered = 0
            self._resume(_BUFFERED)
        if req.complete:
            self._end_body()

    def _send_body(self, data: bytes) -> None:
        conn = self._upstream
        assert conn is not None and conn.transport is not None and self._req is not None
        self._body_sent = True
        conn.deadline = self.r.now + self.r.settings.upstream_timeout
        if self._req.head is not None and self._req.head.chunked:
            conn.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            conn.transport.write(data)

    def _end_body(self) -> None:
        assert self._req is not None and self._req.head is not None
        if self._req.head.chunked and self._upstream is not None:
            self._upstream.write(b"0\r\n\r\n")
        self._request_sent = True

    # -- the task's side (UpstreamConnection calls these) ---------------------------

    def on_upstream_head(self, head: ResponseHead) -> None:
        req = self._req
        assert req is not None and req.head is not None
        rhead = req.head
        status = head.status
        if status < 200 and status != 101:  # interim: 103 passes, our own 100 went already
            if rhead.http11 and status != 100:
                self._write(client_response(head, chunked=False, keep_alive=True,
                                            http11=True))
            return
        if status == 101 and rhead.upgrade is None:
            raise BadRequest(502, "the task switched protocols unasked")
        self._response_started = True
        self._status = status
        no_body = rhead.method == b"HEAD" or status in (204, 304) or status == 101
        keep = rhead.keep_alive and not self._broken
        if no_body or head.content_length is not None:
            chunked = False
        elif rhead.http11:
            chunked = True
        else:
            chunked = False
            keep = False  # an HTTP/1.0 client learns the end of the body from the close
        self._response_chunked = chunked
        self._keep_alive = keep
        extra = None if self._set_cookie is None else [(b"Set-Cookie", self._set_cookie)]
        self._write(client_response(head, chunked=chunked, keep_alive=keep,
                                    http11=rhead.http11, extra=extra))

    def on_upstream_body(self, data: bytes) -> None:
        self._bytes_out += len(data)
        if self._response_chunked:
            self._write(b"%x\r\n" % len(data))
            self._write(data)
            self._write(b"\r\n")
        else:
            self._write(data)

    def on_upstream_done(self) -> None:
        conn, self._upstream = self._upstream, None
        req = self._req
        assert req is not None
        if self._response_chunked:
            self._write(b"0\r\n\r\n")
        if conn is not None:
            if conn.reusable and req.complete and self._request_sent:
                self.r.pool.release(conn)
            else:
                conn.close()
        self._finish(self._status, self._keep_alive and req.complete)

    def on_upstream_failed(self, reason: str) -> None:
        self._upstream = None
        req = self._req
        if req is None or self.closed:
            return
        if self._response_started:
            event(log, "http_upstream_lost", logging.WARNING, reason=reason,
                  task=self._endpoint.task_id if self._endpoint else "")
            self._abort()
            return
        assert req.head is not None
        may_repeat = req.head.method in IDEMPOTENT and not req.head.has_body
        if may_repeat and self._retry(exclude=not self._reused):
            return
        self._local(502, f"the task failed: {reason}", close=not req.complete)

    def on_upstream_timeout(self) -> None:
        self._upstream = None
        req = self._req
        if req is None or self.closed:
            return
        self.r.stats.upstream_timeouts += 1
        if self._response_started:
            self._abort()
        else:
            self._local(504, "the task did not answer in time", close=not req.complete)

    def on_upstream_upgrade(self, rest: bytes) -> None:
        conn, self._upstream = self._upstream, None
        assert conn is not None and conn.transport is not None
        assert self.transport is not None
        self.flush()  # the 101 head, before the pipe's first bytes
        self.r.stats.upgrades += 1
        self.r.pool.forget(conn)
        self._record(101)
        self.r.conns.discard(self)
        self.closed = True  # this protocol is done; the pipe owns both transports
        self.r.stats.connections_open -= 1
        splice(self.transport, conn.transport, left_pending=self._upgrade_rest,
               right_pending=rest)

    def upstream_paused(self, paused: bool) -> None:
        if paused:
            self._pause(_UPSTREAM_FULL)
        else:
            self._resume(_UPSTREAM_FULL)

    # -- ends of an exchange --------------------------------------------------------

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

    def _record(self, status: int) -> None:
        elapsed = self.r.loop.time() - self._started
        self.r.stats.requests += 1
        if self._route_stats is not None:
            self._route_stats.record(status, elapsed)
        if self.r.settings.access_log:
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

    def _finish(self, status: int, keep_alive: bool) -> None:
        self._record(status)
        self._reset_exchange()
        if self._queue:
            self._queue.popleft()
        if not keep_alive or self.closed:
            self._close()
            return
        if self._queue:
            if len(self._queue) == 1:
                self._resume(_PIPELINED)
            following = self._queue[0]
            head = following.head
            if following.complete or following.error is not None or (
                    head is not None and (head.has_body or head.upgrade is not None)):
                self._start(following)
            else:
                self.deadline = self.r.now + self.r.settings.header_timeout
        else:
            self.deadline = self.r.now + self.r.settings.keepalive_timeout
            self._resume(_PIPELINED | _BUFFERED | _UPSTREAM_FULL)

    def _reset_exchange(self) -> None:
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

    def on_deadline(self) -> None:
        """A timeout passed: header read (408), body read (408) or keep-alive idle (close)."""
        self.deadline = 0.0
        if self._response_started:
            self._abort()
            return
        waiting = self._req is not None or bool(self._queue)
        if not waiting:
            self._close()  # idle between requests: nothing to say
            return
        self.r.stats.reject(408)
        self._broken = True
        self._drop_upstream()
        self._write(local_response(408, "the request took too long to arrive",
                                   keep_alive=False))
        self._close()

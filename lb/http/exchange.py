"""The HTTP/1.1 exchange of one client connection, without I/O (sans-IO).

Bytes in, actions out: `receive(data)` feeds the client's bytes to llhttp
(httptools); each request head is checked (`heads.read_request`), routed
(`decision.decide`, a pure function of the head and the route table), given a
task (`Balancer.pick`) and its body is streamed as it arrives. What must
happen outside is asked of two injected sides, both plain Protocols:

- `ClientSide`, the client's byte stream (write, close, abort, pause and
  resume reading): in production the asyncio transport itself, in the unit
  tests a list of what was asked;
- `Shell`, what needs sockets: `acquire(key)` (an idle pooled connection to a
  task, or None), `connect(endpoint)` (a new one; the answer comes back as
  `upstream_attached`, `connect_failed` or `fd_shortage`), `release(upstream)`
  back to the pool, `cancel_connect()`
  and `upgrade(upstream, client_rest, upstream_rest)` to splice both after 101.

The task's response comes back through the `Upstream` connection (which
parses it) as `on_upstream_*` calls and is relayed with the framing the client
can read. Pipelined requests are queued (their bytes are at most one read
ahead, since reading pauses while a second request waits) and answered in
order. Time is `Shared.now` (refreshed by the router's ticker) and
`Shared.clock`: deadlines (header read, body read, keep-alive idle) are plain
numbers that the shell's ticker compares, calling `on_deadline`, so a request
arms no timer.

Per request the work is countable: one llhttp feed, one `read_request`, one
`decide`, one `Balancer.pick`, one upstream head built (the forwarding headers
are reused while the client's facts stay the same), one write each way.
"""

from __future__ import annotations

import collections
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Protocol

import httptools

from lb.accesslog import AccessLog
from lb.http.balance import Balancer
from lb.http.budget import FdBudget
from lb.http.decision import Answer, decide
from lb.http.heads import (
    IDEMPOTENT,
    BadRequest,
    RequestHead,
    ResponseHead,
    client_response,
    forwarding_headers,
    local_response,
    read_request,
    upstream_request,
)
from lb.http.routes import Endpoint, Match, RouteTable
from lb.http.settings import RouterSettings
from lb.http.stats import LATENCY_BOUNDS, RouterStats, RouteStats
from mesh.core.logs import event

log = logging.getLogger("lb.http.proxy")
access_log = logging.getLogger("lb.http.access")

# Why reading from the client is paused (bits; reading resumes when none is left).
PIPELINED = 1  # a second request waits behind the one being answered
BUFFERED = 2  # body bytes wait for the task's connection
UPSTREAM_FULL = 4  # the task's connection does not take more yet
UPGRADING = 8  # an upgrade request waits for the task's 101

#: a second piece of a batch this small is joined to the first rather than sent by writelines
_JOIN_LIMIT = 4096

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientSide(Protocol):
    """The client's byte stream (an asyncio transport is one)."""

    def write(self, data: bytes) -> None: ...
    def writelines(self, data: Sequence[bytes]) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Upstream(Protocol):
    """A connection to a task carrying one exchange's request (`upstream.UpstreamConnection`)."""

    reusable: bool
    deadline: float
    write: Callable[[bytes], None]
    writelines: Callable[[Sequence[bytes]], None]

    def begin(self, owner: Exchange, head_request: bool, deadline: float) -> None: ...
    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Shell(Protocol):
    """What the exchange asks of the I/O around it."""

    def acquire(self, key: tuple[str, int]) -> Upstream | None: ...
    def connect(self, endpoint: Endpoint) -> None: ...
    def cancel_connect(self) -> None: ...
    def release(self, upstream: Upstream) -> None: ...
    def upgrade(self, upstream: Upstream, client_rest: bytes, upstream_rest: bytes) -> None: ...


class Shared:
    """What every exchange of one router reads and counts: the table, the balancer, the stats."""

    __slots__ = ("access", "balancer", "budget", "clock", "now", "settings", "stats", "table")

    def __init__(
        self,
        table: RouteTable,
        settings: RouterSettings,
        clock: Callable[[], float],
        balancer: Balancer,
        stats: RouterStats,
        budget: FdBudget,
        access: AccessLog | None = None,
    ) -> None:
        self.table = table
        self.settings = settings
        self.clock = clock
        self.now = clock()  # refreshed by the ticker: coarse, and free to read
        self.balancer = balancer
        self.stats = stats
        self.budget = budget
        #: the access log, when on (its rate above 0)
        self.access = access if access is not None and access.enabled else None


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


class Exchange:
    """One client connection's requests, answered in order (llhttp's callbacks are here)."""

    def __init__(
        self,
        shared: Shared,
        shell: Shell,
        client: ClientSide,
        peer_ip: str = "",
        proto: str = "http",
    ) -> None:
        self.shared = shared
        self.shell = shell
        self.client = client
        self.peer_ip = peer_ip
        self.proto = proto
        self._settings = shared.settings  # bound once: read on every request
        self._clock = shared.clock
        self.deadline = 0.0
        self.closed = False  # the client's connection is gone (or handed to a pipe)
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
        self.upstream: Upstream | None = None
        self._connecting = False
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
        self._sticky: str | None = None  # the task the route's sticky cookie named
        self._started = 0.0
        # The body's clock (RouterSettings.body_due): restarted when reading resumes
        # after the task would not take more, so that its slowness is not the client's.
        self._body_started = 0.0
        self._body_base = 0
        self._bytes_out = 0
        self._out: list[bytes] | None = None  # writes held back while a batch runs

    # -- the client's side (the shell calls these) ------------------------------------

    def opened(self) -> None:
        """The connection is accepted: the header timeout runs from now."""
        self.deadline = self.shared.now + self._settings.header_timeout

    @property
    def waiting(self) -> bool:
        """A request is being answered (an upstream connection made now is wanted)."""
        return not self.closed and self._req is not None

    def receive(self, data: bytes) -> None:
        """Bytes from the client."""
        if self._broken:
            if self._pauses & UPGRADING:
                self._upgrade_rest += data  # early bytes of the upgraded protocol
            return
        # Local answers of this read go out in one send. (Through `batch`: assigned here,
        # `_out` would be narrowed to a list for the rest of the method, and the compiled
        # build would check it is one in `finally`, where `flush` may have made it None.)
        self.batch()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            req = self._queue[-1] if self._queue else None
            if req is not None and req.error is None and req.head is not None and req.head.has_body:
                # llhttp skipped this body as the new protocol's bytes: never forward
                # its head (`read_request` refuses an upgrade with a body; this holds
                # should llhttp read an upgrade where `read_request` did not)
                self._parse_failed(400, "an upgrade request with a body")
                return
            self._broken = True
            self._upgrade_rest = data[upgrade.args[0] :]
            self._pause(UPGRADING)
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
            if self._out:
                self.flush()
            else:
                self._out = None  # (a forwarded request went straight to the task)

    def eof(self) -> bool:
        """The client half-closed; True: keep the connection to answer a whole request."""
        self._broken = True
        req = self._req
        return req is not None and req.complete

    def lost(self) -> None:
        """The client's connection is gone."""
        self.closed = True
        self._broken = True
        self._drop_upstream()

    def on_deadline(self) -> None:
        """A timeout passed: header read (408), body read (408: stalled, past its deadline
        or below its minimum rate) or keep-alive idle (close)."""
        self.deadline = 0.0
        if self._response_started:
            self._abort()
            return
        waiting = self._req is not None or bool(self._queue)
        if not waiting:
            self._close()  # idle between requests: nothing to say
            return
        stats = self.shared.stats
        stats.reject(408)
        req = self._req
        if req is not None and req.head is not None and not req.complete:
            stats.slow_bodies += 1
        self._broken = True
        self._drop_upstream()
        self._write(local_response(408, "the request took too long to arrive", keep_alive=False))
        self._close()

    def _parse_failed(self, status: int, reason: str) -> None:
        if self._broken:
            return  # the connection is being closed already
        self._broken = True
        self.shared.stats.reject(status)
        if not self.closed:
            self.client.pause_reading()
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

    # -- llhttp callbacks (requests) ----------------------------------------------------

    def on_message_begin(self) -> None:
        if self._broken:
            raise BadRequest(400, "no more requests on this connection")
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._queue.append(Request())
        if len(self._queue) > 1:
            self._pause(PIPELINED)
        elif self._req is None:
            # The header timeout runs from a request's first byte (and from accept).
            self.deadline = self.shared.now + self._settings.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self._settings.max_head:
            raise BadRequest(
                414 if len(self._url) > self._settings.max_head else 431, "request head too large"
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._settings.max_head:
            raise BadRequest(431, "request head too large")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._broken:
            return
        req = self._queue[-1]
        parser = self._parser
        try:
            head = req.head = read_request(
                parser.get_method(),
                self._url,
                parser.get_http_version(),
                self._headers,
                parser.should_keep_alive(),
            )
            limit = self._settings.max_body
            if limit and head.content_length is not None and head.content_length > limit:
                raise BadRequest(413, f"request body over {limit} bytes")
        except BadRequest as error:
            req.error = error
            self.shared.stats.reject(error.status)
        # A request without a body is answered once whole (so that an answer from the
        # router keeps the connection); one with a body starts now, to stream it.
        streams = req.error is not None or (
            req.head is not None and (req.head.has_body or req.head.upgrade is not None)
        )
        if streams and self._req is None and req is self._queue[0]:
            self._start(req)

    def on_body(self, data: bytes) -> None:
        if self._broken:
            return
        req = self._queue[-1]
        if req.error is not None:
            return
        req.received += len(data)
        limit = self._settings.max_body
        if limit and req.received > limit:
            raise BadRequest(413, f"request body over {limit} bytes")
        if req is self._req:
            if not self._pauses & UPSTREAM_FULL:  # (else the clock restarts on resume)
                self.deadline = self._settings.body_due(
                    self._body_started, req.received - self._body_base, self.shared.now
                )
            if self._streaming:
                self._send_body(data)
                return
        req.body.append(data)
        req.buffered += len(data)
        if req.buffered > self._settings.buffer_limit:
            self._pause(BUFFERED)

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

    # -- to a task --------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        self._req = req
        self._started = self._clock()
        if req.complete:
            self.deadline = 0.0
        else:
            self._start_body_clock(req)
        head = req.head
        if req.error is not None or head is None:
            error = req.error or BadRequest(400, "bad request")
            self._local(error.status, error.reason, close=True)
            return
        shared = self.shared
        decision = decide(head, shared.table)
        if isinstance(decision, Answer):
            if decision.match is None:
                shared.stats.no_route += 1
            else:
                self._match = decision.match
                self._route_stats = shared.balancer.stats(decision.match.route)
            self._local(decision.status, decision.reason, extra=decision.extra)
            return
        match, target, sticky = decision
        self._match = match
        self._route_stats = stats = shared.balancer.stats(match.route)
        endpoint = shared.balancer.pick(match, sticky, (), stats) if match.endpoints else None
        if endpoint is None:
            shared.stats.no_endpoint += 1
            self._local(503, "no healthy task serves this route")
            return
        self._sticky = sticky
        facts = (head.host, head.forwarded_for, head.forwarded)
        if facts != self._forwarding_for:  # the same on most requests of a connection
            self._forwarding_for = facts
            self._forwarding = forwarding_headers(head, self.peer_ip, self.proto)
        self._upstream_head = upstream_request(head, target, self._forwarding)
        self._tried = [endpoint.task_id]
        self._connect(endpoint)

    def _connect(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        conn = self.shell.acquire((endpoint.address, endpoint.port))
        if conn is not None:
            self.upstream_attached(conn, reused=True)
        else:
            self._connecting = True
            self.shell.connect(endpoint)  # -> upstream_attached, connect_failed or fd_shortage

    def connect_failed(self, timed_out: bool) -> None:
        """The shell could not connect to the endpoint asked for (refused or timed out)."""
        self._connecting = False
        if self.closed or self._req is None or self._endpoint is None:
            return
        shared = self.shared
        shared.stats.connect_failures += 1
        shared.balancer.connect_failed(self._endpoint.task_id)
        if not self._retry():
            if timed_out:
                shared.stats.upstream_timeouts += 1
            self._local(
                504 if timed_out else 502,
                "the task did not answer in time"
                if timed_out
                else "could not connect to any task of the service",
                close=not self._req.complete,
            )

    def fd_shortage(self) -> None:
        """The router could not make a socket: its own trouble, not the task's.

        No ejection and no retry (another task would fail the same way): 503,
        counted apart from connect failures, without a log line per request.
        """
        self._connecting = False
        self.shared.stats.fd_shortage += 1
        if not self.closed and self._req is not None:
            self._local(503, "the router is out of file descriptors", close=not self._req.complete)

    def _retry(self, exclude: bool = True) -> bool:
        """Send the request to another task (or again, over a fresh connection)."""
        assert self._match is not None
        endpoint = self.shared.balancer.pick(self._match, exclude=self._tried if exclude else ())
        if endpoint is None:
            return False
        self._tried.append(endpoint.task_id)
        self.shared.stats.retries += 1
        if self._route_stats is not None:
            self._route_stats.retries += 1
        self._connect(endpoint)
        return True

    def upstream_attached(self, conn: Upstream, reused: bool) -> None:
        """The connection to the endpoint asked for: send the request on it."""
        self._connecting = False
        req = self._req
        assert req is not None and req.head is not None and self._endpoint is not None
        head = req.head
        self.upstream = conn
        self._reused = reused
        route = self._match.route if self._match is not None else None
        if route is not None and route.sticky_cookie:  # (the task tried last sets it)
            task = self._endpoint.task_id
            self._set_cookie = (
                None
                if self._sticky == task
                else (f"{route.sticky_cookie}={task}; Path=/; HttpOnly".encode("latin-1"))
            )
        conn.begin(self, head.method == b"HEAD", self.shared.now + self._settings.upstream_timeout)
        self._streaming = True
        if req.complete and not req.body and not head.chunked:  # the common case: one send
            conn.write(self._upstream_head)
            self._request_sent = True
            return
        conn.write(self._upstream_head)
        if head.expect_continue and not req.complete and not req.body:
            self._write(_CONTINUE)
        if req.body:
            for chunk in req.body:
                self._send_body(chunk)
            req.body.clear()
            req.buffered = 0
            self._resume(BUFFERED)
        if req.complete:
            self._end_body()

    def _send_body(self, data: bytes) -> None:
        conn = self.upstream
        assert conn is not None and self._req is not None
        self._body_sent = True
        conn.deadline = self.shared.now + self._settings.upstream_timeout
        if self._req.head is not None and self._req.head.chunked:
            conn.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            conn.write(data)

    def _end_body(self) -> None:
        assert self._req is not None and self._req.head is not None
        if self._req.head.chunked and self.upstream is not None:
            self.upstream.write(b"0\r\n\r\n")
        self._request_sent = True

    # -- the task's side (the Upstream connection calls these) -----------------------

    def on_upstream_head(self, head: ResponseHead) -> None:
        req = self._req
        assert req is not None and req.head is not None
        rhead = req.head
        status = head.status
        if status < 200 and status != 101:  # interim: 103 passes, our own 100 went already
            if rhead.http11 and status != 100:
                self._write(client_response(head, chunked=False, keep_alive=True, http11=True))
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
        self._write(client_response(head, chunked, keep, rhead.http11, extra))

    def on_upstream_body(self, data: bytes) -> None:
        self._bytes_out += len(data)
        out = self._out
        if out is not None and not self._response_chunked:  # the common case, inline
            out.append(data)
        elif self._response_chunked:
            self._write(b"%x\r\n" % len(data))
            self._write(data)
            self._write(b"\r\n")
        else:
            self._write(data)

    def on_upstream_done(self) -> None:
        conn, self.upstream = self.upstream, None
        req = self._req
        assert req is not None
        if self._response_chunked:
            self._write(b"0\r\n\r\n")
        if conn is not None:
            if conn.reusable and req.complete and self._request_sent:
                self.shell.release(conn)
            else:
                conn.close()
        self._finish(self._status, self._keep_alive and req.complete)

    def on_upstream_failed(self, reason: str) -> None:
        self.upstream = None
        req = self._req
        if req is None or self.closed:
            return
        if self._response_started:
            event(
                log,
                "http_upstream_lost",
                logging.WARNING,
                reason=reason,
                task=self._endpoint.task_id if self._endpoint else "",
            )
            self._abort()
            return
        assert req.head is not None
        may_repeat = req.head.method in IDEMPOTENT and not req.head.has_body
        if may_repeat and self._retry(exclude=not self._reused):
            return
        self._local(502, f"the task failed: {reason}", close=not req.complete)

    def on_upstream_timeout(self) -> None:
        self.upstream = None
        req = self._req
        if req is None or self.closed:
            return
        self.shared.stats.upstream_timeouts += 1
        if self._response_started:
            self._abort()
        else:
            self._local(504, "the task did not answer in time", close=not req.complete)

    def on_upstream_upgrade(self, rest: bytes) -> None:
        conn, self.upstream = self.upstream, None
        assert conn is not None
        self.flush()  # the 101 head, before the pipe's first bytes
        self.shared.stats.upgrades += 1
        self._record(101)
        self.closed = True  # this exchange is done; the pipe owns both connections
        self.shell.upgrade(conn, self._upgrade_rest, rest)

    def upstream_paused(self, paused: bool) -> None:
        req = self._req
        reading_body = req is not None and not req.complete
        if paused:
            self._pause(UPSTREAM_FULL)
            if reading_body:
                self.deadline = 0.0  # the task's slowness: its own deadline runs meanwhile
        else:
            self._resume(UPSTREAM_FULL)
            if reading_body and req is not None:
                self._start_body_clock(req)

    # -- the connection --------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._pauses and not self.closed:
            self.client.pause_reading()
        self._pauses |= reason

    def _resume(self, reason: int) -> None:
        if self._pauses & reason:
            self._pauses &= ~reason
            if not self._pauses and not self.closed:
                self.client.resume_reading()

    def _local(
        self,
        status: int,
        message: str,
        *,
        close: bool = False,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer the current request from the router itself."""
        req = self._req
        assert req is not None
        head = req.head
        keep = (
            not close and req.complete and not self._broken and head is not None and head.keep_alive
        )
        self._write(
            local_response(
                status,
                message,
                keep_alive=keep,
                head_only=head is not None and head.method == b"HEAD",
                extra=extra,
            )
        )
        self._finish(status, keep)

    def _log_access(self, status: int, elapsed: float) -> None:
        req = self._req
        head = req.head if req is not None else None
        endpoint = self._endpoint
        event(
            access_log,
            "http_request",
            client=self.peer_ip,
            proto=self.proto,
            method=head.method.decode("latin-1") if head else "-",
            host=head.host if head else "-",
            path=head.path if head else "-",
            status=status,
            bytes=self._bytes_out,
            ms=round(elapsed * 1000, 3),
            service=self._match.route.service if self._match else "-",
            task=endpoint.task_id if endpoint else "-",
            upstream=f"{endpoint.address}:{endpoint.port}" if endpoint else "-",
        )

    def _queue_access(self, access: AccessLog, status: int, elapsed: float) -> None:
        """The request's access-log entry, formatted later by the log's writer thread."""
        req = self._req
        head = req.head if req is not None else None
        endpoint = self._endpoint
        referer = user_agent = b""
        if head is not None:
            for name, value in head.headers:
                lowered = name.lower()
                if lowered == b"referer":
                    referer = value
                elif lowered == b"user-agent":
                    user_agent = value
        access.put(
            {
                "time": time.time(),
                "kind": "http",
                "client": self.peer_ip,
                "proto": self.proto,
                "method": head.method.decode("latin-1") if head else "-",
                "host": head.host if head else "-",
                "path": head.path if head else "-",
                "protocol": "HTTP/1.1" if head is None or head.http11 else "HTTP/1.0",
                "status": status,
                "bytes": self._bytes_out,
                "duration_ms": round(elapsed * 1000, 3),
                "service": self._match.route.service if self._match else "-",
                "task": endpoint.task_id if endpoint else "-",
                "upstream": f"{endpoint.address}:{endpoint.port}" if endpoint else "-",
                "referer": referer.decode("latin-1"),
                "user_agent": user_agent.decode("latin-1"),
            }
        )

    def _record(self, status: int) -> None:
        """Count the exchange (and log it): once per request, however it ended."""
        elapsed = self._clock() - self._started
        self.shared.stats.requests += 1
        route_stats = self._route_stats
        if route_stats is not None:  # RouteStats.record, inline: this runs per request
            route_stats.by_class[min(status // 100, 5)] += 1
            route_stats.latency_sum += elapsed
            route_stats.latency_count += 1
            route_stats.latency_buckets[bisect_left(LATENCY_BOUNDS, elapsed)] += 1
        access = self.shared.access
        if access is not None and access.take():
            self._queue_access(access, status, elapsed)
        if self._settings.access_log:
            self._log_access(status, elapsed)

    def _finish(self, status: int, keep_alive: bool) -> None:
        self._record(status)
        # The exchange's state, reset for the next request.
        self._req = None
        self._match = None
        self._route_stats = None
        self._endpoint = None
        self.upstream = None
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
            if (
                following.complete
                or following.error is not None
                or (head is not None and (head.has_body or head.upgrade is not None))
            ):
                self._start(following)
            else:
                self.deadline = self.shared.now + self._settings.header_timeout
        else:
            self.deadline = self.shared.now + self._settings.keepalive_timeout
            if self._pauses:
                self._resume(PIPELINED | BUFFERED | UPSTREAM_FULL)

    def _start_body_clock(self, req: Request) -> None:
        now = self._body_started = self._clock()  # exact: `now` lags by up to a tick
        self._body_base = req.received
        self.deadline = self._settings.body_due(now, 0, now)

    def _drop_upstream(self) -> None:
        if self._connecting:
            self._connecting = False
            self.shell.cancel_connect()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()

    def batch(self) -> None:
        """Collect writes until `flush`: a small response goes out in one send, not three."""
        self._out = []

    def flush(self) -> None:
        out, self._out = self._out, None
        if out and not self.closed:
            if len(out) == 1:
                self.client.write(out[0])
            elif len(out) == 2 and len(out[1]) <= _JOIN_LIMIT:
                # A head and a small body: uvloop's write of one joined buffer costs
                # ~0.15 us less than writelines of two (both are one send).
                self.client.write(out[0] + out[1])
            else:
                self.client.writelines(out)

    def _write(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
        elif not self.closed:
            self.client.write(data)

    def _close(self) -> None:
        self._broken = True  # whatever the parser still holds is not answered
        self.flush()
        self._drop_upstream()
        if not self.closed:
            self.client.close()

    def _abort(self) -> None:
        """End a response midway: the client must see it was cut, not a short body."""
        self._drop_upstream()
        if not self.closed:
            self.client.abort()

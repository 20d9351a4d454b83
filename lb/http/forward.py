"""Sending a request to a task and relaying its answer (a layer of `proxy.ClientConnection`).

A request gets a route (`RouteTable.match`), a task (`Balancer.pick`) and a
pooled connection to it (or a new one, in a task of its own); a refused
connect ejects the task and tries another; the body streams as it arrives.
The task's `UpstreamConnection` calls the `on_upstream_*` methods with the
response, which is relayed with the framing the client can read.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from lb.fds import is_fd_shortage
from lb.http.budget import PER_CLIENT
from lb.http.core import BUFFERED, UPSTREAM_FULL, ConnectionCore, Request
from lb.http.heads import (
    IDEMPOTENT,
    BadRequest,
    ResponseHead,
    client_response,
    cookie_value,
    forwarding_headers,
    strip_prefix,
    upstream_request,
)
from lb.http.pipe import splice
from lb.http.routes import Endpoint
from lb.http.upstream import UpstreamConnection
from mesh.core.logs import event

log = logging.getLogger(__name__)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ForwardingConnection(ConnectionCore):
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
        endpoint = self.r.balancer.pick(match, sticky, (), stats) if match.endpoints else None
        if endpoint is None:
            self.r.stats.no_endpoint += 1
            self._local(503, "no healthy task serves this route")
            return
        target = strip_prefix(head.target, route.path_prefix) if route.strip_prefix \
            else head.target
        facts = (head.host, head.forwarded_for, head.forwarded)
        if facts != self._forwarding_for:  # the same on most requests of a connection
            self._forwarding_for = facts
            self._forwarding = forwarding_headers(head, self.peer_ip, self.proto)
        self._upstream_head = upstream_request(head, target, self._forwarding)
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
                                          self._settings.connect_timeout)
        except TimeoutError:
            timed_out = True
        except OSError as error:
            if is_fd_shortage(error):
                self._fd_shortage()
                return
            event(log, "http_connect_failed", logging.WARNING, task=endpoint.task_id,
                  address=f"{endpoint.address}:{endpoint.port}", error=error.strerror or error)
        else:
            self._connecting = None
            if self.closed or self._req is None:
                self.r.pool.release(conn)
                return
            try:
                self._attach(conn, reused=False)
            except Exception as error:  # a bug must cost this request, never the task's log
                event(log, "http_internal_error", logging.ERROR, error=repr(error))
                self._abort()
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

    def _fd_shortage(self) -> None:
        """The router could not make a socket: its own trouble, not the task's.

        No ejection and no retry (another task would fail the same way): 503,
        counted apart from connect failures, without a log line per request.
        """
        self._connecting = None
        self.r.stats.fd_shortage += 1
        if not self.closed and self._req is not None:
            self._local(503, "the router is out of file descriptors",
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
        conn.begin(self, head.method == b"HEAD", self.r.now + self._settings.upstream_timeout)
        self._streaming = True
        if req.complete and not req.body and not head.chunked:  # the common case: one send
            assert conn.transport is not None
            conn.transport.write(self._upstream_head)
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
        conn = self._upstream
        assert conn is not None and conn.transport is not None and self._req is not None
        self._body_sent = True
        conn.deadline = self.r.now + self._settings.upstream_timeout
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
        # The client's two descriptors are the pipe's now, until it closes.
        splice(self.transport, conn.transport, left_pending=self._upgrade_rest,
               right_pending=rest, on_close=functools.partial(self.r.budget.give, PER_CLIENT))

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

    # -- ends of an exchange --------------------------------------------------------


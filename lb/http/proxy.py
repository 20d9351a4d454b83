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

The class has three layers, one module each: `core` (state, writes, pauses,
how an exchange ends), `forward` (to a task and back) and this one (the
client's bytes through llhttp, timeouts).
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import httptools

from lb.http.budget import PER_CLIENT
from lb.http.core import BUFFERED, PIPELINED, UPGRADING, UPSTREAM_FULL, Request
from lb.http.forward import ForwardingConnection
from lb.http.heads import BadRequest, local_response, read_request
from mesh.core.logs import event

log = logging.getLogger(__name__)


class ClientConnection(ForwardingConnection, asyncio.Protocol):
    """One client connection: its bytes parsed by llhttp, its requests answered in order."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, though they are ones in kind
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else ""
        stats = self.r.stats
        if not self.r.budget.take(PER_CLIENT):
            # A flood must not take every descriptor of the process: the API and the
            # health checks keep theirs (RouterSettings.fd_reserve).
            stats.reject(503)
            stats.over_budget += 1
            self.closed = True
            self.transport.write(local_response(503, "too many connections",
                                                keep_alive=False))
            self.transport.close()
            return
        self.deadline = self.r.now + self._settings.header_timeout
        self.r.conns.add(self)
        stats.connections_open += 1
        stats.connections_total += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.r.conns.discard(self)
        self.r.budget.give(PER_CLIENT)
        self.r.stats.connections_open -= 1
        self._drop_upstream()

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

    def data_received(self, data: bytes) -> None:
        if self._broken:
            if self._pauses & UPGRADING:
                self._upgrade_rest += data  # early bytes of the upgraded protocol
            return
        self._out = []  # local answers of this read go out in one send
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            req = self._queue[-1] if self._queue else None
            if req is not None and req.error is None and req.head is not None \
                    and req.head.has_body:
                # llhttp skipped this body as the new protocol's bytes: never forward
                # its head (`read_request` refuses an upgrade with a body; this holds
                # should llhttp read an upgrade where `read_request` did not)
                self._parse_failed(400, "an upgrade request with a body")
                return
            self._broken = True
            self._upgrade_rest = data[upgrade.args[0]:]
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
        self._queue.append(Request())
        if len(self._queue) > 1:
            self._pause(PIPELINED)
        elif self._req is None:
            # The header timeout runs from a request's first byte (and from accept).
            self.deadline = self.r.now + self._settings.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self._settings.max_head:
            raise BadRequest(414 if len(self._url) > self._settings.max_head else 431,
                             "request head too large")

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
            head = req.head = read_request(parser.get_method(), self._url,
                                           parser.get_http_version(), self._headers,
                                           parser.should_keep_alive())
            limit = self._settings.max_body
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
        limit = self._settings.max_body
        if limit and req.received > limit:
            raise BadRequest(413, f"request body over {limit} bytes")
        if req is self._req:
            if not self._pauses & UPSTREAM_FULL:  # (else the clock restarts on resume)
                self.deadline = self._settings.body_due(
                    self._body_started, req.received - self._body_base, self.r.now)
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

    # -- answering ----------------------------------------------------------------

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
        self.r.stats.reject(408)
        req = self._req
        if req is not None and req.head is not None and not req.complete:
            self.r.stats.slow_bodies += 1
        self._broken = True
        self._drop_upstream()
        self._write(local_response(408, "the request took too long to arrive",
                                   keep_alive=False))
        self._close()

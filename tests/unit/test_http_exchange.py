"""The client connection's HTTP exchange, without sockets: bytes in, what it asks for out.

The client side and the shell are recorders; the task's side is the real
`UpstreamConnection` (its llhttp response parser) over an in-memory transport,
so the framing both ways is the production code's.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from lb.http.balance import Balancer
from lb.http.budget import FdBudget
from lb.http.decision import Answer, decide
from lb.http.exchange import Exchange, Shared, Upstream
from lb.http.heads import read_request
from lb.http.routes import Endpoint, RouteTable
from lb.http.settings import RouterSettings
from lb.http.stats import RouterStats
from lb.http.upstream import UpstreamConnection
from mesh.core.model import Health, Service, Task

GET = b"GET /a HTTP/1.1\r\nHost: web.test\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


class Client:
    """The client's side of the connection, as the exchange sees it."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.aborted = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.out += data

    def writelines(self, data: Sequence[bytes]) -> None:
        for part in data:
            self.write(part)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data


class Wire:
    """An in-memory transport under an UpstreamConnection: what the task was sent."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent += data

    def writelines(self, data: Sequence[bytes]) -> None:
        for part in data:
            self.sent += part

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Shell:
    """Connects at once (or as told), and records what the exchange asked for."""

    def __init__(self, mode: str = "attach") -> None:
        self.mode = mode  # attach | wait
        self.exchange: Exchange | None = None
        self.connects: list[Endpoint] = []
        self.released: list[Upstream] = []
        self.cancelled = 0
        self.upgraded: tuple[bytes, bytes] | None = None
        self.task: UpstreamConnection | None = None
        self.wire = Wire()
        self.pool = SimpleNamespace(
            now=lambda: 0.0, upstream_timeout=60.0, forget=lambda conn: None
        )

    def acquire(self, key: tuple[str, int]) -> Upstream | None:
        return None  # no idle connection: every request connects (through `connect`)

    def connect(self, endpoint: Endpoint) -> None:
        self.connects.append(endpoint)
        if self.mode == "attach":
            self.attach()

    def attach(self) -> None:
        assert self.exchange is not None
        self.task = UpstreamConnection(self.pool, ("127.0.0.1", 1))  # type: ignore[arg-type]
        self.wire = Wire()
        self.task.connection_made(self.wire)  # type: ignore[arg-type]
        self.exchange.upstream_attached(self.task, reused=False)

    def cancel_connect(self) -> None:
        self.cancelled += 1

    def release(self, upstream: Upstream) -> None:
        self.released.append(upstream)

    def upgrade(self, upstream: Upstream, client_rest: bytes, upstream_rest: bytes) -> None:
        self.upgraded = (client_rest, upstream_rest)

    def respond(self, data: bytes) -> None:
        assert self.task is not None
        self.task.data_received(data)

    def sent(self) -> bytes:
        data = bytes(self.wire.sent)
        self.wire.sent.clear()
        return data


def table(*, healthy: bool = True) -> RouteTable:
    routes = RouteTable()
    routes.load(
        [
            Service(
                name="web",
                id="id-web",
                labels={"mesh.http.hosts": "web.test", "mesh.http.port": "80"},
            ),
            Task(
                id="t1",
                name="web.1.t1",
                service="web",
                slot=1,
                node="n",
                address="127.0.0.1",
                ports={80: 40001},
                health=Health.HEALTHY if healthy else Health.UNHEALTHY,
            ),
        ]
    )
    return routes


class Harness:
    def __init__(self, mode: str = "attach", *, healthy: bool = True, **settings: Any) -> None:
        self.now = 100.0
        self.settings = RouterSettings(**settings)
        self.stats = RouterStats()
        self.shared = Shared(
            table(healthy=healthy),
            self.settings,
            lambda: self.now,
            Balancer(lambda: self.now),
            self.stats,
            FdBudget(100),
        )
        self.client = Client()
        self.shell = Shell(mode)
        self.exchange = Exchange(self.shared, self.shell, self.client, "10.0.0.9", "http")
        self.shell.exchange = self.exchange
        self.exchange.opened()

    def send(self, data: bytes) -> None:
        self.exchange.receive(data)

    def answer(self) -> bytes:
        return self.client.take()


def status_line(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


# -- the routing decision: a pure function ------------------------------------------


def test_decide_forwards_a_routed_host_and_answers_404_for_another() -> None:
    routes = table()
    forward = decide(read_request(b"GET", b"/x?y", "1.1", [(b"Host", b"web.test")], True), routes)
    assert not isinstance(forward, Answer)
    match, target, sticky = forward
    assert target == b"/x?y" and sticky is None
    assert [e.task_id for e in match.endpoints] == ["t1"]
    missing = decide(read_request(b"GET", b"/", "1.1", [(b"Host", b"other.test")], True), routes)
    assert isinstance(missing, Answer) and missing.status == 404


# -- framing ------------------------------------------------------------------------


def test_a_get_is_forwarded_and_its_content_length_answer_relayed() -> None:
    h = Harness()
    h.send(GET)
    sent = h.shell.sent()
    assert sent.startswith(b"GET /a HTTP/1.1\r\nHost: web.test\r\n")
    assert b"X-Forwarded-For: 10.0.0.9\r\n" in sent and sent.endswith(b"\r\n\r\n")
    h.shell.respond(OK)
    answer = h.answer()
    assert status_line(answer) == b"HTTP/1.1 200 OK"
    assert answer.endswith(b"Content-Length: 2\r\n\r\nhi")
    assert h.stats.requests == 1 and not h.client.closed
    assert h.shell.released == [h.shell.task]  # back to the pool: kept alive
    assert h.exchange.deadline == h.now + h.settings.keepalive_timeout


def test_a_content_length_body_streams_as_it_arrives() -> None:
    h = Harness()
    h.send(b"POST /a HTTP/1.1\r\nHost: web.test\r\nContent-Length: 10\r\n\r\nhello")
    sent = h.shell.sent()
    assert b"Content-Length: 10\r\n" in sent and sent.endswith(b"\r\n\r\nhello")
    h.send(b"world")
    assert h.shell.sent() == b"world"
    h.shell.respond(OK)
    assert status_line(h.answer()) == b"HTTP/1.1 200 OK"


def test_a_chunked_body_is_forwarded_chunked() -> None:
    h = Harness()
    h.send(
        b"POST /a HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    h.send(b"0\r\n\r\n")
    sent = h.shell.sent()
    assert b"Transfer-Encoding: chunked\r\n" in sent
    assert sent.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")


def test_a_body_buffered_while_connecting_goes_after_the_head() -> None:
    h = Harness("wait")
    h.send(b"POST /a HTTP/1.1\r\nHost: web.test\r\nContent-Length: 3\r\n\r\nabc")
    assert len(h.shell.connects) == 1
    h.shell.attach()
    assert h.shell.sent().endswith(b"\r\n\r\nabc")


def test_a_response_without_length_is_chunked_to_an_http11_client() -> None:
    h = Harness()
    h.send(GET)
    h.shell.respond(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc")
    h.shell.task.connection_lost(None)  # type: ignore[union-attr]  # the close ends it
    answer = h.answer()
    assert b"Transfer-Encoding: chunked\r\n" in answer
    assert answer.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert not h.client.closed


def test_a_response_without_length_to_an_http10_client_ends_with_the_close() -> None:
    h = Harness()
    h.send(b"GET /a HTTP/1.0\r\nHost: web.test\r\nConnection: keep-alive\r\n\r\n")
    h.shell.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    answer = h.answer()
    assert b"Transfer-Encoding" not in answer and answer.endswith(b"\r\n\r\nabc")
    assert h.client.closed


def test_a_head_request_gets_the_length_and_no_body() -> None:
    h = Harness()
    h.send(b"HEAD /a HTTP/1.1\r\nHost: web.test\r\n\r\n")
    h.shell.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    answer = h.answer()
    assert answer.endswith(b"Content-Length: 5\r\n\r\n")
    assert not h.client.closed
    h.send(GET)  # the connection goes on
    h.shell.respond(OK)
    assert h.answer().endswith(b"hi")


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_is_framed_for_204_and_304(status: int) -> None:
    h = Harness()
    h.send(GET)
    h.shell.respond(b"HTTP/1.1 %d X\r\nETag: x\r\n\r\n" % status)
    answer = h.answer()
    assert status_line(answer) == b"HTTP/1.1 %d X" % status
    assert b"Transfer-Encoding" not in answer and answer.endswith(b"\r\n\r\n")
    assert h.shell.released and not h.client.closed


def test_a_head_answer_from_the_router_has_no_body() -> None:
    h = Harness()
    h.send(b"HEAD / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
    answer = h.answer()
    assert status_line(answer) == b"HTTP/1.1 404 Not Found"
    assert answer.endswith(b"\r\n\r\n") and b"Content-Length: " in answer


def test_expect_100_continue_is_answered_by_the_router() -> None:
    h = Harness()
    h.send(
        b"POST /a HTTP/1.1\r\nHost: web.test\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    assert h.answer() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert b"Expect" not in h.shell.sent()


# -- keep-alive ---------------------------------------------------------------------


def test_connection_close_closes_after_the_answer() -> None:
    h = Harness()
    h.send(b"GET /a HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
    h.shell.respond(OK)
    assert b"Connection: close\r\n" in h.answer()
    assert h.client.closed


def test_an_http10_request_closes_unless_kept_alive() -> None:
    h = Harness()
    h.send(b"GET /a HTTP/1.0\r\nHost: web.test\r\n\r\n")
    h.shell.respond(OK)
    assert status_line(h.answer()) == b"HTTP/1.0 200 OK"
    assert h.client.closed
    kept = Harness()
    kept.send(b"GET /a HTTP/1.0\r\nHost: web.test\r\nConnection: keep-alive\r\n\r\n")
    kept.shell.respond(OK)
    assert b"Connection: keep-alive\r\n" in kept.answer()
    assert not kept.client.closed


def test_a_task_closing_its_connection_is_not_pooled() -> None:
    h = Harness()
    h.send(GET)
    h.shell.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
    assert h.shell.released == [] and h.shell.wire.closed
    assert not h.client.closed  # the client's connection stays


def test_an_idle_connection_is_closed_silently_at_its_deadline() -> None:
    h = Harness()
    h.send(GET)
    h.shell.respond(OK)
    h.answer()
    h.exchange.on_deadline()
    assert h.client.closed and h.answer() == b""


# -- pipelining ---------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order() -> None:
    h = Harness()
    h.send(GET + b"GET /b HTTP/1.1\r\nHost: web.test\r\n\r\n")
    assert h.client.paused  # the second waits: no more is read meanwhile
    first = h.shell.sent()
    assert first.startswith(b"GET /a ") and b"GET /b" not in first
    h.shell.respond(OK)
    assert h.answer().endswith(b"hi")
    assert h.shell.sent().startswith(b"GET /b ")  # sent once the first was answered
    h.shell.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye")
    assert h.answer().endswith(b"bye")
    assert not h.client.paused and h.stats.requests == 2


def test_a_bad_pipelined_request_is_answered_after_the_good_one() -> None:
    h = Harness()
    h.send(GET + b"GET /b HTTP/1.1\r\n\r\n")  # no Host
    assert h.answer() == b""
    h.shell.respond(OK)
    answer = h.answer()
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 400 Bad Request" in answer
    assert h.client.closed


def test_a_router_answer_keeps_the_connection_for_the_next_request() -> None:
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n" + GET)
    assert status_line(h.answer()) == b"HTTP/1.1 404 Not Found"
    h.shell.respond(OK)
    assert h.answer().endswith(b"hi") and not h.client.closed


# -- upgrade ------------------------------------------------------------------------

UPGRADE = b"GET /ws HTTP/1.1\r\nHost: web.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_an_upgrade_is_spliced_after_the_tasks_101() -> None:
    h = Harness()
    h.send(UPGRADE + b"early")
    sent = h.shell.sent()
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in sent
    h.send(b"-more")  # the new protocol's bytes wait for the pipe
    h.shell.respond(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n\r\nhello"
    )
    assert status_line(h.answer()) == b"HTTP/1.1 101 Switching Protocols"
    assert h.shell.upgraded == (b"early-more", b"hello")
    assert h.stats.upgrades == 1 and h.exchange.closed


def test_an_upgrade_the_task_refuses_is_an_ordinary_answer() -> None:
    h = Harness()
    h.send(UPGRADE)
    h.shell.respond(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    assert status_line(h.answer()) == b"HTTP/1.1 403 Forbidden"
    assert h.shell.upgraded is None and h.client.closed  # the rest was not HTTP


def test_a_101_unasked_is_a_502() -> None:
    h = Harness()
    h.send(GET)
    h.shell.respond(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
    assert status_line(h.answer()) == b"HTTP/1.1 502 Bad Gateway"
    assert h.shell.upgraded is None


def test_an_upgrade_with_a_body_is_refused() -> None:
    h = Harness()
    h.send(
        b"POST /ws HTTP/1.1\r\nHost: web.test\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert status_line(h.answer()) == b"HTTP/1.1 400 Bad Request"
    assert h.shell.connects == [] and h.client.closed


# -- the router's own answers -------------------------------------------------------


def refused(h: Harness, status: int) -> bytes:
    answer = h.answer()
    assert status_line(answer).startswith(b"HTTP/1.1 %d " % status), answer
    return answer


def test_400_for_bad_syntax_and_a_closed_connection() -> None:
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nHost: web.test\r\nBad Header\r\n\r\n")
    refused(h, 400)
    assert h.client.closed and h.stats.rejected == {400: 1}


def test_400_for_content_length_with_transfer_encoding() -> None:
    h = Harness()
    h.send(
        b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    refused(h, 400)
    assert h.client.closed and h.shell.connects == []


def test_404_for_a_host_with_no_route_keeps_the_connection() -> None:
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
    refused(h, 404)
    assert not h.client.closed and h.stats.no_route == 1


def test_408_for_a_head_that_takes_too_long() -> None:
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nHost: web")
    h.exchange.on_deadline()
    refused(h, 408)
    assert h.client.closed and h.stats.rejected == {408: 1}


def test_408_for_a_body_that_stalls() -> None:
    h = Harness()
    h.send(b"POST /a HTTP/1.1\r\nHost: web.test\r\nContent-Length: 10\r\n\r\nab")
    h.shell.sent()
    assert h.exchange.deadline > h.now
    h.exchange.on_deadline()
    refused(h, 408)
    assert h.stats.slow_bodies == 1 and h.shell.wire.closed


def test_413_for_a_declared_body_over_the_limit() -> None:
    h = Harness(max_body=4)
    h.send(b"POST /a HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\n\r\n")
    refused(h, 413)
    assert h.client.closed and h.shell.connects == []


def test_413_for_a_chunked_body_growing_over_the_limit() -> None:
    h = Harness(max_body=4)
    h.send(b"POST /a HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n")
    h.send(b"5\r\nhello\r\n")
    refused(h, 413)
    assert h.client.closed and h.shell.wire.closed


def test_414_for_a_long_url_and_431_for_big_headers() -> None:
    h = Harness(max_head=64)
    h.send(b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n")
    refused(h, 414)
    h = Harness(max_head=64)
    h.send(b"GET / HTTP/1.1\r\nHost: web.test\r\nX-Big: " + b"b" * 100 + b"\r\n\r\n")
    refused(h, 431)


def test_501_for_a_transfer_coding_other_than_chunked() -> None:
    h = Harness()
    h.send(b"POST / HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    refused(h, 501)
    assert h.client.closed


def test_502_when_no_task_can_be_connected() -> None:
    h = Harness("wait")
    h.send(GET)
    h.exchange.connect_failed(timed_out=False)
    refused(h, 502)
    assert h.stats.connect_failures == 1
    assert not h.client.closed  # the request was whole: the connection goes on


def test_502_for_a_task_that_fails_midway_and_no_retry_for_a_body() -> None:
    h = Harness()
    h.send(b"POST /a HTTP/1.1\r\nHost: web.test\r\nContent-Length: 1\r\n\r\nx")
    h.shell.task.connection_lost(None)  # type: ignore[union-attr]
    refused(h, 502)
    assert len(h.shell.connects) == 1  # a POST is not repeated


def test_502_for_a_response_coding_the_router_does_not_relay() -> None:
    h = Harness()
    h.send(GET)
    h.shell.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc")
    refused(h, 502)


def test_503_when_no_task_is_healthy() -> None:
    h = Harness(healthy=False)
    h.send(GET)
    refused(h, 503)
    assert h.stats.no_endpoint == 1 and not h.client.closed


def test_503_when_the_router_is_out_of_descriptors() -> None:
    h = Harness("wait")
    h.send(GET)
    h.exchange.fd_shortage()
    refused(h, 503)
    assert h.stats.fd_shortage == 1 and h.stats.connect_failures == 0


def test_504_for_a_connect_timeout_and_an_upstream_timeout() -> None:
    h = Harness("wait")
    h.send(GET)
    h.exchange.connect_failed(timed_out=True)
    refused(h, 504)
    h = Harness()
    h.send(GET)
    h.shell.task.on_deadline()  # type: ignore[union-attr]
    refused(h, 504)
    assert h.stats.upstream_timeouts == 1


def test_a_response_cut_midway_aborts_the_client() -> None:
    h = Harness()
    h.send(GET)
    h.shell.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    h.shell.task.connection_lost(None)  # type: ignore[union-attr]
    assert h.client.aborted


def test_a_client_gone_while_connecting_cancels_the_connect() -> None:
    h = Harness("wait")
    h.send(GET)
    h.exchange.lost()
    assert h.shell.cancelled == 1 and not h.exchange.waiting


def test_a_host_whose_label_is_broken_gets_a_404_that_says_why() -> None:
    routes = RouteTable()
    routes.load(
        [
            Service(
                name="web", id="s1", labels={"mesh.http.hosts": "web.test", "mesh.http.port": "x"}
            )
        ]
    )
    answer = decide(read_request(b"GET", b"/", "1.1", [(b"Host", b"web.test")], True), routes)
    assert isinstance(answer, Answer) and answer.status == 404 and answer.match is None
    assert answer.reason == (
        "no service is routed for this host: service web names it, but its label "
        "mesh.http.hosts is not used: mesh.http.port 'x' is not a port (1-65535)"
    )
    plain = decide(read_request(b"GET", b"/", "1.1", [(b"Host", b"other.test")], True), routes)
    assert isinstance(plain, Answer) and plain.reason == "no service is routed for this host"

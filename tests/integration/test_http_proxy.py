"""The router's HTTP machinery on real loopback sockets, one router in the test's loop.

The backends here are small raw asyncio servers, so a test can make a task
misbehave exactly (close without answering, answer close-delimited, count
its connections); the clients are raw sockets, so every byte is visible.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from lb.http.router import Router
from lb.http.routes import RouteTable
from lb.http.settings import RouterSettings
from mesh.core.model import Health, Service, Task
from tests.helpers.agent import free_port

Answer = Callable[[bytes], bytes | None]  # request head -> response (None: close at once)


@dataclass
class Backend:
    answer: Answer
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None

    async def start(self) -> Backend:
        backend = self

        class Conn(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                self.buffer = b""
                backend.connections += 1

            def data_received(self, data: bytes) -> None:
                self.buffer += data
                while b"\r\n\r\n" in self.buffer:
                    head, _, rest = self.buffer.partition(b"\r\n\r\n")
                    length = re.search(rb"(?i)content-length: *(\d+)", head)
                    size = int(length.group(1)) if length else 0
                    if b"chunked" in head.lower():
                        end = rest.find(b"0\r\n\r\n")
                        if end < 0:
                            return
                        size = end + 5
                    if len(rest) < size:
                        return
                    self.buffer = rest[size:]
                    backend.requests.append(head + b"\r\n\r\n" + rest[:size])
                    reply = backend.answer(head)
                    if reply is None:
                        self.transport.close()  # type: ignore[attr-defined]
                        return
                    self.transport.write(reply)  # type: ignore[attr-defined]
                    if b"Connection: close" in reply:
                        self.transport.close()  # type: ignore[attr-defined]
                        return

        self.server = await asyncio.get_running_loop().create_server(Conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


def ok(body: bytes = b"ok") -> Answer:
    return lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def service(name: str, labels: dict[str, str]) -> Service:
    return Service(name=name, id=name, labels=labels)


def task(task_id: str, svc: str, port: int) -> Task:
    return Task(
        id=task_id,
        name=f"{svc}.1.{task_id}",
        service=svc,
        slot=1,
        node="n",
        address="127.0.0.1",
        ports={80: port},
        health=Health.HEALTHY,
    )


@dataclass
class Rig:
    router: Router
    port: int

    async def exchange(self, payload: bytes) -> bytes:
        """Send the bytes and read until the router closes (5 s at most)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(payload)
        try:
            return await asyncio.wait_for(reader.read(), 5.0)
        finally:
            writer.close()


@pytest.fixture
async def rig() -> AsyncIterator[Callable[..., object]]:
    routers: list[Router] = []

    async def make(records: list[Service | Task], **settings: object) -> Rig:
        table = RouteTable()
        table.load(records)
        router = Router(table, RouterSettings(**settings))  # type: ignore[arg-type]
        routers.append(router)
        return Rig(router, await router.listen_http("127.0.0.1", 0, False))

    yield make
    for router in routers:
        await router.close()


HOSTS = {"mesh.http.hosts": "a.test", "mesh.http.port": "80"}


def statuses(answer: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]


async def test_a_refused_connect_is_retried_on_another_task_and_ejects_the_task(rig) -> None:  # type: ignore[no-untyped-def]
    live = await Backend(ok(b"live")).start()
    r = await rig(
        [service("web", HOSTS), task("dead", "web", free_port()), task("live", "web", live.port)]
    )
    for _ in range(4):
        answer = await r.exchange(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        assert statuses(answer) == [200] and answer.endswith(b"live")
    assert r.router.balancer.ejected() == ["dead"]
    assert r.router.stats.connect_failures == 1  # ejected after the first refusal


async def test_connections_to_a_task_are_kept_alive_and_reused(rig) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(ok()).start()
    r = await rig([service("web", HOSTS), task("t", "web", backend.port)])
    for _ in range(5):
        assert statuses(
            await r.exchange(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        ) == [200]
    assert backend.connections == 1 and len(backend.requests) == 5


async def test_an_idempotent_request_is_retried_when_the_task_hangs_up(rig) -> None:  # type: ignore[no-untyped-def]
    rude = await Backend(lambda head: None).start()
    good = await Backend(ok(b"good")).start()
    r = await rig(
        [service("web", HOSTS), task("rude", "web", rude.port), task("good", "web", good.port)]
    )
    for _ in range(2):
        answer = await r.exchange(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        assert answer.endswith(b"good")
    # A POST is not repeated: whichever task hung up, the client hears 502 from it.
    answers = [
        await r.exchange(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
        )
        for _ in range(2)
    ]
    assert sorted(statuses(a)[0] for a in answers) == [200, 502]


async def test_expect_100_continue(rig) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(ok(b"got it")).start()
    r = await rig([service("web", HOSTS), task("t", "web", backend.port)])
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    writer.write(
        b"PUT /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    final = await asyncio.wait_for(reader.readuntil(b"got it"), 5)
    assert final.startswith(b"HTTP/1.1 200 OK")
    writer.close()
    assert backend.requests[0].endswith(b"\r\n\r\nhello")
    assert b"expect" not in backend.requests[0].lower()


async def test_head_responses_have_no_body_and_keep_the_connection(rig) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(
        lambda head: (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
            if head.startswith(b"HEAD")
            else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
        )
    ).start()
    r = await rig([service("web", HOSTS), task("t", "web", backend.port)])
    answer = await r.exchange(
        b"HEAD / HTTP/1.1\r\nHost: a.test\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    )
    assert statuses(answer) == [200, 200] and answer.endswith(b"\r\n\r\nhi")
    assert backend.connections == 1


async def test_close_delimited_bodies_are_rechunked_or_closed(rig) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(
        lambda head: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"
    ).start()
    r = await rig([service("web", HOSTS), task("t", "web", backend.port)])
    answer = await r.exchange(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    assert b"Transfer-Encoding: chunked\r\n" in answer
    assert answer.endswith(b"d\r\nuntil the end\r\n0\r\n\r\n")
    old = await r.exchange(b"GET / HTTP/1.0\r\nHost: a.test\r\n\r\n")
    assert b"chunked" not in old and old.endswith(b"\r\n\r\nuntil the end")


async def test_a_chunked_response_loses_its_trailers(rig) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(
        lambda head: (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            b"Trailer: X-T\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
        )
    ).start()
    r = await rig([service("web", HOSTS), task("t", "web", backend.port)])
    answer = await r.exchange(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    assert answer.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n") and b"X-T" not in answer


async def test_a_chunked_body_over_the_limit_is_413(rig) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(ok()).start()
    r = await rig([service("web", HOSTS), task("t", "web", backend.port)], max_body=10)
    answer = await r.exchange(
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n"
    )
    assert statuses(answer) == [413]


async def test_redirect_and_context_root_routes(rig) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(ok()).start()
    r = await rig(
        [
            service(
                "old",
                {
                    "com.docker.ucp.mesh.http": "external_route=http://old.test,"
                    "redirect=https://new.test"
                },
            ),
            service(
                "app",
                {
                    "mesh.http.hosts": "app.test",
                    "mesh.http.port": "80",
                    "com.docker.lb.context_root": "/app",
                    "com.docker.lb.context_root_rewrite": "true",
                },
            ),
            task("t", "app", backend.port),
        ]
    )
    moved = await r.exchange(b"GET /x?y HTTP/1.1\r\nHost: old.test\r\nConnection: close\r\n\r\n")
    assert statuses(moved) == [301] and b"Location: https://new.test/x?y\r\n" in moved
    assert statuses(
        await r.exchange(b"GET /app/page HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
    ) == [200]
    assert backend.requests[-1].startswith(b"GET /page HTTP/1.1\r\n")
    assert statuses(
        await r.exchange(b"GET /other HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
    ) == [404]


async def test_a_task_that_never_answers_gets_504(rig) -> None:  # type: ignore[no-untyped-def]
    silent = await Backend(lambda head: b"").start()
    r = await rig([service("web", HOSTS), task("t", "web", silent.port)], upstream_timeout=0.3)
    answer = await r.exchange(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    assert statuses(answer) == [504]
    assert r.router.stats.upstream_timeouts == 1


async def test_route_counters_are_plain_data(rig) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(ok()).start()
    r = await rig([service("web", HOSTS), task("t", "web", backend.port)])
    await r.exchange(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    await r.exchange(b"GET / HTTP/1.1\r\nHost: nope.test\r\nConnection: close\r\n\r\n")
    snapshot = r.router.snapshot()
    assert snapshot["requests"] == 2 and snapshot["no_route"] == 1
    [route] = snapshot["routes"]
    assert route["service"] == "web" and route["requests"]["2xx"] == 1
    assert route["latency_count"] == 1


async def test_http10_keep_alive_and_pipelined_bodies(rig) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(
        lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n" + head.split(b" ")[1][:3]
    ).start()
    r = await rig([service("web", HOSTS), task("t", "web", backend.port)])
    answer = await r.exchange(
        b"GET /k1 HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n"
        b"POST /p2 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\r\nbody"
        b"POST /c3 HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nab\r\n0\r\n\r\n"
        b"GET /l4 HTTP/1.0\r\nHost: a.test\r\n\r\n"
    )
    assert statuses(answer) == [200, 200, 200, 200]
    assert answer.count(b"Connection: keep-alive") == 1  # only the HTTP/1.0 one asked for it
    assert re.findall(rb"\r\n\r\n(/..)", answer) == [b"/k1", b"/p2", b"/c3", b"/l4"]
    assert backend.requests[1].endswith(b"\r\n\r\nbody")
    assert backend.requests[2].endswith(b"\r\n\r\n2\r\nab\r\n0\r\n\r\n")


async def test_a_refused_upgrade_is_relayed_and_the_connection_closed(rig) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(
        lambda head: b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 2\r\n\r\nno"
    ).start()
    r = await rig([service("web", HOSTS), task("t", "web", backend.port)])
    answer = await r.exchange(
        b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\nGET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    )
    assert statuses(answer) == [426] and answer.endswith(b"\r\n\r\nno")
    assert b"Connection: Upgrade" in backend.requests[0]
    assert len(backend.requests) == 1  # bytes after an upgrade request are not HTTP


async def test_an_upgrade_becomes_a_raw_pipe(rig) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.upgraded = False

        def data_received(self, data: bytes) -> None:
            if not self.upgraded:
                self.upgraded = True
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\n"  # type: ignore[attr-defined]
                    b"Connection: Upgrade\r\nUpgrade: echo\r\n\r\nhello "
                )
                data = data.partition(b"\r\n\r\n")[2]
            if data:
                self.transport.write(data.upper())  # type: ignore[attr-defined]

    server = await loop.create_server(Echo, "127.0.0.1", 0)
    r = await rig([service("web", HOSTS), task("t", "web", server.sockets[0].getsockname()[1])])
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    writer.write(
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nearly "
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 ") and b"Upgrade: echo" in head
    writer.write(b"bytes")
    got = b""
    while len(got) < len(b"hello EARLY BYTES"):
        got += await asyncio.wait_for(reader.read(100), 5)
    assert got == b"hello EARLY BYTES"
    writer.write_eof()  # a half-close passes through; the task's side then ends too
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert r.router.stats.upgrades == 1
    server.close()


async def test_connections_past_the_cap_get_503(rig) -> None:  # type: ignore[no-untyped-def]
    backend = await Backend(ok()).start()
    r = await rig([service("web", HOSTS), task("t", "web", backend.port)], max_connections=2)
    held = [await asyncio.open_connection("127.0.0.1", r.port) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert statuses(await r.exchange(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")) == [503]
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.05)
    assert statuses(
        await r.exchange(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    ) == [200]


async def test_an_idle_router_parks_its_ticker_and_a_connection_wakes_it(rig) -> None:  # type: ignore[no-untyped-def]
    """No connection, nothing to sweep: the ticker takes no wake-ups of its own. The clock
    the deadlines read stood still meanwhile; the next connection's header deadline must
    still run from its accept, not from the last tick (else it timed out at once)."""
    r = await rig([service("web", HOSTS)], header_timeout=0.5)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.05)
    assert r.router._parked is not None
    await asyncio.sleep(0.7)  # longer than the header timeout
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    writer.write(b"GET / HTTP/1.1\r\n")  # an unfinished head
    await writer.drain()
    await asyncio.sleep(0.05)
    assert r.router._parked is None
    (exchange,) = r.router.conns
    assert exchange.deadline >= loop.time() + 0.2
    try:
        answer = await asyncio.wait_for(reader.read(), 5.0)  # the header timeout still ends it
    finally:
        writer.close()
    assert statuses(answer) in ([408], [])
    for _ in range(100):  # the last connection gone, it parks again
        if r.router._parked is not None:
            break
        await asyncio.sleep(0.05)
    assert r.router._parked is not None

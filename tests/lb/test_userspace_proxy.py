"""The userspace proxy beyond the shared suite: half-close, failover, connect and idle
timeouts, limits, PROXY v2, draining with a connection in flight, flow control on a
large transfer. Real sockets on 127.x addresses, under asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from lb.table import (
    ANY_ADDRESS,
    DeleteReal,
    DeleteService,
    PutReal,
    PutService,
    Real,
    Scheduler,
    ServiceOptions,
    VirtualKey,
)
from lb.userspace import ProxySettings, proxy_protocol
from lb.userspace import __file__ as lb_userspace_file
from tests.lb.loopback import (
    REAL_PORT,
    LoopbackHarness,
    connect,
    greeted,
    settings_for,
    started,
)


@pytest.fixture
async def harness() -> AsyncIterator[LoopbackHarness]:
    made = LoopbackHarness()
    await made.start_reals()
    try:
        yield made
    finally:
        await made.close()


# -- half-close --------------------------------------------------------------------------------


async def test_client_half_close_still_gets_the_whole_answer(harness: LoopbackHarness) -> None:
    """The client shuts down its sending side; the server answers only after that EOF."""
    real = Real(f"{harness.net}.150", REAL_PORT)

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until EOF
        writer.write(b"got %d bytes:" % len(data) + data[::-1])
        await writer.drain()
        writer.close()

    await harness.serve(real, answer_after_eof)
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    await backend.apply([PutService(key), PutReal(key, real, 1)])
    reader, writer = await connect(harness, key)
    writer.write(b"abc" * 1000)
    writer.write_eof()
    async with asyncio.timeout(3):
        reply = await reader.read()
    assert reply == b"got 3000 bytes:" + (b"abc" * 1000)[::-1]
    writer.close()


async def test_server_half_close_lets_the_client_keep_sending(harness: LoopbackHarness) -> None:
    real = Real(f"{harness.net}.151", REAL_PORT)
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def close_first_then_listen(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"bye for now")
        writer.write_eof()
        received.set_result(await reader.read())
        writer.close()

    await harness.serve(real, close_first_then_listen)
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    await backend.apply([PutService(key), PutReal(key, real, 1)])
    reader, writer = await connect(harness, key)
    async with asyncio.timeout(3):
        assert await reader.read() == b"bye for now"  # EOF seen, connection still open
    writer.write(b"still here")
    writer.write_eof()
    async with asyncio.timeout(3):
        assert await received == b"still here"
    writer.close()


# -- failover, schedulers --------------------------------------------------------------------


async def test_failover_to_the_next_real_when_a_connect_fails(harness: LoopbackHarness) -> None:
    dead = Real(f"{harness.net}.199", REAL_PORT)  # nothing listens there: refused
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    await backend.apply([PutService(key), PutReal(key, dead, 1), PutReal(key, harness.real(1), 1)])
    seen = [await harness.hit(key) for _ in range(6)]
    assert seen == [harness.real(1)] * 6
    stats = backend.stats()
    assert stats["tcp_connect_failed"] >= 3
    assert stats["tcp_failovers"] >= 3


async def test_a_real_that_never_answers_times_out_and_fails_over(
    harness: LoopbackHarness,
) -> None:
    """A listener whose accept queue is full drops SYNs: the connect hangs until the timeout."""
    stuck = Real(f"{harness.net}.100", REAL_PORT)  # sorts first: round robin tries it first
    full = socket.socket()
    full.bind((stuck.address, stuck.port))
    full.listen(0)
    fillers = []
    try:
        for _ in range(3):  # fill the accept queue (never accepted)
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((stuck.address, stuck.port))
            fillers.append(filler)
        await asyncio.sleep(0.1)
        backend = await started(harness, settings_for(harness, connect_timeout=0.3))
        key = VirtualKey("tcp", harness.vip(1), 8080)
        await backend.apply(
            [PutService(key), PutReal(key, stuck, 1), PutReal(key, harness.real(2), 1)]
        )
        assert await harness.hit(key) == harness.real(2)
        stats = backend.stats()
        assert stats["tcp_connect_failed"] == 1 and stats["tcp_failovers"] == 1, stats
    finally:
        for filler in fillers:
            filler.close()
        full.close()


async def test_no_reachable_real_closes_the_client(harness: LoopbackHarness) -> None:
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    await backend.apply([PutService(key), PutReal(key, Real(f"{harness.net}.199", 1), 1)])
    assert await harness.hit(key) is None
    await backend.apply([PutReal(key, Real(f"{harness.net}.199", 1), 0)])
    assert await harness.hit(key) is None
    assert backend.stats()["tcp_no_real"] == 2


async def test_out_of_descriptors_is_not_a_connect_failure(harness: LoopbackHarness) -> None:
    """EMFILE on the proxy's connect to a real is this process's shortage: counted apart,
    the client closed, no failover to the next real (it would fail the same way)."""
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    await backend.apply(
        [PutService(key), PutReal(key, harness.real(1), 1), PutReal(key, harness.real(2), 1)]
    )
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The limit bounds descriptor numbers and a new one takes the lowest free number:
    # a limit one past it leaves exactly one, for the proxy's accept of this client.
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + 1, hard))
    try:
        async with asyncio.timeout(2):
            await loop.sock_connect(client, (key.address, key.port))
            with contextlib.suppress(ConnectionError):
                assert await loop.sock_recv(client, 100) == b""  # closed: no greeting
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        client.close()
    stats = backend.stats()
    assert stats.get("tcp_connect_failed", 0) == 0 and stats.get("tcp_failovers", 0) == 0, stats
    assert stats["tcp_fd_shortage"] == 1, stats
    assert await harness.hit(key) in (harness.real(1), harness.real(2))


async def test_least_connections_avoids_the_busy_real(harness: LoopbackHarness) -> None:
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    one, two = harness.real(1), harness.real(2)
    await backend.apply(
        [
            PutService(key, ServiceOptions(Scheduler.LEAST_CONNECTIONS)),
            PutReal(key, one, 1),
            PutReal(key, two, 1),
        ]
    )
    held = []
    try:
        first, _, writer = await greeted(harness, key)
        held.append(writer)
        busy, idle = (one, two) if first == str(one) else (two, one)
        second, _, writer = await greeted(harness, key)  # held open too
        held.append(writer)
        assert second == str(idle)
        held.pop(0).close()  # the busy one's connection ends: it is the idle one now
        for _ in range(50):
            if backend.runtime.open and len(backend.runtime.open) == 1:
                break
            await asyncio.sleep(0.02)
        third, _, writer = await greeted(harness, key)
        held.append(writer)
        assert third == str(busy)
    finally:
        for writer in held:
            writer.close()


# -- timeouts and limits ---------------------------------------------------------------------


async def test_idle_connection_is_closed_and_a_busy_one_is_not(harness: LoopbackHarness) -> None:
    backend = await started(harness, settings_for(harness, tcp_idle_timeout=0.4))
    key = VirtualKey("tcp", harness.vip(1), 8080)
    await backend.apply([PutService(key), PutReal(key, harness.real(1), 1)])
    _, idle_reader, idle_writer = await greeted(harness, key)
    _, busy_reader, busy_writer = await greeted(harness, key)
    for _ in range(10):  # 1 s of traffic every 0.1 s on the busy one
        busy_writer.write(b"x")
        async with asyncio.timeout(2):
            assert await busy_reader.readexactly(1) == b"x"
        await asyncio.sleep(0.1)
    async with asyncio.timeout(2):
        assert await idle_reader.read() == b""  # closed by the proxy
    assert backend.stats()["idle_closed"] == 1
    idle_writer.close()
    busy_writer.close()


async def test_connection_limit_refuses_the_extra_connection(harness: LoopbackHarness) -> None:
    backend = await started(harness, settings_for(harness, max_connections=2))
    key = VirtualKey("tcp", harness.vip(1), 8080)
    await backend.apply([PutService(key), PutReal(key, harness.real(1), 1)])
    _, _, first = await greeted(harness, key)
    _, _, second = await greeted(harness, key)
    assert await harness.hit(key) is None
    assert backend.stats()["refused_limit"] == 1
    first.close()
    await first.wait_closed()
    for _ in range(50):  # the proxy sees the close and frees the slot
        if backend.stats()["open"] < 2:
            break
        await asyncio.sleep(0.02)
    assert await harness.hit(key) == harness.real(1)
    second.close()


async def test_udp_flows_expire_when_idle(harness: LoopbackHarness) -> None:
    backend = await started(harness, settings_for(harness, udp_idle_timeout=0.2))
    key = VirtualKey("udp", harness.vip(2), 5353)
    await backend.apply([PutService(key), PutReal(key, harness.real(1, "udp"), 1)])
    assert await harness.hit(key) == harness.real(1)
    assert backend.stats()["open"] == 1
    for _ in range(50):
        if backend.stats()["open"] == 0:
            break
        await asyncio.sleep(0.05)
    assert backend.stats()["open"] == 0
    assert backend.stats()["idle_closed"] == 1
    assert await harness.hit(key) == harness.real(1)  # a new flow


async def test_udp_flow_fails_over_from_a_closed_port(harness: LoopbackHarness) -> None:
    backend = await started(harness)
    key = VirtualKey("udp", harness.vip(2), 5353)
    dead = Real(f"{harness.net}.100", REAL_PORT)  # sorts first: the first flow picks it
    await backend.apply(
        [PutService(key), PutReal(key, dead, 1), PutReal(key, harness.real(2, "udp"), 1)]
    )
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((key.address, key.port))
        await loop.sock_sendall(sock, b"one")  # to the dead real: lost, as UDP goes
        await asyncio.sleep(0.2)
        replies = []
        for _ in range(3):  # the refusal moved this flow to the live real
            await loop.sock_sendall(sock, b"again")
            try:
                async with asyncio.timeout(1):
                    replies.append(await loop.sock_recv(sock, 2048))
            except TimeoutError:
                replies.append(b"")
    assert replies.count(str(harness.real(2)).encode()) >= 2, replies
    assert backend.stats()["udp_failovers"] >= 1


# -- PROXY protocol v2 -----------------------------------------------------------------------


async def test_proxy_v2_header_tells_the_real_the_client_address(
    harness: LoopbackHarness,
) -> None:
    real = Real(f"{harness.net}.152", REAL_PORT)

    async def parse_then_report(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        header = None
        while header is None:
            chunk = await reader.read(64)
            if not chunk:
                writer.close()
                return
            data += chunk
            header = proxy_protocol.parse(data)
        rest = data[header.length :]
        writer.write(
            f"{header.protocol} {header.source[0]}:{header.source[1]} "
            f"{header.destination[0]}:{header.destination[1]} ".encode()
            + rest
        )
        writer.write(await reader.read(100))
        writer.close()

    await harness.serve(real, parse_then_report)
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(3), 8443)
    await backend.apply(
        [PutService(key, ServiceOptions(proxy_protocol=True)), PutReal(key, real, 1)]
    )
    client_address = f"{harness.net}.77"
    sock = socket.socket()
    sock.bind((client_address, 0))
    client_port = sock.getsockname()[1]
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (key.address, key.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"hello")
    writer.write_eof()
    async with asyncio.timeout(3):
        reply = await reader.read()
    assert reply == (f"tcp {client_address}:{client_port} {key.address}:{key.port} hello").encode()
    writer.close()


# -- draining with connections in flight ---------------------------------------------------------


async def test_draining_keeps_connections_in_flight(harness: LoopbackHarness) -> None:
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    one, two = harness.real(1), harness.real(2)
    await backend.apply([PutService(key), PutReal(key, one, 1)])
    name, reader, writer = await greeted(harness, key)
    assert name == str(one)
    await backend.apply([PutReal(key, two, 1), PutReal(key, one, 0)])
    assert {await harness.hit(key) for _ in range(4)} == {two}
    await backend.apply([DeleteReal(key, one)])
    writer.write(b"still through one")
    async with asyncio.timeout(2):
        assert await reader.readexactly(17) == b"still through one"
    await backend.apply([DeleteService(key)])
    assert await harness.hit(key) is None  # nobody listens any more...
    writer.write(b"and now")
    async with asyncio.timeout(2):
        assert await reader.readexactly(7) == b"and now"  # ...but this one carries on
    writer.write_eof()
    async with asyncio.timeout(2):
        assert await reader.read() == b""
    writer.close()


# -- bulk data and flow control ------------------------------------------------------------------


async def test_large_transfer_with_a_slow_reader_arrives_intact(
    harness: LoopbackHarness,
) -> None:
    """16 MiB echoed through the proxy to a reader that pauses: stalls, buffer reuse."""
    backend = await started(harness, settings_for(harness, buffer_size=16384))
    key = VirtualKey("tcp", harness.vip(1), 8080)
    await backend.apply([PutService(key), PutReal(key, harness.real(1), 1)])
    _, reader, writer = await greeted(harness, key)
    payload = os.urandom(1 << 20) * 16
    received = bytearray()

    async def read_slowly() -> None:
        while len(received) < len(payload):
            chunk = await reader.read(1 << 16)
            assert chunk, "closed early"
            received.extend(chunk)
            if len(received) % (1 << 20) < (1 << 16):
                await asyncio.sleep(0.01)

    async with asyncio.timeout(30):
        reading = asyncio.create_task(read_slowly())
        writer.write(payload)
        await writer.drain()
        await reading
    assert received == payload
    writer.close()


async def test_concurrent_stalled_transfers_keep_their_own_bytes(
    harness: LoopbackHarness,
) -> None:
    """Every read shares one spare buffer; a stalled write keeps the one it holds. Three
    connections echo distinct random data to slow readers at once: a buffer handed to
    two connections, or reused while a write held it, would mix their bytes."""
    backend = await started(harness, settings_for(harness, buffer_size=16384))
    key = VirtualKey("tcp", harness.vip(1), 8080)
    await backend.apply([PutService(key), PutReal(key, harness.real(1), 1)])

    async def echo_slowly(pause: float) -> None:
        _, reader, writer = await greeted(harness, key)
        payload = os.urandom(8 << 20)  # past what the sockets hold: the proxy's writes stall
        received = bytearray()

        async def read_slowly() -> None:
            while len(received) < len(payload):
                chunk = await reader.read(1 << 16)
                assert chunk, "closed early"
                received.extend(chunk)
                if len(received) % (1 << 20) < (1 << 16):
                    await asyncio.sleep(pause)

        reading = asyncio.create_task(read_slowly())
        writer.write(payload)
        await writer.drain()
        await reading
        writer.close()
        assert received == payload

    async with asyncio.timeout(30):
        await asyncio.gather(echo_slowly(0.01), echo_slowly(0.02), echo_slowly(0.03))
    assert backend.stats()["tcp_accepted"] == 3


async def test_published_port_listens_on_every_address() -> None:
    harness = LoopbackHarness(ProxySettings())  # publish_address 0.0.0.0, the default
    await harness.start_reals()
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        backend = await started(harness)
        key = VirtualKey("tcp", ANY_ADDRESS, port)
        await backend.apply([PutService(key), PutReal(key, harness.real(1), 1)])
        for address in ("127.0.0.1", f"{harness.net}.33"):
            async with asyncio.timeout(2):
                reader, writer = await asyncio.open_connection(address, port)
                assert (await reader.readline()).decode().strip() == str(harness.real(1))
            writer.close()
    finally:
        await harness.close()


async def test_a_port_it_cannot_take_is_reported_once_and_retried(
    harness: LoopbackHarness,
) -> None:
    from lb.backend import BackendError

    backend = await started(harness)
    blocker = socket.socket()  # someone else's listener, without SO_REUSEPORT
    blocker.bind((harness.vip(4), 0))
    blocker.listen(1)
    taken = VirtualKey("tcp", harness.vip(4), blocker.getsockname()[1])
    try:
        with pytest.raises(BackendError, match=str(taken)):
            await backend.apply([PutService(taken)])
        assert taken not in await backend.read()
        # Its reals are still followed, without an error per task change.
        await backend.apply(
            [
                PutReal(taken, harness.real(1), 1),
                PutReal(taken, harness.real(2), 1),
                DeleteReal(taken, harness.real(2)),
            ]
        )
        assert backend.stats()["unbound"] == 1
        assert str(taken) in backend.unbound()
    finally:
        blocker.close()
    await backend.apply([PutService(taken)])  # the next PutService tries again
    assert (await backend.read())[taken].reals == {harness.real(1): 1}
    assert await harness.hit(taken) == harness.real(1)
    assert backend.stats()["unbound"] == 0


async def test_retry_unbound_listens_once_the_port_is_free_and_keeps_the_first_reason(
    harness: LoopbackHarness,
) -> None:
    from lb.backend import BackendError

    backend = await started(harness)
    blocker = socket.socket()
    blocker.bind((harness.vip(5), 0))
    blocker.listen(1)
    taken = VirtualKey("tcp", harness.vip(5), blocker.getsockname()[1])
    try:
        with pytest.raises(BackendError):
            await backend.apply([PutService(taken), PutReal(taken, harness.real(1), 1)])
        reported = backend.unbound()[str(taken)]
        assert reported.startswith(f"cannot listen on {harness.vip(5)}:{taken.port}: ")
        assert await backend.retry_unbound() == []  # still held: the same reason stands
        assert backend.unbound() == {str(taken): reported}
    finally:
        blocker.close()
    assert await backend.retry_unbound() == [taken]
    assert backend.unbound() == {}
    assert (await backend.read())[taken].reals == {harness.real(1): 1}
    assert await harness.hit(taken) == harness.real(1)
    assert await backend.retry_unbound() == []  # nothing left to try


# -- the hot path's Python, counted (docs/performance.md: L4 userspace) -------------------------

USERSPACE = str(Path(lb_userspace_file).resolve().parent)


class ProxyCalls:
    """Counts calls into the proxy's own Python (lb/userspace), by function: a figure
    that does not depend on the machine's speed or load."""

    def __init__(self) -> None:
        self.where: Counter[str] = Counter()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(USERSPACE):
            self.where[f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"] += 1

    @property
    def calls(self) -> int:
        return sum(self.where.values())


async def test_a_relayed_read_is_two_python_callbacks(harness: LoopbackHarness) -> None:
    """Keep-alive: each read is get_buffer + buffer_updated, into the one spare buffer
    (no call to take or give a buffer back, nothing allocated for it)."""
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    await backend.apply([PutService(key), PutReal(key, harness.real(1), 1)])
    _, reader, writer = await greeted(harness, key)
    exchanges = 50
    counter = ProxyCalls()
    sys.setprofile(counter)
    try:
        for _ in range(exchanges):
            writer.write(b"ping\n")
            assert await asyncio.wait_for(reader.readexactly(5), 2) == b"ping\n"
    finally:
        sys.setprofile(None)
    writer.close()
    per_exchange = counter.calls / exchanges
    print(
        f"lb/userspace Python calls per echoed exchange: {per_exchange:.2f} {dict(counter.where)}"
    )
    # Two reads (one each way), two callbacks each; the base made four each.
    assert per_exchange <= 4, counter.where


async def test_a_new_connection_takes_a_bounded_number_of_python_calls(
    harness: LoopbackHarness,
) -> None:
    """Accept, pick, connect, relay, pass the close on: the proxy's Python per connection
    (the base made about 50 calls; the budget in docs/performance.md is 31)."""
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    await backend.apply([PutService(key), PutReal(key, harness.real(1), 1)])
    _, _, warm = await greeted(harness, key)  # the first connection builds what is cached
    connections = 20
    counter = ProxyCalls()
    sys.setprofile(counter)
    try:
        for _ in range(connections):
            _, reader, writer = await greeted(harness, key)
            writer.write_eof()  # the echo closes at our EOF: both ways end
            assert await asyncio.wait_for(reader.read(), 2) == b""
            writer.close()
            await writer.wait_closed()
        for _ in range(100):  # the proxy sees the closes (the warm one stays open)
            if backend.stats()["open"] == 1:
                break
            await asyncio.sleep(0.02)
    finally:
        sys.setprofile(None)
    assert backend.stats()["open"] == 1
    warm.close()
    per_connection = counter.calls / connections
    print(f"lb/userspace Python calls per connection: {per_connection:.1f} {dict(counter.where)}")
    assert per_connection <= 36, counter.where

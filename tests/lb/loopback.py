"""Real servers and clients on loopback for the userspace backend's tests.

Every harness takes its own random 127.a.b.0/24 (all of 127/8 is on `lo`), so
its VIPs, reals and publish address never meet another test's or another
program's: VIPs are .10+, reals .100+, the publish address .1.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Awaitable, Callable

from lb.backend import Backend
from lb.table import ANY_ADDRESS, Real, VirtualKey
from lb.userspace import ProxySettings, UserspaceBackend
from tests.lb.held import HeldConnection

REAL_PORT = 9000
TIMEOUT = 2.0

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def greeting_echo(name: str) -> Handler:
    """Say `name` on connect, then echo everything until the client's EOF."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(f"{name}\n".encode())
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return handle


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(self.name, addr)


class LoopbackHarness:
    def __init__(self, settings: ProxySettings | None = None) -> None:
        self.net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}"
        self.settings = settings or ProxySettings(publish_address=f"{self.net}.1")
        self.servers: list[asyncio.AbstractServer] = []
        self.transports: list[asyncio.BaseTransport] = []
        self.backends: list[UserspaceBackend] = []
        self._foreign: socket.socket | None = None

    async def new_backend(self) -> Backend:
        backend = UserspaceBackend(self.settings)
        self.backends.append(backend)
        return backend

    def vip(self, index: int) -> str:
        return f"{self.net}.{10 + index}"

    def address_of(self, key: VirtualKey) -> str:
        return self.settings.publish_address if key.address == ANY_ADDRESS else key.address

    def real(self, index: int, protocol: str = "tcp") -> Real:
        return Real(f"{self.net}.{100 + index}", REAL_PORT)

    async def serve(self, real: Real, handler: Handler | None = None) -> asyncio.AbstractServer:
        server = await asyncio.start_server(
            handler or greeting_echo(str(real)), real.address, real.port, reuse_address=True
        )
        self.servers.append(server)
        return server

    async def serve_udp(self, real: Real) -> None:
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: UdpEcho(str(real)), local_addr=(real.address, real.port)
        )
        self.transports.append(transport)

    async def start_reals(self) -> None:
        for index in (1, 2, 3):
            await self.serve(self.real(index))
            await self.serve_udp(self.real(index, "udp"))

    async def hit(self, key: VirtualKey) -> Real | None:
        if key.protocol == "udp":
            return await self._hit_udp(key)
        try:
            async with asyncio.timeout(TIMEOUT):
                reader, writer = await asyncio.open_connection(self.address_of(key), key.port)
                try:
                    line = await reader.readline()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return None
        return _as_real(line)

    async def _hit_udp(self, key: VirtualKey) -> Real | None:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect((self.address_of(key), key.port))
            try:
                await loop.sock_sendall(sock, b"ping")
                async with asyncio.timeout(1.0):
                    data = await loop.sock_recv(sock, 2048)
            except (OSError, TimeoutError):
                return None
        return _as_real(data)

    async def hold(self, key: VirtualKey) -> HeldConnection:
        """A TCP connection through `key`, kept open (weights_suite)."""
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(self.address_of(key), key.port)
            real = _as_real(await reader.readline())
        if real is None:
            writer.close()
            raise ConnectionError(f"{key}: no greeting")
        return HeldConnection(real, reader, writer)

    async def make_foreign(self) -> None:
        # Someone else's listener on an address of ours, on a port we do not use.
        sock = socket.socket()
        sock.bind((self.vip(1), 8081))
        sock.listen(4)
        self._foreign = sock

    async def foreign_intact(self) -> bool:
        if self._foreign is None:
            return False
        try:
            async with asyncio.timeout(TIMEOUT):
                _, writer = await asyncio.open_connection(self.vip(1), 8081)
            writer.close()
            return True
        except (OSError, TimeoutError):
            return False

    async def close(self) -> None:
        for backend in self.backends:
            await backend.close()
        for server in self.servers:
            server.close()
        for transport in self.transports:
            transport.close()
        if self._foreign is not None:
            self._foreign.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await server.wait_closed()


# -- shortcuts for the proxy's own tests ------------------------------------------------


async def started(
    harness: LoopbackHarness,
    settings: ProxySettings | None = None,
) -> UserspaceBackend:
    if settings is not None:
        harness.settings = settings
    backend = await harness.new_backend()
    assert isinstance(backend, UserspaceBackend)
    await backend.start({})
    return backend


async def connect(
    harness: LoopbackHarness,
    key: VirtualKey,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(2):
        return await asyncio.open_connection(harness.address_of(key), key.port)


async def greeted(
    harness: LoopbackHarness,
    key: VirtualKey,
) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await connect(harness, key)
    async with asyncio.timeout(2):
        line = await reader.readline()
    return line.decode().strip(), reader, writer


def settings_for(harness: LoopbackHarness, **changes: object) -> ProxySettings:
    return ProxySettings(publish_address=harness.settings.publish_address, **changes)  # type: ignore[arg-type]


def _as_real(data: bytes) -> Real | None:
    text = data.decode(errors="replace").strip()
    if ":" not in text:
        return None
    address, _, port = text.rpartition(":")
    return Real(address, int(port)) if port.isdigit() else None

"""Pieces of the IPVS kernel tests' lab: echo servers, entering a namespace, raw IPVS.

Used by tests/kernel/test_ipvs_backend.py (which runs inside the ipvs-vm).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator

from pyroute2.ipvs import AsyncIPVS, IPVSService

from lb.ipvs.backend import DEFAULT_DEVICE, DEFAULT_NFT_TABLE
from tests.helpers.netns import NETNS_RUN, Netns, _setns


class EchoServers:
    """TCP and UDP servers in `ns` that answer with their own "addr:port", on one thread.

    A TCP connection gets the answer at once and again for every chunk it sends, until
    it closes: tests can hold a connection open and check it still reaches its server."""

    LISTEN, DATAGRAM, CONNECTION = "listen", "datagram", "connection"

    def __init__(self, ns: Netns, addresses: list[str], port: int) -> None:
        self._selector = selectors.DefaultSelector()
        self._sockets: list[socket.socket] = []
        for address in addresses:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                sock = ns.socket(kind=kind, bind=(address, port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(64)
                sock.setblocking(False)
                role = self.LISTEN if kind == socket.SOCK_STREAM else self.DATAGRAM
                self._selector.register(sock, selectors.EVENT_READ, role)
                self._sockets.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="echo", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.2):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                me = "{}:{}".format(*sock.getsockname()).encode()
                try:
                    if key.data == self.LISTEN:
                        conn, _ = sock.accept()
                        conn.sendall(me)
                        conn.setblocking(False)
                        self._selector.register(conn, selectors.EVENT_READ, self.CONNECTION)
                    elif key.data == self.CONNECTION:
                        if sock.recv(512):
                            sock.sendall(me)
                        else:
                            self._selector.unregister(sock)
                            sock.close()
                    else:
                        _, peer = sock.recvfrom(512)
                        sock.sendto(me, peer)
                except OSError:
                    if key.data == self.CONNECTION:
                        self._selector.unregister(sock)
                        sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()


@contextlib.contextmanager
def inside(ns: Netns) -> Iterator[None]:
    """This thread (the event loop's) in `ns`: sockets, sysctls and `nft` act there."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(NETNS_RUN / ns.name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


@contextlib.asynccontextmanager
async def raw_ipvs() -> AsyncIterator[AsyncIPVS]:
    """pyroute2's own IPVS socket: the tests' view of the kernel, apart from the adapter."""
    async with AsyncIPVS() as ipvs:
        await ipvs.setup_endpoint()
        yield ipvs


async def flush_ipvs() -> None:
    """Between tests: no IPVS service, no device or table of the backend is left."""
    async with raw_ipvs() as ipvs:
        for found in await ipvs.service("dump"):
            await ipvs.service("del", service=IPVSService.from_message(found))


def remove_device_and_table() -> None:
    subprocess.run(["ip", "link", "del", DEFAULT_DEVICE], capture_output=True, check=False)
    subprocess.run(
        ["nft", "delete", "table", "ip", DEFAULT_NFT_TABLE], capture_output=True, check=False
    )

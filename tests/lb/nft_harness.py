"""The nftables backend tests' harness: namespaces, echo servers, clients.

Topology (fresh per test, removed afterwards):

    client 10.77.1.2 ─┐                       ┌─ reals 10.77.2.2, .3, .4 (default via node)
    peer   10.77.1.3 ─┼─ bridge ─ 10.77.1.1 node 10.77.2.1 ─┘
                      │            lo: 10.77.3.1 (a local real); route 10.77.100/24 (VIPs)
                      └ (in a `switch` namespace)

The backend programs the node namespace: its nft commands run with `ip netns
exec` (the backend's `netns` argument), its conntrack socket is opened there.
That keeps every test off the host's own ruleset and lets each one start from a
clean kernel state, while the backend's code is exactly what an agent runs (an
agent leaves `netns` at None). Clients are real sockets made inside the client
namespace; the echo servers are real sockets made inside the reals' namespaces
and answer `<their addr:port> <peer address>`, so a test sees both which real
answered and what client address the real saw.

The client's default route is the node, the reals behind the node route back
through it (so their flows keep the client's address), and `peer` is another
node on the client's network that routes nothing (so a real there needs the
masquerade: the routing mesh's cross-node path).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from lb.backend import Backend
from lb.nft import NftablesBackend
from lb.table import Real, VirtualKey
from tests.helpers.netns import Lab, Netns, unavailable
from tests.lb.held import HeldConnection

NODE, CLIENT, PEER = "10.77.1.1", "10.77.1.2", "10.77.1.3"
BEHIND = ["10.77.2.2", "10.77.2.3", "10.77.2.4"]  # reals behind the node
LOCAL = "10.77.3.1"  # a real on the node itself
PORT = 7001
#: real(index) -> address: 1, 2 and 4 behind the node, 3 on the node, 5 on the peer
REALS = {1: BEHIND[0], 2: BEHIND[1], 3: LOCAL, 4: BEHIND[2], 5: PEER}
TIMEOUT = 2.0  # generous: CI shares two cores; only "no answer" cases wait it out


def skip_reason() -> str | None:
    reason = unavailable()
    if reason is None and shutil.which("nft") is None:
        reason = "nft (package nftables) is not installed"
    return reason


@dataclass
class Answer:
    real: Real
    peer: str


@dataclass
class NftHarness:
    lab: Lab
    node: Netns
    client: Netns
    peer: Netns
    reals: Netns
    servers: list[asyncio.AbstractServer | asyncio.BaseTransport] = field(default_factory=list)
    backends: list[NftablesBackend] = field(default_factory=list)

    # -- the suite's Harness ---------------------------------------------------------

    async def new_backend(self) -> Backend:
        backend = NftablesBackend(netns=self.node.name)
        self.backends.append(backend)
        return backend

    def vip(self, index: int) -> str:
        return f"10.77.100.{index}"

    def real(self, index: int, protocol: str = "tcp") -> Real:
        return Real(REALS[index], PORT)

    async def hit(self, key: VirtualKey) -> Real | None:
        answer = await self.ask(key)
        return None if answer is None else answer.real

    async def make_foreign(self) -> None:
        self.node.run(["nft", "-f", "-"], input=FOREIGN)
        self._foreign = self._list_foreign()

    async def foreign_intact(self) -> bool:
        return self._list_foreign() == self._foreign

    def _list_foreign(self) -> str:
        return "".join(
            self.node.run(["nft", "list", "table", *t]).stdout
            for t in (("inet", "meshplane"), ("ip", "meshplane_other"))
        )

    # -- clients -----------------------------------------------------------------------

    def target(self, key: VirtualKey, at: str | None = None) -> tuple[str, int]:
        return (at or (NODE if key.published else key.address), key.port)

    async def ask(
        self, key: VirtualKey, *, ns: Netns | None = None, at: str | None = None
    ) -> Answer | None:
        """One new connection (TCP) or datagram from a fresh socket (UDP), to `at` if given."""
        ns = ns or self.client
        if key.protocol == "udp":
            sock = ns.socket(kind=socket.SOCK_DGRAM)
            with sock:
                return await udp_ask(sock, self.target(key, at))
        try:
            stream = await self.connect(key, ns=ns, at=at)
        except (OSError, TimeoutError):
            return None
        answer, _, writer = stream
        writer.close()
        return answer

    async def connect(
        self, key: VirtualKey, *, ns: Netns | None = None, at: str | None = None
    ) -> tuple[Answer, asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection through `key`, kept open: its greeting, reader and writer."""
        sock = (ns or self.client).socket(kind=socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, self.target(key, at)), TIMEOUT
            )
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        except BaseException:
            writer.close()
            raise
        answer = parse_greeting(line)
        if answer is None:
            writer.close()
            raise ConnectionError(f"no greeting: {line!r}")
        return answer, reader, writer

    async def hold(self, key: VirtualKey) -> HeldConnection:
        """A TCP connection through `key` from the client, kept open (weights_suite)."""
        answer, reader, writer = await self.connect(key)
        return HeldConnection(answer.real, reader, writer)

    # -- servers -------------------------------------------------------------------------

    async def serve(self, ns: Netns, address: str, port: int = PORT) -> None:
        real = Real(address, port)
        listener = ns.socket(kind=socket.SOCK_STREAM, bind=(address, port))
        listener.listen(64)
        listener.setblocking(False)
        self.servers.append(await asyncio.start_server(tcp_echo(real), sock=listener))
        udp = ns.socket(kind=socket.SOCK_DGRAM, bind=(address, port))
        udp.setblocking(False)
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: UdpEcho(real), sock=udp
        )
        self.servers.append(transport)

    async def close(self) -> None:
        for backend in self.backends:
            with contextlib.suppress(Exception):
                await backend.close()
        for server in self.servers:
            server.close()
        for server in self.servers:
            if isinstance(server, asyncio.AbstractServer):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), TIMEOUT)


FOREIGN = """
table inet meshplane {
    map vips { type ipv4_addr . inet_proto . inet_service : verdict ; }
    chain prerouting { type nat hook prerouting priority dstnat ; policy accept ; }
    chain output { type nat hook output priority -100 ; policy accept ; }
}
table ip meshplane_other {
    map vips { type ipv4_addr . inet_proto . inet_service : verdict ; }
    map slots_tcp_10_77_100_1_8080 { type mark : ipv4_addr ; }
    chain svc_tcp_10_77_100_1_8080 { }
    chain prerouting {
        type nat hook prerouting priority dstnat + 10 ; policy accept ;
        tcp dport 9999 dnat to 10.77.2.2:7001
        tcp dport 9998 dnat to 10.77.1.3:7001
    }
}
"""


def parse_greeting(line: bytes) -> Answer | None:
    words = line.decode(errors="replace").split()
    if len(words) != 2 or ":" not in words[0]:
        return None
    address, port = words[0].rsplit(":", 1)
    return Answer(Real(address, int(port)), words[1])


def tcp_echo(
    real: Real,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], asyncio.Future[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        try:
            writer.write(f"{real} {peer}\n".encode())
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    return handle  # type: ignore[return-value]


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, real: Real) -> None:
        self.real = real
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (asyncio's selector datagram transport does not subclass DatagramTransport)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(f"{self.real} {addr[0]}\n".encode(), addr)


async def udp_ask(sock: socket.socket, target: tuple[str, int]) -> Answer | None:
    """Send one datagram from `sock` (its source port kept) and read the answer."""
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, b"?", target)
    try:
        data = await asyncio.wait_for(loop.sock_recv(sock, 512), TIMEOUT)
    except (TimeoutError, OSError):
        return None
    return parse_greeting(data)


def build(lab: Lab) -> NftHarness:
    switch = lab.namespace("switch")
    node, client, peer, reals = (
        lab.namespace(role) for role in ("node", "client", "peer", "reals")
    )
    bridge = lab.bridge(switch)
    for ns, address in ((node, NODE), (client, CLIENT), (peer, PEER)):
        port = lab.device_name("p")
        lab.veth(ns, "eth0", switch, port)
        switch.ip("link", "set", port, "master", bridge)
        ns.add_address("eth0", f"{address}/24")
    client.ip("route", "add", "default", "via", NODE)
    lab.veth(node, "r0", reals, "eth0")
    node.add_address("r0", "10.77.2.1/24")
    for address in BEHIND:
        reals.add_address("eth0", f"{address}/24")
    reals.ip("route", "add", "default", "via", "10.77.2.1")
    node.add_address("lo", f"{LOCAL}/32")
    # VIPs need a route for the node's own clients to send to them at all
    # (the nat output hook comes after the route lookup of connect()).
    node.ip("route", "add", "10.77.100.0/24", "dev", "lo", "src", LOCAL)
    return NftHarness(lab, node, client, peer, reals)

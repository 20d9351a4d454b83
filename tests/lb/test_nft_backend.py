"""The nftables backend on a real kernel, in network namespaces made per test.

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
import logging
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest

from lb.backend import Backend
from lb.nft import NftablesBackend
from lb.table import (
    ANY_ADDRESS,
    DeleteReal,
    PutReal,
    PutService,
    Real,
    Scheduler,
    ServiceOptions,
    VirtualKey,
    VirtualService,
)
from tests.helpers.netns import Lab, Netns, unavailable
from tests.lb.backend_suite import BackendSuite, spread

pytestmark = [pytest.mark.root]

NODE, CLIENT, PEER = "10.77.1.1", "10.77.1.2", "10.77.1.3"
BEHIND = ["10.77.2.2", "10.77.2.3", "10.77.2.4"]  # reals behind the node
LOCAL = "10.77.3.1"  # a real on the node itself
PORT = 7001
#: real(index) -> address: 1, 2 and 4 behind the node, 3 on the node, 5 on the peer
REALS = {1: BEHIND[0], 2: BEHIND[1], 3: LOCAL, 4: BEHIND[2], 5: PEER}
TIMEOUT = 2.0  # generous: CI shares two cores; only "no answer" cases wait it out


def _skip_reason() -> str | None:
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
        return "".join(self.node.run(["nft", "list", "table", *t]).stdout
                       for t in (("inet", "meshplane"), ("ip", "meshplane_other")))

    # -- clients -----------------------------------------------------------------------

    def target(self, key: VirtualKey, at: str | None = None) -> tuple[str, int]:
        return (at or (NODE if key.published else key.address), key.port)

    async def ask(self, key: VirtualKey, *, ns: Netns | None = None,
                  at: str | None = None) -> Answer | None:
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

    async def connect(self, key: VirtualKey, *, ns: Netns | None = None, at: str | None = None
                      ) -> tuple[Answer, asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection through `key`, kept open: its greeting, reader and writer."""
        sock = (ns or self.client).socket(kind=socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
                sock, self.target(key, at)), TIMEOUT)
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
            lambda: UdpEcho(real), sock=udp)
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
    }
}
"""


def parse_greeting(line: bytes) -> Answer | None:
    words = line.decode(errors="replace").split()
    if len(words) != 2 or ":" not in words[0]:
        return None
    address, port = words[0].rsplit(":", 1)
    return Answer(Real(address, int(port)), words[1])


def tcp_echo(real: Real) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                     asyncio.Future[None]]:
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
    node, client, peer, reals = (lab.namespace(role) for role in ("node", "client", "peer",
                                                                     "reals"))
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


@pytest.fixture
async def harness() -> AsyncIterator[NftHarness]:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with Lab("mpnft") as lab:
        made = build(lab)
        try:
            for address in BEHIND:
                await made.serve(made.reals, address)
            await made.serve(made.node, LOCAL)
            await made.serve(made.peer, PEER)
            yield made
        finally:
            await made.close()


class TestNftablesBackendSuite(BackendSuite):
    """The shared suite, against the kernel in the node namespace."""


# -- what only a kernel backend has to show -----------------------------------------------


async def started(harness: NftHarness) -> NftablesBackend:
    backend = await harness.new_backend()
    await backend.start({})
    assert isinstance(backend, NftablesBackend)
    return backend


async def test_established_tcp_flow_survives_changes_to_other_reals(
        harness: NftHarness) -> None:
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    a, b, c = harness.real(1), harness.real(2), harness.real(4)
    await backend.apply([PutService(key), PutReal(key, a, 1), PutReal(key, b, 1)])
    streams = [await harness.connect(key) for _ in range(2)]  # round robin: one each
    (_, reader, writer), = [s for s in streams if s[0].real == a]
    await backend.apply([DeleteReal(key, b), PutReal(key, c, 1)])
    writer.write(b"still there?\n")
    assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"still there?\n"
    assert set(await spread(harness, key, 6)) == {a, c}
    for _, _, w in streams:
        w.close()


async def test_removed_real_loses_its_udp_flow_a_draining_one_keeps_it(
        harness: NftHarness) -> None:
    backend = await started(harness)
    key = VirtualKey("udp", harness.vip(2), 5353)
    a, b = harness.real(1), harness.real(2)
    await backend.apply([PutService(key), PutReal(key, a, 1)])
    flow = harness.client.socket(kind=socket.SOCK_DGRAM)  # one source port: one conntrack flow
    with flow:
        assert (await udp_ask(flow, harness.target(key))).real == a  # type: ignore[union-attr]
        # Draining (weight 0): the flow conntrack holds goes on to `a`.
        await backend.apply([PutReal(key, b, 1), PutReal(key, a, 0)])
        assert (await udp_ask(flow, harness.target(key))).real == a  # type: ignore[union-attr]
        # Removed: its conntrack entry is flushed, so the same flow now reaches `b`
        # (the echo server on `a` still runs: only the flush keeps it from answering).
        await backend.apply([DeleteReal(key, a)])
        assert (await udp_ask(flow, harness.target(key))).real == b  # type: ignore[union-attr]


async def test_client_address_is_kept_when_the_real_routes_back_through_the_node(
        harness: NftHarness) -> None:
    backend = await started(harness)
    vip = VirtualKey("tcp", harness.vip(1), 8080)
    published = VirtualKey("tcp", ANY_ADDRESS, 30080)
    await backend.apply([PutService(vip), PutReal(vip, harness.real(1), 1),
                         PutService(published), PutReal(published, harness.real(2), 1)])
    for key in (vip, published):
        answer = await harness.ask(key)
        assert answer is not None, key
        assert answer.peer == CLIENT, f"{key}: the real saw {answer.peer}, not the client"


async def test_routing_mesh_published_port_to_a_task_on_another_node(
        harness: NftHarness) -> None:
    """Client -> this node's address:published -> DNAT to a task on `peer`, reply back.

    `peer` sits on the client's own network and would answer the client directly;
    only the masquerade brings the reply back through the node to be un-DNATed.
    """
    backend = await started(harness)
    key = VirtualKey("tcp", ANY_ADDRESS, 30081)
    udp = VirtualKey("udp", ANY_ADDRESS, 30081)
    remote = harness.real(5)
    await backend.apply([PutService(key), PutReal(key, remote, 1),
                         PutService(udp), PutReal(udp, remote, 1)])
    for service in (key, udp):
        answer = await harness.ask(service)
        assert answer is not None, f"{service}: no answer through the routing mesh"
        assert answer.real == remote
        assert answer.peer == NODE, f"{service}: masqueraded to the node, saw {answer.peer}"


async def test_the_nodes_own_processes_reach_vips_and_published_ports(
        harness: NftHarness) -> None:
    backend = await started(harness)
    vip = VirtualKey("tcp", harness.vip(3), 8080)
    published = VirtualKey("tcp", ANY_ADDRESS, 30082)
    await backend.apply([PutService(vip), PutReal(vip, harness.real(1), 1),
                         PutService(published), PutReal(published, harness.real(5), 1),
                         PutReal(published, harness.real(3), 1)])
    assert (await harness.ask(vip, ns=harness.node)).real == harness.real(1)  # type: ignore[union-attr]
    seen = {(await harness.ask(published, ns=harness.node)).real  # type: ignore[union-attr]
            for _ in range(4)}
    assert seen == {harness.real(5), harness.real(3)}


async def test_least_connections_is_accepted_logged_once_and_runs_round_robin(
        harness: NftHarness, caplog: pytest.LogCaptureFixture) -> None:
    backend = await started(harness)
    lc = ServiceOptions(Scheduler.LEAST_CONNECTIONS)
    one, two = VirtualKey("tcp", harness.vip(1), 8080), VirtualKey("tcp", harness.vip(2), 8080)
    with caplog.at_level(logging.WARNING, logger="lb.nft.backend"):
        await backend.apply([PutService(one, lc), PutService(two, lc),
                             PutReal(one, harness.real(1), 1), PutReal(one, harness.real(2), 1)])
    assert sum("least connections" in r.message for r in caplog.records) == 1
    assert (await backend.read())[one].options == lc
    seen = await spread(harness, one, 6)
    assert seen == {harness.real(1): 3, harness.real(2): 3}


async def test_a_damaged_leftover_is_repaired_at_start(harness: NftHarness) -> None:
    first = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    one, two = harness.real(1), harness.real(2)
    await first.apply([PutService(key), PutReal(key, one, 1), PutReal(key, two, 1)])
    await first.abandon()
    # Someone deletes a slot by hand: the ring now has a hole the rule still counts.
    harness.node.run(["nft", "delete", "element", "ip", "meshplane",
                      "slots_tcp_10_77_100_1_8080", "{ 0 }"])
    second = await harness.new_backend()
    await second.start({key: VirtualService(key, ServiceOptions(), {one: 1, two: 1})})
    assert set(await spread(harness, key, 6)) == {one, two}
    assert (await second.read())[key].reals == {one: 1, two: 1}


async def test_restart_keeps_established_flows_of_matching_reals(harness: NftHarness) -> None:
    first = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    one = harness.real(1)
    await first.apply([PutService(key), PutReal(key, one, 1)])
    answer, reader, writer = await harness.connect(key)
    await first.abandon()
    second = await harness.new_backend()
    await second.start(await first.read())
    writer.write(b"after restart\n")
    assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"after restart\n"
    writer.close()
    assert answer.real == one


async def test_published_port_at_localhost_and_route_localnet_put_back_at_close(
        harness: NftHarness) -> None:
    def localnet() -> str:
        return harness.node.run(["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip()

    assert localnet() == "0"
    first = await started(harness)
    key = VirtualKey("tcp", ANY_ADDRESS, 30083)
    udp = VirtualKey("udp", ANY_ADDRESS, 30083)
    await first.apply([PutService(key), PutReal(key, harness.real(5), 1),
                       PutService(udp), PutReal(udp, harness.real(5), 1)])
    for service in (key, udp):
        answer = await harness.ask(service, ns=harness.node, at="127.0.0.1")
        assert answer is not None and answer.real == harness.real(5), service
    assert localnet() == "1"
    # A crash and a restart: the value from before the first start is still known.
    await first.abandon()
    second = await started(harness)
    await second.close()
    assert localnet() == "0"


async def test_without_localhost_route_localnet_is_left_alone(harness: NftHarness) -> None:
    backend = NftablesBackend(netns=harness.node.name, localhost=False)
    harness.backends.append(backend)
    await backend.start({})
    assert harness.node.run(["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]
                            ).stdout.strip() == "0"
    listing = harness.node.run(["nft", "list", "chain", "ip", "meshplane", "guard"]).stdout
    assert "drop" not in listing


async def test_only_draining_reals_refuse_new_connections_at_once_old_ones_go_on(
        harness: NftHarness) -> None:
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    one = harness.real(1)
    await backend.apply([PutService(key), PutReal(key, one, 1)])
    _, reader, writer = await harness.connect(key)
    await backend.apply([PutReal(key, one, 0)])
    with pytest.raises(ConnectionRefusedError):  # the reject rule, not a black hole
        await harness.connect(key)
    writer.write(b"draining\n")
    assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"draining\n"
    writer.close()


async def test_a_bad_op_is_reported_and_the_others_in_its_batch_are_programmed(
        harness: NftHarness) -> None:
    from lb.backend import BackendError

    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    bad = VirtualKey("tcp", "10.77.100.300", 8080)
    with pytest.raises(BackendError, match=r"10\.77\.100\.300.*; .*weight 9999"):
        await backend.apply([PutService(bad), PutService(key), PutReal(key, harness.real(1), 1),
                             PutReal(key, Real("10.77.2.2", 7001), 9999)])
    assert await backend.read() == {key: VirtualService(key, ServiceOptions(),
                                                        {harness.real(1): 1})}
    assert await harness.hit(key) == harness.real(1)


async def test_a_real_on_the_published_port_itself_is_not_balanced_again(
        harness: NftHarness) -> None:
    """A task on the node's address with the published port as its own port keeps it.

    Otherwise a flow DNATed to it from another node would be balanced a second
    time on arrival (and could bounce between nodes).
    """
    key = VirtualKey("tcp", ANY_ADDRESS, 30084)
    on_node = Real(NODE, key.port)
    await harness.serve(harness.node, NODE, key.port)
    backend = await started(harness)
    await backend.apply([PutService(key), PutReal(key, on_node, 1),
                         PutReal(key, harness.real(5), 1)])
    assert set(await spread(harness, key, 4)) == {on_node}
    # Through another address of the node the port is balanced as usual.
    seen = {(await harness.ask(key, at="10.77.2.1")).real for _ in range(4)}  # type: ignore[union-attr]
    assert seen == {on_node, harness.real(5)}

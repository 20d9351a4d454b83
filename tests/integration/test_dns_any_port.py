"""`dns.server.serve` on port 0 finds a port free for both UDP and TCP.

The kernel picks the UDP port; TCP must take the same one, and another socket
may hold it for TCP. Seen in CI as a rare EADDRINUSE when tests start DNS
services on port 0 while other tests open sockets.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

import dns.server
from dns.responder import Responder
from dns.server import serve
from dns.table import NameTable


async def refuse(query: bytes, tcp: bool) -> bytes:
    raise AssertionError("nothing is forwarded in these tests")


@pytest.fixture
def tcp_holder() -> Iterator[socket.socket]:
    """A TCP listener on a port whose UDP side is free: the trap serve() must step over."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held


async def test_port_0_steps_over_a_port_taken_for_tcp(
    tcp_holder: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = tcp_holder.getsockname()[1]
    real_udp_socket = dns.server.udp_socket
    handed: list[int] = []

    def first_the_taken_port(host: str, port: int, reuse_port: bool) -> socket.socket:
        # The first UDP socket lands on the port TCP cannot have, as the kernel may do.
        sock = real_udp_socket(host, taken if not handed else port, reuse_port)
        handed.append(sock.getsockname()[1])
        return sock

    monkeypatch.setattr(dns.server, "udp_socket", first_the_taken_port)
    udp, tcp, port = await serve(Responder(NameTable()), refuse, "127.0.0.1", 0)
    try:
        print(f"UDP ports handed out: {handed}; served on {port}")
        assert handed[0] == taken and port != taken
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # TCP answers on the chosen port
    finally:
        await udp.close()
        await tcp.close()


async def test_a_port_asked_for_by_number_fails_at_once(tcp_holder: socket.socket) -> None:
    taken = tcp_holder.getsockname()[1]
    with pytest.raises(OSError, match=r"in use|98"):
        await serve(Responder(NameTable()), refuse, "127.0.0.1", taken)

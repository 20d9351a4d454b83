"""Reading the unanswered DNATed flows from conntrack (lb/nft/unanswered.py; root).

In a namespace of its own: an nftables table DNATs two local ports, one to a
real nobody answers (an address on a veth pair with nobody at the other end),
one to a listener. A connect to each: only the first flow is read back as
unanswered, with its real; the answered one never is.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator

import pytest

from lb.nft.unanswered import UnansweredReader
from lb.table import Real, ServiceOptions, VirtualKey, VirtualService
from mesh.core.netns import entered

pytestmark = pytest.mark.root

LOCAL = "10.77.0.1"
DEAD = Real("10.77.0.2", 9000)
LIVE = Real(LOCAL, 9001)
RULES = f"""
table ip mpout {{
    chain output {{
        type nat hook output priority -100;
        tcp dport 30080 dnat to {DEAD.address}:{DEAD.port}
        tcp dport 30081 dnat to {LIVE.address}:{LIVE.port}
    }}
}}
"""


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    name = f"t19out-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        for command in (
            ["ip", "link", "set", "lo", "up"],
            # a link whose other end nobody listens on: ARP for the real goes unanswered
            ["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            ["ip", "link", "set", "v0", "up"],
            ["ip", "link", "set", "v1", "up"],
            ["ip", "addr", "add", f"{LOCAL}/24", "dev", "v0"],
            ["nft", "-f", "-"],
        ):
            subprocess.run(
                ["ip", "netns", "exec", name, *command],
                input=RULES if command[0] == "nft" else None,
                text=True,
                check=True,
                timeout=10,
            )
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=10)


def table() -> dict[VirtualKey, VirtualService]:
    out = {}
    for port, real in ((30080, DEAD), (30081, LIVE)):
        key = VirtualKey("tcp", "0.0.0.0", port)
        out[key] = VirtualService(key, ServiceOptions(), {real: 1})
    return out


def test_only_the_flow_nobody_answers_is_read(namespace: str) -> None:
    with entered(namespace):
        listener = socket.socket()
        listener.bind((LIVE.address, LIVE.port))
        listener.listen(8)
        live = socket.create_connection((LOCAL, 30081), timeout=2)
        dead = socket.socket()
        dead.setblocking(False)
        dead.connect_ex((LOCAL, 30080))
    try:
        found = asyncio.run(UnansweredReader(namespace).read(table()))
        print(f"\nunanswered: {found}")
        assert [f.real for f in found] == [DEAD]
        (flow,) = found
        assert flow.flow[2:] == (LOCAL, 30080)
        assert flow.flow[1] == dead.getsockname()[1]
        # a real not in the table is not read, whatever its flows
        assert asyncio.run(UnansweredReader(namespace).read({})) == []
        capped = UnansweredReader(namespace, cap=0)
        assert asyncio.run(capped.read(table())) == []
        assert capped.truncated == 1
    finally:
        for sock in (live, dead, listener):
            sock.close()

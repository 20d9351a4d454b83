"""A node namespace for network-driver tests (root only; nothing on the host).

Each test gets its own "node" namespace `t15drv-<pid>-<n>-node` where the
driver makes its bridges, veths and nftables table, an "outside" namespace
behind the node's uplink (node 10.99.0.1/24 -- 10.99.0.2/24 outside, which
routes the sandbox subnets back via the node, so what it sees as the source
shows the masquerade, and what keeps an internal network in is the node's
rules alone), and sandbox namespaces made by `Sandboxes` under a prefix
derived from the test's unique node name. `close()` removes all of them, also
after a failure: deleting the node namespace takes its bridges, veths and
table with it.

A lab for the overlay driver (`host=<n>`) gives its networks a VNI and this
node's own address on them (`host_address`, the subnet's `.n`), which its
sandboxes route by; for every other driver a sandbox routes by the gateway.

Traffic is real: `ping` and `curl` run inside namespaces with `nsenter --net`
(the way the CLI runs commands in a sandbox), TCP echo servers and clients are
real sockets opened inside a namespace with `mesh.core.netns.entered`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from mesh.core.netns import entered
from mesh.sandbox import names
from mesh.sandbox.driver import EndpointPlan, NetworkPlan
from mesh.sandbox.netns import Sandboxes

NODE_UPLINK, OUTSIDE = "10.99.0.1", "10.99.0.2"
HTTP_PORT, ECHO_PORT = 8080, 7007
TIMEOUT = 3.0  # generous: the machine is shared, for an answer that must come
#: for an answer that must not come: an answer on veths and bridges takes milliseconds
#: (a ping's own -W is 1 s too); waiting TIMEOUT for each cost CI 2 s a check
NO_ANSWER_WAIT = 1.0
_counter = itertools.count()


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft", "nsenter", "ping", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.returncode} {done.stderr.strip()}")
    return done


def in_netns(
    path: str, argv: Sequence[str], *, check: bool = False
) -> subprocess.CompletedProcess[str]:
    return run(["nsenter", f"--net={path}", "--", *argv], check=check)


def pings(path: str, address: str) -> bool:
    return in_netns(path, ["ping", "-c", "1", "-W", "1", "-q", address]).returncode == 0


def way_out(net: NetworkPlan) -> str:
    """The address a sandbox of the network routes by: the node's own on an overlay
    (the subnet's gateway is on no node there), else the gateway."""
    return net.host_address or net.gateway


@dataclass
class Lab:
    """A node, its outside, and its sandboxes; `close()` removes every one."""

    node_name: str = field(
        default_factory=lambda: f"t15drv-{os.getpid()}-{next(_counter)}-{secrets.token_hex(2)}"
    )
    servers: list[_Server] = field(default_factory=list)
    #: overlay: the node's own address on each network is the subnet's .<host>
    host: int | None = None

    def __post_init__(self) -> None:
        self.node = f"{self.node_name}-node"
        self.outside = f"{self.node_name}-out"
        self.node_path = names.netns_path(self.node)
        self.outside_path = names.netns_path(self.outside)
        self.prefix = names.netns_prefix(self.node_name)
        self.sandboxes = Sandboxes(self.prefix)
        self._namespaces: list[str] = []
        try:
            for ns in (self.node, self.outside):
                run(["ip", "netns", "add", ns])
                self._namespaces.append(ns)
                run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # the uplink is made inside the node namespace: nothing touches the host's
            run(["ip", "-n", self.node, "link", "add", "up0", "type", "veth",
                 "peer", "name", "up1", "netns", self.outside])  # fmt: skip
            run(["ip", "-n", self.node, "addr", "add", f"{NODE_UPLINK}/24", "dev", "up0"])
            run(["ip", "-n", self.outside, "addr", "add", f"{OUTSIDE}/24", "dev", "up1"])
            run(["ip", "-n", self.node, "link", "set", "up0", "up"])
            run(["ip", "-n", self.outside, "link", "set", "up1", "up"])
            # a way back to every sandbox subnet: what keeps an internal network in, or
            # shows a masquerade, is then the node's rules and nothing else
            run(["ip", "-n", self.outside, "route", "add", "10.210.0.0/16", "via", NODE_UPLINK])
        except BaseException:
            self.close()
            raise

    # -- plans ---------------------------------------------------------------------

    def network(
        self, index: int, *, internal: bool = False, options: dict[str, str] | None = None
    ) -> NetworkPlan:
        subnet = ipaddress.IPv4Network(f"10.210.{index}.0/24")
        host = None if self.host is None else str(subnet.network_address + self.host)
        return NetworkPlan(
            id=f"{index:02x}{secrets.token_hex(7)}",
            name=f"net{index}",
            subnet=str(subnet),
            gateway=str(subnet.network_address + 1),
            internal=internal,
            options=MappingProxyType(dict(options or {})),
            vni=0 if host is None else 4096 + index,
            host_address=host,
        )

    def endpoint(
        self, net: NetworkPlan, task_id: str, host: int, *, index: int = 0, route: bool = True
    ) -> EndpointPlan:
        subnet = ipaddress.IPv4Network(net.subnet)
        address = str(subnet.network_address + host)
        return EndpointPlan(
            task_id=task_id,
            index=index,
            address=address,
            prefixlen=subnet.prefixlen,
            mac=names.mac_of(address),
            interface=names.sandbox_interface(index),
            gateway=way_out(net) if route and not net.internal else None,
        )

    @staticmethod
    def task_id() -> str:
        return secrets.token_hex(6)

    def sandbox(self, task_id: str) -> str:
        """A new sandbox namespace of this node (a path)."""
        return self.sandboxes.create(f"{self.prefix}{task_id}")

    # -- traffic -------------------------------------------------------------------

    def echo_server(self, path: str, address: str, port: int = ECHO_PORT) -> None:
        """A TCP server inside `path` that answers each connection with the peer's address."""
        self.servers.append(_Server(path, address, port))

    def http_server(self, path: str, address: str, port: int = HTTP_PORT) -> None:
        """A one-line HTTP server inside `path` whose body is the client's address."""
        self.servers.append(_Server(path, address, port, http=True))

    def echo(
        self, path: str, address: str, port: int = ECHO_PORT, timeout: float = TIMEOUT
    ) -> str | None:
        """From inside `path`: connect, read the answer (the address the server saw)."""
        result: list[str | None] = [None]

        def client() -> None:
            with entered(path), socket.socket() as sock:
                sock.settimeout(timeout)
                try:
                    sock.connect((address, port))
                    result[0] = sock.recv(64).decode()
                except OSError:
                    result[0] = None

        thread = threading.Thread(target=client)
        thread.start()
        thread.join(timeout * 3)
        return result[0]

    def curl(self, path: str, url: str, timeout: float = TIMEOUT) -> str | None:
        done = in_netns(path, ["curl", "-s", "--max-time", str(timeout), url])
        return done.stdout if done.returncode == 0 else None

    # -- kernel views --------------------------------------------------------------

    def node_links(self) -> list[str]:
        done = run(["ip", "-n", self.node, "-o", "link", "show"])
        return [line.split(":")[1].strip().split("@")[0] for line in done.stdout.splitlines()]

    def node_tables(self) -> list[str]:
        return in_netns(self.node_path, ["nft", "list", "tables"], check=True).stdout.split("\n")

    def close(self) -> None:
        for server in self.servers:
            server.close()
        self.servers.clear()
        with contextlib.suppress(Exception):
            for name in self.sandboxes.list(self.prefix):
                self.sandboxes.delete(name)
        for ns in self._namespaces:
            run(["ip", "netns", "delete", ns], check=False)
        self._namespaces.clear()


class _Server:
    def __init__(self, path: str, address: str, port: int, *, http: bool = False) -> None:
        with entered(path):
            self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.http = http
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                body = peer[0]
                with contextlib.suppress(OSError):
                    if self.http:
                        conn.recv(4096)
                        conn.sendall(
                            b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(body), body.encode())
                        )
                    else:
                        conn.sendall(body.encode())

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()

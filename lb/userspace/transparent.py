"""The userspace proxy keeping the client's address: transparent connects (`traffic-policy=local`).

For a published port with `traffic-policy=local` the proxy connects to this
node's own task *from the client's address*: an `IP_TRANSPARENT` socket bound to
it (which needs CAP_NET_ADMIN), so the task's accept() sees the client, as on
the nftables backend. The task answers the client's address; those replies must
reach the proxy's socket, not the client. Three objects, made at the first such
service and removed at close:

- `SO_MARK` `SOCKET_MARK` on the proxy's transparent sockets;
- an nftables table (`ip meshplane_tproxy`): a packet leaving with that mark
  stamps its flow's conntrack mark with `REPLY_MARK`; a packet of the reply
  direction of such a flow gets `REPLY_MARK` as its packet mark, in `output`
  (a task on this node answering: a route chain, so the mark reroutes it) and in
  `prerouting` (a task behind this node, in a sandbox);
- a policy rule `fwmark REPLY_MARK lookup ROUTE_TABLE`, whose only route is
  `local 0.0.0.0/0 dev lo`: a marked reply is delivered here, where the kernel
  finds the transparent socket by its four-tuple.

Only the proxy's own flows are marked (by the socket mark), so a client that
reaches a task directly is untouched. TCP only: a UDP flow keeps the proxy's
address (the service says so as a problem, `lb.policy`).
"""

from __future__ import annotations

import asyncio
import logging
import socket

from lb.backend import BackendError

log = logging.getLogger(__name__)

#: Linux's IP_TRANSPARENT (Python's socket module has it only on some builds).
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
SO_MARK = getattr(socket, "SO_MARK", 36)
#: Far from the common marks (kube-proxy 0x4000/0x8000, Swarm's low ones, 0x2000).
SOCKET_MARK = 0x0010_0000
REPLY_MARK = 0x0020_0000
ROUTE_TABLE = 28016  # 0x6d70, "mp"
RULE_PRIORITY = 28016
NFT_TABLE = "meshplane_tproxy"


def nft_script(table: str = NFT_TABLE) -> str:
    ours = f"meta mark & {SOCKET_MARK:#x} == {SOCKET_MARK:#x}"
    reply = f"ct direction reply ct mark & {REPLY_MARK:#x} == {REPLY_MARK:#x}"
    mark = f"meta mark set meta mark | {REPLY_MARK:#x}"
    return "\n".join(
        [
            f"table ip {table} {{",
            "  chain output { type route hook output priority mangle; policy accept; }",
            "  chain prerouting { type filter hook prerouting priority mangle; policy accept; }",
            "}",
            f"flush chain ip {table} output",
            f"flush chain ip {table} prerouting",
            f"add rule ip {table} output {ours} ct mark set ct mark | {REPLY_MARK:#x}",
            f"add rule ip {table} output {reply} {mark}",
            f"add rule ip {table} prerouting {reply} {mark}",
            "",
        ]
    )


async def _run(argv: list[str], stdin: str | None = None, *, check: bool = True) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise BackendError(f"transparent proxying needs {argv[0]}: {exc}") from exc
    _, err = await asyncio.wait_for(proc.communicate(None if stdin is None else stdin.encode()), 30)
    if check and proc.returncode != 0:
        text = err.decode(errors="replace").strip()
        raise BackendError(f"{' '.join(argv[:3])}: {text.splitlines()[0] if text else '?'}")


class Transparency:
    """The return path of transparent connects: set up once, on first need."""

    def __init__(self) -> None:
        self.ready = False
        self._lock = asyncio.Lock()

    async def ensure(self) -> None:
        """Make the table, rule and route (idempotent); BackendError when refused."""
        async with self._lock:
            if self.ready:
                return
            await _run(["nft", "-f", "-"], nft_script())
            await self._remove_route(check=False)
            await _run(self._rule("add"))
            await _run(self._route("add"))
            self.ready = True

    async def close(self) -> None:
        async with self._lock:
            if not self.ready:
                return
            self.ready = False
            await self._remove_route(check=False)
            await _run(["nft", "delete", "table", "ip", NFT_TABLE], check=False)

    async def _remove_route(self, *, check: bool) -> None:
        await _run(self._rule("del"), check=check)
        await _run(self._route("del"), check=check)

    @staticmethod
    def _rule(verb: str) -> list[str]:
        return [
            "ip", "rule", verb, "fwmark", f"{REPLY_MARK:#x}/{REPLY_MARK:#x}",
            "lookup", str(ROUTE_TABLE), "priority", str(RULE_PRIORITY),
        ]  # fmt: skip

    @staticmethod
    def _route(verb: str) -> list[str]:
        return [
            "ip", "route", verb, "local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE),
        ]  # fmt: skip

    def socket_from(self, client: str) -> socket.socket:
        """A non-blocking TCP socket that connects from `client`'s address."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, SOCKET_MARK)
            sock.bind((client, 0))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

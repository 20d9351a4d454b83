"""The IPVS backend's own nftables table: fwmarks for published ports, masquerade.

A published port answers on every address of the node, which an IPVS
address service cannot express; so, as Swarm does, packets to a published
port on a local address are marked and an IPVS *fwmark* service takes them.
The marks are computed, not allocated (`published_mark`): base + protocol bit
+ port, so a restarted backend recognises its fwmark services from the mark
alone, with no state file, and the map below holds one element per published
port (adding or removing one is one element, never a rule rewrite).

Masquerade: IPVS in NAT mode rewrites only the destination; the reply must
come back through this host to be un-NATed. Real servers on other nodes would
answer the client directly, so (like Swarm's ingress SNAT) connections IPVS
forwards are masqueraded to this host's address: published ones by their mark,
VIP ones by their original destination being one of our VIPs (conntrack keeps
the original tuple; IPVS with vs/conntrack=1 only alters the reply side).

The table is driven through the `nft` command (one small transaction per
change): it is the interface nftables keeps stable, and pyroute2's nftables
module does not cover maps with concatenated keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from lb.backend import BackendError
from lb.table import Protocol

#: Default mark base: the low 17 bits carry protocol and port. Far from the
#: marks Swarm (256 upwards) and kube-proxy (0x4000, 0x8000) use.
DEFAULT_MARK_BASE = 0x6D70_0000
_MARK_SPAN = 0x2_0000
_UDP_BIT = 0x1_0000


def published_mark(base: int, protocol: Protocol, port: int) -> int:
    return base | (_UDP_BIT if protocol == "udp" else 0) | port


def decode_mark(base: int, mark: int) -> tuple[Protocol, int] | None:
    """(protocol, port) of one of our marks; None for a mark outside our range."""
    if not base <= mark < base + _MARK_SPAN:
        return None
    port = mark & 0xFFFF
    if port == 0:
        return None
    return ("udp" if mark & _UDP_BIT else "tcp"), port


def check_mark_base(base: int) -> None:
    if base & (_MARK_SPAN - 1) or not 0 < base <= 0xFFFF_FFFF - _MARK_SPAN:
        raise ValueError(f"fwmark base {base:#x} must be a multiple of {_MARK_SPAN:#x}")


class Firewall:
    """One nftables table (family ip) that belongs to the backend alone."""

    def __init__(self, table: str, mark_base: int, masquerade: bool) -> None:
        self.table = table
        self.mark_base = mark_base
        self.masquerade = masquerade

    async def _nft(self, script: str, *, missing_ok: bool = False) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                "nft",
                "-f",
                "-",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as error:
            raise BackendError("the ipvs backend needs the nft command (nftables)") from error
        _, err = await proc.communicate(script.encode())
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip()
            if missing_ok and "No such file or directory" in text:
                return
            raise BackendError(f"nft ({self.table}): {text.splitlines()[0] if text else '?'}")

    async def install(self, published: Iterable[tuple[Protocol, int]], vips: Iterable[str]) -> None:
        """Create (or re-create in place) the table, its chains and its rules, in one
        transaction, with exactly these published ports and VIPs in its map and set."""
        t = f"ip {self.table}"
        lines = [
            f"table {t} {{",
            "  map published { type inet_proto . inet_service : mark; }",
            "  set vips { type ipv4_addr; }",
            # the marks of published ports with traffic-policy=local: never masqueraded
            "  set local_marks { type mark; }",
            "  chain prerouting { type filter hook prerouting priority mangle; }",
            # a route chain, so that a mark set on a local client's packet reroutes it
            "  chain output { type route hook output priority mangle; }",
            "  chain postrouting { type nat hook postrouting priority srcnat; }",
            "}",
            f"flush chain {t} prerouting",
            f"flush chain {t} output",
            f"flush chain {t} postrouting",
            f"flush map {t} published",
            f"flush set {t} vips",
            f"flush set {t} local_marks",
        ]
        # Loopback destinations are left out: IPVS cannot NAT 127/8 to another host.
        mark = (
            "fib daddr type local ip daddr != 127.0.0.0/8 "
            "meta mark set meta l4proto . th dport map @published"
        )
        lines += [f"add rule {t} prerouting {mark}", f"add rule {t} output {mark}"]
        if self.masquerade:
            lines += [
                f"add rule {t} postrouting meta mark @local_marks return",
                f"add rule {t} postrouting meta mark and {0xFFFF_FFFF ^ (_MARK_SPAN - 1):#x}"
                f" == {self.mark_base:#x} masquerade",
                f"add rule {t} postrouting ct original ip daddr @vips masquerade",
            ]
        elements = [self._published_element(p, port) for p, port in sorted(set(published))]
        if elements:
            lines.append(f"add element {t} published {{ {', '.join(elements)} }}")
        addresses = sorted(set(vips))
        if addresses:
            lines.append(f"add element {t} vips {{ {', '.join(addresses)} }}")
        await self._nft("\n".join(lines) + "\n")

    def _published_element(self, protocol: Protocol, port: int) -> str:
        return f"{protocol} . {port} : {published_mark(self.mark_base, protocol, port):#x}"

    async def add_published(self, protocol: Protocol, port: int) -> None:
        await self._nft(
            f"add element ip {self.table} published "
            f"{{ {self._published_element(protocol, port)} }}\n"
        )

    async def remove_published(self, protocol: Protocol, port: int) -> None:
        await self._nft(
            f"delete element ip {self.table} published {{ {protocol} . {port} }}\n", missing_ok=True
        )

    async def set_local(self, protocol: Protocol, port: int, local: bool) -> None:
        """A published port's traffic policy: `local` ones are left out of the masquerade,
        so their tasks (this node's own: `lb.view`) see the client's address."""
        mark = published_mark(self.mark_base, protocol, port)
        verb = "add" if local else "delete"
        await self._nft(
            f"{verb} element ip {self.table} local_marks {{ {mark:#x} }}\n", missing_ok=not local
        )

    async def add_vip(self, address: str) -> None:
        await self._nft(f"add element ip {self.table} vips {{ {address} }}\n")

    async def remove_vip(self, address: str) -> None:
        await self._nft(f"delete element ip {self.table} vips {{ {address} }}\n", missing_ok=True)

    async def delete(self) -> None:
        await self._nft(f"delete table ip {self.table}\n", missing_ok=True)

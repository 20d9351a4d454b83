"""Who holds a port: sockets and their owning processes, read from /proc as `ss -lntup` does.

Used by `mesh doctor` (is each listener the agent's, and who is in its way)
and by the agent when a bind fails, so that its one-line refusal names the
holder (`dns 127.0.0.11:53 is in use by PID 1234 (dnsmasq) on udp
127.0.0.11:53`) instead of a bare `Address already in use`. Only this network
namespace is seen, which is the one a bind competes in.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: /proc/net states: a listening TCP socket, a bound UDP one.
TCP_LISTEN, UDP_BOUND = "0A", "07"


@dataclass(frozen=True, slots=True)
class Held:
    """One socket on a port: its bound address, its owner's uid and, if readable, PID."""

    protocol: str
    address: str  # 0.0.0.0 is the wildcard (:: is shown as 0.0.0.0 too)
    port: int
    uid: int
    pid: int | None


class SocketOwners:
    """Which processes hold a listening TCP or bound UDP port (from /proc, this netns)."""

    def __init__(self) -> None:
        self._inode_pid: dict[str, int] | None = None

    def holders(self, protocol: str, port: int) -> list[tuple[int, str]]:
        """(pid, bound address) of every socket on `port` whose owner can be read."""
        return [
            (held.pid, held.address)
            for held in self.sockets(protocol, port)
            if held.pid is not None
        ]

    def sockets(self, protocol: str, port: int, *, any_udp_state: bool = False) -> list[Held]:
        """Every listening TCP (bound UDP) socket on `port`; `any_udp_state`: connected
        UDP sockets too, which also keep a port from being bound."""
        found = []
        for inode, address, uid in _sockets(protocol, port, any_udp_state):
            found.append(Held(protocol, address, port, uid, self._pids().get(inode)))
        return found

    def _pids(self) -> dict[str, int]:
        if self._inode_pid is None:
            self._inode_pid = {}
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    for fd in (proc / "fd").iterdir():
                        target = os.readlink(fd)
                        if target.startswith("socket:["):
                            self._inode_pid.setdefault(target[8:-1], int(proc.name))
                except OSError:
                    continue  # gone, or not ours to read
        return self._inode_pid


def _sockets(protocol: str, port: int, any_udp_state: bool) -> Iterable[tuple[str, str, int]]:
    """(inode, address, uid) of the sockets on `port` in /proc/net/{protocol}{,6}."""
    state = TCP_LISTEN if protocol == "tcp" else UDP_BOUND
    for table in (f"/proc/net/{protocol}", f"/proc/net/{protocol}6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) <= 9:
                continue
            if fields[3] != state and not (any_udp_state and protocol == "udp"):
                continue
            local, local_port = fields[1].rsplit(":", 1)
            if int(local_port, 16) == port:
                address = address_of(local)
                yield fields[9], "0.0.0.0" if address == "::" else address, int(fields[7])


def in_the_way(address: str, held: str) -> bool:
    """Whether a socket bound to `held` collides with a bind to `address` (same port):
    the wildcard collides with every address."""
    return address in ("0.0.0.0", "::") or held in (address, "0.0.0.0")


def address_of(hexed: str) -> str:
    """An address as /proc/net shows it (little-endian hex words) in text form."""
    raw = bytes.fromhex(hexed)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return socket.inet_ntop(socket.AF_INET, words)
    if words[:12] == b"\0" * 10 + b"\xff\xff":  # an IPv4-mapped address
        return socket.inet_ntop(socket.AF_INET, words[12:])
    return socket.inet_ntop(socket.AF_INET6, words)


def family_of(pid: int) -> set[int]:
    """A process and every process it started (the agent's DNS and HTTP workers)."""
    family = {pid}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                family.add(int(proc.name))
    return family


def process_name(pid: int | None) -> str:
    if pid is None:
        return ""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def holder_of(
    protocol: str, host: str, port: int, *, ours: set[int], owners: SocketOwners | None = None
) -> Held | None:
    """The first socket not held by `ours` (PIDs) that keeps `host:port` from being bound."""
    owners = owners or SocketOwners()
    for held in owners.sockets(protocol, port, any_udp_state=True):
        if held.pid not in ours and in_the_way(host, held.address):
            return held
    return None


def in_use_by(held: Held) -> str:
    """`by PID 1234 (nginx) on tcp 0.0.0.0:80`: the holder as `ss -lntup` would show it."""
    on = f"on {held.protocol} {_where(held.address, held.port)}"
    if held.pid is None:
        return (
            f"by a process of uid {held.uid} that this user cannot see, {on} "
            f"(`sudo ss -lntup 'sport = :{held.port}'` names it)"
        )
    name = process_name(held.pid)
    return f"by PID {held.pid}{f' ({name})' if name else ''} {on}"


def bind_failure(
    role: str,
    protocols: Iterable[str],
    host: str,
    port: int,
    error: OSError,
    *,
    ours: set[int],
    owners: SocketOwners | None = None,
) -> str:
    """One line saying why `role` could not bind `host:port`, naming who holds it.

    `protocols`: those the role binds there (DNS and gossip: udp and tcp), searched
    in order for a holder; `ours`: the agent's own PIDs, whose sockets are not in
    the way (a half-started listener of its own).
    """
    where = _where(host, port)
    if error.errno != errno.EADDRINUSE:
        hint = ""
        if error.errno == errno.EACCES and 0 < port < 1024:
            hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        elif error.errno == errno.EADDRNOTAVAIL:
            hint = " (no interface of this host has that address)"
        return f"{role} {where} cannot be bound: {error.strerror or error}{hint}"
    owners = owners or SocketOwners()
    for protocol in protocols:
        held = holder_of(protocol, host, port, ours=ours, owners=owners)
        if held is not None:
            return f"{role} {where} is in use {in_use_by(held)}"
    for protocol in protocols:  # none foreign: another listener of the agent's own?
        held = holder_of(protocol, host, port, ours=set(), owners=owners)
        if held is not None and held.pid in ours:
            return (
                f"{role} {where} is in use by this agent itself, {in_use_by(held)}: "
                "two of its listeners are given one address and port"
            )
    return (
        f"{role} {where} is in use (no listening socket on it found in /proc; "
        f"`ss -lntup 'sport = :{port}'` may name the holder)"
    )

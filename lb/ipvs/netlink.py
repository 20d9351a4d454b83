"""A small typed adapter over pyroute2's IPVS generic-netlink socket.

pyroute2's `IPVS.service()`/`IPVS.dest()` map command names to netlink
commands, and 0.9.7 maps "update" to IPVS_CMD_DEL_* (an update deletes!); its
`IPVSDest` defaults to fwd_method 3 (direct routing) and its IPVSService guesses
the address family only for address services (a fwmark service needs `af` and
`netmask` given). So this module builds the messages itself, with the command,
flags and attributes spelled out, and sends them through pyroute2's socket:

- `service_message` / `dest_message` / `config_message` are pure: they return
  the message and flags, which tests decode to check what goes to the kernel.
- `IpvsNetlink` sends them and turns the kernel's answers into typed records
  (`ServiceEntry`, `DestEntry`, `Timeouts`) and its errors into `IpvsError`
  carrying the errno.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from pyroute2.ipvs import AsyncIPVS
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, genlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import ipvs as genl

from lb.netlink_thread import NetlinkThread

#: IP_VS_CONN_F_MASQ: the real server is reached by NAT (the default of ipvsadm -m).
FORWARD_MASQUERADE = 0
#: All 16 service flag bits are set from our value (none: no persistence, no hashing).
_FLAGS_ALL = {"flags": 0, "mask": 0xFFFF}
#: IP_VS_SVC_F_PERSISTENT: a client address keeps its real server (ipvsadm -p TIMEOUT).
FLAG_PERSISTENT = 0x0001
#: IP_VS_SVC_F_SCHED2, which `mh` reads as "hash the source port too" (mh-port):
#: Maglev per flow, as the other backends hash address and port.
FLAG_MH_PORT = 0x0010
_HOST_MASK = "255.255.255.255"


class Command(enum.Enum):
    ADD = "add"
    SET = "set"  # change in place: IPVS_CMD_SET_* (never pyroute2's "update")
    DELETE = "del"


_SERVICE_COMMANDS = {
    Command.ADD: (genl.IPVS_CMD_NEW_SERVICE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL),
    Command.SET: (genl.IPVS_CMD_SET_SERVICE, NLM_F_REQUEST | NLM_F_ACK),
    Command.DELETE: (genl.IPVS_CMD_DEL_SERVICE, NLM_F_REQUEST | NLM_F_ACK),
}
_DEST_COMMANDS = {
    Command.ADD: (genl.IPVS_CMD_NEW_DEST, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL),
    Command.SET: (genl.IPVS_CMD_SET_DEST, NLM_F_REQUEST | NLM_F_ACK),
    Command.DELETE: (genl.IPVS_CMD_DEL_DEST, NLM_F_REQUEST | NLM_F_ACK),
}


@dataclass(frozen=True, slots=True, order=True)
class ServiceId:
    """How IPVS names a service: protocol + address + port, or a firewall mark."""

    protocol: int = 0  # socket.IPPROTO_TCP / IPPROTO_UDP; 0 for a fwmark service
    address: str = ""
    port: int = 0
    fwmark: int = 0

    @classmethod
    def of_address(cls, protocol: int, address: str, port: int) -> ServiceId:
        return cls(protocol=protocol, address=address, port=port)

    @classmethod
    def of_fwmark(cls, fwmark: int) -> ServiceId:
        return cls(fwmark=fwmark)

    def __str__(self) -> str:
        if self.fwmark:
            return f"fwmark {self.fwmark:#x}"
        name = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}.get(self.protocol)
        return f"{name or self.protocol}/{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServiceStats:
    """The kernel's counts of one service since it was made (its 64-bit stats)."""

    connections: int
    bytes_in: int  # from clients (IPVS's InBytes)
    bytes_out: int  # to clients (OutBytes: NAT forwarding sees the answers too)


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    id: ServiceId
    scheduler: str
    stats: ServiceStats | None = field(default=None, compare=False)
    #: persistence timeout in seconds (0: none)
    persistence: int = 0


@dataclass(frozen=True, slots=True)
class DestEntry:
    address: str
    port: int
    weight: int
    forward: int = FORWARD_MASQUERADE
    #: the kernel's connection entries to it: established TCP (ActiveConn), and the
    #: others (InActConn: TCP closing or waiting, every UDP flow); read, never written
    active: int = field(default=0, compare=False)
    inactive: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """IPVS connection timeouts in seconds (per network namespace; 0 = leave as is)."""

    tcp: int
    tcp_fin: int
    udp: int


class IpvsError(Exception):
    """The kernel refused an IPVS request; `code` is its errno."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what}: {errno.errorcode.get(code, code)} {os.strerror(code)}")
        self.code = code


class _ConfigMessage(genlmsg):  # type: ignore[misc]
    """The IPVS config request with its timeouts as the u32 the kernel wants.

    pyroute2's ipvsmsg declares them "hex"; a subclass of it would share its
    compiled attribute table, so this is a sibling with explicit attribute numbers.
    """

    nla_map = (  # the numbers of linux/ip_vs.h's IPVS_CMD_ATTR_TIMEOUT_*
        (4, "IPVS_CMD_ATTR_TIMEOUT_TCP", "uint32"),
        (5, "IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", "uint32"),
        (6, "IPVS_CMD_ATTR_TIMEOUT_UDP", "uint32"),
    )


def _service_key_attrs(service: ServiceId) -> list[tuple[str, Any]]:
    if service.fwmark:
        return [("IPVS_SVC_ATTR_AF", socket.AF_INET), ("IPVS_SVC_ATTR_FWMARK", service.fwmark)]
    return [
        ("IPVS_SVC_ATTR_AF", socket.AF_INET),
        ("IPVS_SVC_ATTR_PROTOCOL", service.protocol),
        ("IPVS_SVC_ATTR_ADDR", service.address),
        ("IPVS_SVC_ATTR_PORT", service.port),
    ]


def _message(cmd: int, attrs: list[tuple[str, Any]], cls: type[genlmsg] = genl.ipvsmsg) -> Any:
    msg = cls()
    msg["cmd"] = cmd
    msg["version"] = genl.GENL_VERSION
    msg["attrs"] = attrs
    return msg


def service_message(
    command: Command, service: ServiceId, scheduler: str = "rr", persistence: int = 0
) -> tuple[Any, int]:
    """The request that adds, changes or deletes one service, and its netlink flags.

    `persistence` seconds > 0 make the service persistent (a client address
    keeps its real while it comes back within that time).
    """
    cmd, flags = _SERVICE_COMMANDS[command]
    attrs = _service_key_attrs(service)
    if command is not Command.DELETE:
        service_flags = FLAG_PERSISTENT if persistence > 0 else 0
        if scheduler == "mh":
            service_flags |= FLAG_MH_PORT
        # NEW and SET want the full entry; the kernel refuses one without these.
        attrs += [
            ("IPVS_SVC_ATTR_SCHED_NAME", scheduler),
            ("IPVS_SVC_ATTR_FLAGS", {**_FLAGS_ALL, "flags": service_flags}),
            ("IPVS_SVC_ATTR_TIMEOUT", max(persistence, 0)),
            ("IPVS_SVC_ATTR_NETMASK", _HOST_MASK),
        ]
    return _message(cmd, [("IPVS_CMD_ATTR_SERVICE", {"attrs": attrs})]), flags


def dest_message(command: Command, service: ServiceId, dest: DestEntry) -> tuple[Any, int]:
    """The request that adds, changes or deletes one real server of `service`."""
    cmd, flags = _DEST_COMMANDS[command]
    attrs: list[tuple[str, Any]] = [
        ("IPVS_DEST_ATTR_ADDR_FAMILY", socket.AF_INET),
        ("IPVS_DEST_ATTR_ADDR", dest.address),
        ("IPVS_DEST_ATTR_PORT", dest.port),
    ]
    if command is not Command.DELETE:
        attrs += [
            ("IPVS_DEST_ATTR_FWD_METHOD", dest.forward),
            ("IPVS_DEST_ATTR_WEIGHT", dest.weight),
            ("IPVS_DEST_ATTR_U_THRESH", 0),
            ("IPVS_DEST_ATTR_L_THRESH", 0),
        ]
    return _message(
        cmd,
        [
            ("IPVS_CMD_ATTR_SERVICE", {"attrs": _service_key_attrs(service)}),
            ("IPVS_CMD_ATTR_DEST", {"attrs": attrs}),
        ],
    ), flags


def config_message(timeouts: Timeouts) -> tuple[Any, int]:
    """IPVS_CMD_SET_CONFIG: the tcp, tcpfin and udp timeouts (ipvsadm --set)."""
    return _message(
        genl.IPVS_CMD_SET_CONFIG,
        [
            ("IPVS_CMD_ATTR_TIMEOUT_TCP", timeouts.tcp),
            ("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", timeouts.tcp_fin),
            ("IPVS_CMD_ATTR_TIMEOUT_UDP", timeouts.udp),
        ],
        _ConfigMessage,
    ), NLM_F_REQUEST | NLM_F_ACK


def _u32_from_hex(value: str) -> int:
    # pyroute2 decodes these attributes as a "hex" dump ("10:0e:00:00"): native-endian u32
    return int.from_bytes(bytes.fromhex(value.replace(":", "")), sys.byteorder)


def _attr(nla: Any, name: str, default: Any = None) -> Any:
    return nla.get_attr(name, default)


def parse_service(msg: Any) -> ServiceEntry:
    nla = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
    fwmark = _attr(nla, "IPVS_SVC_ATTR_FWMARK", 0) or 0
    if fwmark:
        service = ServiceId.of_fwmark(fwmark)
    else:
        service = ServiceId.of_address(
            _attr(nla, "IPVS_SVC_ATTR_PROTOCOL", 0),
            str(_attr(nla, "IPVS_SVC_ATTR_ADDR", "")),
            _attr(nla, "IPVS_SVC_ATTR_PORT", 0),
        )
    flags = _attr(nla, "IPVS_SVC_ATTR_FLAGS")
    bits = int(flags.get("flags", 0) if hasattr(flags, "get") else 0) if flags else 0
    timeout = int(_attr(nla, "IPVS_SVC_ATTR_TIMEOUT", 0) or 0)
    return ServiceEntry(
        service,
        str(_attr(nla, "IPVS_SVC_ATTR_SCHED_NAME", "")),
        parse_service_stats(nla),
        timeout if bits & FLAG_PERSISTENT else 0,
    )


def parse_service_stats(nla: Any) -> ServiceStats | None:
    """A service's counts: the 64-bit stats (kernel 4.1+), else the 32-bit ones."""
    stats = _attr(nla, "IPVS_SVC_ATTR_STATS64") or _attr(nla, "IPVS_SVC_ATTR_STATS")
    if stats is None:
        return None
    return ServiceStats(
        int(_attr(stats, "IPVS_STATS_ATTR_CONNS", 0) or 0),
        int(_attr(stats, "IPVS_STATS_ATTR_INBYTES", 0) or 0),
        int(_attr(stats, "IPVS_STATS_ATTR_OUTBYTES", 0) or 0),
    )


def parse_dest(msg: Any) -> DestEntry:
    nla = msg.get_attr("IPVS_CMD_ATTR_DEST")
    return DestEntry(
        str(_attr(nla, "IPVS_DEST_ATTR_ADDR")),
        _attr(nla, "IPVS_DEST_ATTR_PORT"),
        _attr(nla, "IPVS_DEST_ATTR_WEIGHT"),
        _attr(nla, "IPVS_DEST_ATTR_FWD_METHOD", FORWARD_MASQUERADE) & 0x7,
        int(_attr(nla, "IPVS_DEST_ATTR_ACTIVE_CONNS", 0) or 0),
        int(_attr(nla, "IPVS_DEST_ATTR_INACT_CONNS", 0) or 0),
    )


class IpvsNetlink:
    """One IPVS generic-netlink socket in the caller's network namespace.

    The socket lives on a `NetlinkThread` (pyroute2's async sockets do not run
    on uvloop, the agent's loop); every request is awaited from the caller's loop.
    """

    def __init__(self) -> None:
        self._sock: Any = None
        self._thread: NetlinkThread | None = None

    async def open(self) -> None:
        if self._thread is None:
            self._thread = NetlinkThread("ipvs-netlink")
        await self._thread.run(self._open())

    async def _open(self) -> None:
        sock = AsyncIPVS()
        try:
            await sock.setup_endpoint()  # resolves the "IPVS" genl family
        except NetlinkError as error:
            sock.close()
            raise IpvsError("IPVS generic netlink family (is ip_vs loaded?)", error.code) from error
        self._sock = sock

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._sock is not None:
            thread.call(self._close())
        thread.stop()

    async def _close(self) -> None:
        self._sock.close()
        self._sock = None

    async def _request(self, what: str, request: tuple[Any, int]) -> list[Any]:
        if self._sock is None or self._thread is None:
            raise RuntimeError("IpvsNetlink used before open()")
        return await self._thread.run(self._request_here(what, request))

    async def _request_here(self, what: str, request: tuple[Any, int]) -> list[Any]:
        msg, flags = request
        try:
            response = await self._sock.nlm_request(msg, msg_type=self._sock.prid, msg_flags=flags)
            return [m async for m in response]
        except NetlinkError as error:
            raise IpvsError(what, error.code) from error

    # -- services ---------------------------------------------------------------

    async def services(self) -> list[ServiceEntry]:
        msg = _message(genl.IPVS_CMD_GET_SERVICE, [])
        found = await self._request("dump services", (msg, NLM_F_REQUEST | NLM_F_DUMP))
        return [parse_service(m) for m in found]

    async def service(
        self, command: Command, service: ServiceId, scheduler: str = "rr", persistence: int = 0
    ) -> None:
        await self._request(
            f"{command.value} service {service}",
            service_message(command, service, scheduler, persistence),
        )

    # -- real servers -----------------------------------------------------------

    async def dests(self, service: ServiceId) -> list[DestEntry]:
        msg = _message(
            genl.IPVS_CMD_GET_DEST,
            [("IPVS_CMD_ATTR_SERVICE", {"attrs": _service_key_attrs(service)})],
        )
        found = await self._request(f"dump reals of {service}", (msg, NLM_F_REQUEST | NLM_F_DUMP))
        return [parse_dest(m) for m in found]

    async def dest(self, command: Command, service: ServiceId, dest: DestEntry) -> None:
        await self._request(
            f"{command.value} real {dest.address}:{dest.port} of {service}",
            dest_message(command, service, dest),
        )

    # -- timeouts ---------------------------------------------------------------

    async def set_timeouts(self, timeouts: Timeouts) -> None:
        await self._request("set timeouts", config_message(timeouts))

    async def timeouts(self) -> Timeouts:
        msg = _message(genl.IPVS_CMD_GET_CONFIG, [])
        [reply] = await self._request("get timeouts", (msg, NLM_F_REQUEST | NLM_F_ACK))
        return Timeouts(
            *(
                _u32_from_hex(reply.get_attr(f"IPVS_CMD_ATTR_TIMEOUT_{name}"))
                for name in ("TCP", "TCP_FIN", "UDP")
            )
        )

"""The IPVS backend's pieces that need no kernel: the netlink messages its adapter builds
(encoded to bytes and decoded back, as the kernel would read them), the fwmark
arithmetic and the choice of sysctls. The backend itself is proven on a real ip_vs
kernel by tests/kernel/test_ipvs_backend.py (run in a VM by test_ipvs_vm.py)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
from pyroute2.netlink.generic import ipvs as genl

from lb.backend import BackendError
from lb.ipvs import IpvsBackend
from lb.ipvs.backend import check_key, check_real
from lb.ipvs.firewall import DEFAULT_MARK_BASE, check_mark_base, decode_mark, published_mark
from lb.ipvs.host import kernel_version, swarm_sysctls
from lb.ipvs.netlink import (
    FLAG_MH_PORT,
    FLAG_PERSISTENT,
    FORWARD_MASQUERADE,
    Command,
    DestEntry,
    ServiceId,
    Timeouts,
    _u32_from_hex,
    config_message,
    dest_message,
    parse_dest,
    parse_service,
    service_message,
)
from lb.table import ANY_ADDRESS, DeleteReal, PutReal, PutService, Real, VirtualKey

VIP = ServiceId.of_address(socket.IPPROTO_TCP, "10.0.3.1", 8080)
MARKED = ServiceId.of_fwmark(0x6D70_7580)
REAL = DestEntry("10.0.2.11", 8000, 5)


def wire(request: tuple[Any, int]) -> tuple[Any, int]:
    """Encode the message to bytes and decode them with pyroute2's IPVS message class."""
    msg, flags = request
    msg["header"]["type"] = 0x20  # any genl family id: the kernel assigns one at run time
    msg.encode()
    decoded = genl.ipvsmsg(msg.data)
    decoded.decode()
    return decoded, flags


def attrs(decoded: Any, nla: str) -> dict[str, Any]:
    return dict(decoded.get_attr(nla)["attrs"])


def test_updates_are_set_commands_never_a_delete() -> None:
    # pyroute2 0.9.7's IPVS.service("update")/dest("update") sends IPVS_CMD_DEL_*.
    service, service_flags = wire(service_message(Command.SET, VIP, "wrr"))
    dest, dest_flags = wire(dest_message(Command.SET, VIP, REAL))
    assert service["cmd"] == genl.IPVS_CMD_SET_SERVICE
    assert dest["cmd"] == genl.IPVS_CMD_SET_DEST
    for flags in (service_flags, dest_flags):
        assert not flags & (NLM_F_CREATE | NLM_F_EXCL)
    assert attrs(service, "IPVS_CMD_ATTR_SERVICE")["IPVS_SVC_ATTR_SCHED_NAME"] == "wrr"
    assert attrs(dest, "IPVS_CMD_ATTR_DEST")["IPVS_DEST_ATTR_WEIGHT"] == 5


def test_add_and_delete_commands() -> None:
    assert wire(service_message(Command.ADD, VIP))[0]["cmd"] == genl.IPVS_CMD_NEW_SERVICE
    assert wire(service_message(Command.DELETE, VIP))[0]["cmd"] == genl.IPVS_CMD_DEL_SERVICE
    assert wire(dest_message(Command.ADD, VIP, REAL))[0]["cmd"] == genl.IPVS_CMD_NEW_DEST
    assert wire(dest_message(Command.DELETE, VIP, REAL))[0]["cmd"] == genl.IPVS_CMD_DEL_DEST
    _, flags = service_message(Command.ADD, VIP)
    assert flags & NLM_F_CREATE and flags & NLM_F_EXCL  # an add never silently replaces


def test_address_service_is_the_full_entry_the_kernel_requires() -> None:
    decoded, _ = wire(service_message(Command.ADD, VIP, "lc"))
    assert attrs(decoded, "IPVS_CMD_ATTR_SERVICE") == {
        "IPVS_SVC_ATTR_AF": socket.AF_INET,
        "IPVS_SVC_ATTR_PROTOCOL": socket.IPPROTO_TCP,
        "IPVS_SVC_ATTR_ADDR": "10.0.3.1",
        "IPVS_SVC_ATTR_PORT": 8080,
        "IPVS_SVC_ATTR_SCHED_NAME": "lc",
        "IPVS_SVC_ATTR_FLAGS": {"flags": 0, "mask": 0xFFFF},
        "IPVS_SVC_ATTR_TIMEOUT": 0,
        "IPVS_SVC_ATTR_NETMASK": "255.255.255.255",
    }
    assert parse_service(decoded).id == VIP


def test_fwmark_service_names_its_family_and_netmask() -> None:
    decoded, _ = wire(service_message(Command.ADD, MARKED))
    got = attrs(decoded, "IPVS_CMD_ATTR_SERVICE")
    assert got["IPVS_SVC_ATTR_AF"] == socket.AF_INET
    assert got["IPVS_SVC_ATTR_FWMARK"] == 0x6D70_7580
    assert got["IPVS_SVC_ATTR_NETMASK"] == "255.255.255.255"
    assert "IPVS_SVC_ATTR_ADDR" not in got and "IPVS_SVC_ATTR_PROTOCOL" not in got
    assert parse_service(decoded).id == MARKED


def test_delete_sends_only_the_key() -> None:
    decoded, _ = wire(service_message(Command.DELETE, VIP))
    assert set(attrs(decoded, "IPVS_CMD_ATTR_SERVICE")) == {
        "IPVS_SVC_ATTR_AF",
        "IPVS_SVC_ATTR_PROTOCOL",
        "IPVS_SVC_ATTR_ADDR",
        "IPVS_SVC_ATTR_PORT",
    }


def test_reals_are_reached_by_nat() -> None:
    # pyroute2's IPVSDest defaults to fwd_method 3: direct routing.
    decoded, _ = wire(dest_message(Command.ADD, MARKED, REAL))
    got = attrs(decoded, "IPVS_CMD_ATTR_DEST")
    assert got["IPVS_DEST_ATTR_FWD_METHOD"] == FORWARD_MASQUERADE == 0
    assert (
        got["IPVS_DEST_ATTR_ADDR_FAMILY"],
        got["IPVS_DEST_ATTR_ADDR"],
        got["IPVS_DEST_ATTR_PORT"],
    ) == (socket.AF_INET, "10.0.2.11", 8000)
    assert attrs(decoded, "IPVS_CMD_ATTR_SERVICE")["IPVS_SVC_ATTR_FWMARK"] == 0x6D70_7580
    assert parse_dest(decoded) == REAL


def test_timeouts_are_u32_attributes() -> None:
    decoded, _ = wire(config_message(Timeouts(tcp=7800, tcp_fin=900, udp=300)))
    assert decoded["cmd"] == genl.IPVS_CMD_SET_CONFIG
    assert [
        _u32_from_hex(decoded.get_attr(f"IPVS_CMD_ATTR_TIMEOUT_{name}"))
        for name in ("TCP", "TCP_FIN", "UDP")
    ] == [7800, 900, 300]


def test_published_marks_round_trip_and_stay_in_range() -> None:
    for protocol, port in (("tcp", 1), ("tcp", 30080), ("udp", 53), ("udp", 65535)):
        mark = published_mark(DEFAULT_MARK_BASE, protocol, port)  # type: ignore[arg-type]
        assert decode_mark(DEFAULT_MARK_BASE, mark) == (protocol, port)
    assert published_mark(DEFAULT_MARK_BASE, "tcp", 80) != published_mark(
        DEFAULT_MARK_BASE, "udp", 80
    )
    for foreign in (7, 256, DEFAULT_MARK_BASE, DEFAULT_MARK_BASE + 0x2_0000, 0x4000):
        assert decode_mark(DEFAULT_MARK_BASE, foreign) is None


def test_mark_base_must_leave_room_for_protocol_and_port() -> None:
    check_mark_base(0x0100_0000)
    for bad in (0, 0x6D70_0100, 0xFFFF_0000):
        with pytest.raises(ValueError, match="fwmark base"):
            check_mark_base(bad)
    with pytest.raises(ValueError, match="fwmark base"):
        IpvsBackend(mark_base=0x1234)


def test_sysctls_follow_swarm_and_the_kernel_fix_for_connection_reuse() -> None:
    old, new = swarm_sysctls((5, 4)), swarm_sysctls((6, 1))
    for values in (old, new):
        assert values["net/ipv4/vs/conntrack"] == "1"
        assert values["net/ipv4/vs/expire_nodest_conn"] == "1"
        assert values["net/ipv4/vs/expire_quiescent_template"] == "1"
    assert old["net/ipv4/vs/conn_reuse_mode"] == "0"
    assert new["net/ipv4/vs/conn_reuse_mode"] == "1"
    assert kernel_version("6.1.0-26-amd64") == (6, 1)
    assert kernel_version("5.10.0") == (5, 10)
    assert kernel_version("4.19rc1") == (4, 19)
    assert kernel_version("garbage") == (0, 0)


@pytest.mark.parametrize(
    "key",
    [
        VirtualKey("sctp", "10.0.3.1", 80),  # type: ignore[arg-type]
        VirtualKey("tcp", "10.0.3.1", 0),
        VirtualKey("tcp", "10.0.3.1", 70000),
        VirtualKey("udp", ANY_ADDRESS, -1),
        VirtualKey("tcp", "fd00::1", 80),
        VirtualKey("tcp", "not-an-address", 80),
    ],
)
def test_keys_ipvs_cannot_take_are_clear_errors(key: VirtualKey) -> None:
    with pytest.raises(BackendError, match="ipvs: "):
        check_key(key)


@pytest.mark.parametrize(
    "real", [Real("10.0.2.300", 80), Real("::1", 80), Real("10.0.2.1", 0), Real("10.0.2.1", 65536)]
)
def test_reals_ipvs_cannot_take_are_clear_errors(real: Real) -> None:
    with pytest.raises(BackendError, match="ipvs: "):
        check_real(real)
    check_key(VirtualKey("tcp", ANY_ADDRESS, 30080))
    check_real(Real("10.0.2.1", 8080))


class _Recorder:
    """Stands in for the backend's three kernel parts (IPVS netlink, the VIP device, the
    nft table) and records each call that would reach the kernel. The kernel behaviour
    itself is proven in the VM (tests/kernel); this checks only the count per op."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return {"services": [], "dests": [], "addresses": set()}.get(name)

        return call

    def close(self) -> None:
        pass


async def test_one_change_among_ten_thousand_reals_costs_one_kernel_call() -> None:
    backend = IpvsBackend(set_sysctls=False)
    kernel = _Recorder()
    backend._ipvs = backend._device = backend._firewall = kernel  # type: ignore[assignment]
    await backend.start({})
    key = VirtualKey("tcp", "10.0.3.1", 80)
    reals = [Real(f"10.1.{i // 250}.{i % 250 + 1}", 8080) for i in range(10_000)]
    await backend.apply([PutService(key), *(PutReal(key, real, 1) for real in reals)])
    for ops, expected in (
        ([PutReal(key, reals[5000], 0)], ["dest"]),  # drain
        ([DeleteReal(key, reals[5000])], ["dest"]),  # remove
        ([PutReal(key, Real("10.2.0.1", 8080), 1)], ["dest"]),  # add
        ([PutReal(key, reals[42], 1)], []),  # unchanged
        ([PutService(VirtualKey("tcp", "10.0.3.1", 443))], ["service"]),
        ([PutService(VirtualKey("udp", "10.0.3.2", 53))], ["add", "add_vip", "service"]),
    ):  # a new VIP
        kernel.calls.clear()
        await backend.apply(ops)
        assert kernel.calls == expected, ops


def test_a_service_dump_gives_its_stats_and_a_real_dump_its_connection_entries() -> None:
    """The kernel's answers, encoded as the kernel does and decoded by pyroute2."""
    from lb.ipvs.netlink import ServiceStats, _message

    stats = {
        "attrs": [
            ("IPVS_STATS_ATTR_CONNS", 7),
            ("IPVS_STATS_ATTR_INPKTS", 70),
            ("IPVS_STATS_ATTR_OUTPKTS", 60),
            ("IPVS_STATS_ATTR_INBYTES", 5_000_000_000),  # past 32 bits: the 64-bit stats
            ("IPVS_STATS_ATTR_OUTBYTES", 1234),
        ]
    }
    service_attrs = [
        ("IPVS_SVC_ATTR_AF", socket.AF_INET),
        ("IPVS_SVC_ATTR_PROTOCOL", socket.IPPROTO_TCP),
        ("IPVS_SVC_ATTR_ADDR", "10.0.3.1"),
        ("IPVS_SVC_ATTR_PORT", 8080),
        ("IPVS_SVC_ATTR_SCHED_NAME", "rr"),
        ("IPVS_SVC_ATTR_STATS64", stats),
    ]
    msg = _message(genl.IPVS_CMD_NEW_SERVICE, [("IPVS_CMD_ATTR_SERVICE", {"attrs": service_attrs})])
    entry = parse_service(wire((msg, 0))[0])
    assert entry.id == VIP
    assert entry.stats == ServiceStats(connections=7, bytes_in=5_000_000_000, bytes_out=1234)
    dest_attrs = [
        ("IPVS_DEST_ATTR_ADDR_FAMILY", socket.AF_INET),
        ("IPVS_DEST_ATTR_ADDR", "10.0.2.11"),
        ("IPVS_DEST_ATTR_PORT", 8000),
        ("IPVS_DEST_ATTR_WEIGHT", 5),
        ("IPVS_DEST_ATTR_FWD_METHOD", 0),
        ("IPVS_DEST_ATTR_ACTIVE_CONNS", 3),
        ("IPVS_DEST_ATTR_INACT_CONNS", 2),
    ]
    msg = _message(genl.IPVS_CMD_NEW_DEST, [("IPVS_CMD_ATTR_DEST", {"attrs": dest_attrs})])
    dest = parse_dest(wire((msg, 0))[0])
    assert dest == REAL and (dest.active, dest.inactive) == (3, 2)


def test_affinity_is_persistence_and_maglev_hashes_the_port() -> None:
    decoded, _ = wire(service_message(Command.ADD, VIP, "rr", persistence=300))
    service = attrs(decoded, "IPVS_CMD_ATTR_SERVICE")
    assert service["IPVS_SVC_ATTR_FLAGS"] == {"flags": FLAG_PERSISTENT, "mask": 0xFFFF}
    assert service["IPVS_SVC_ATTR_TIMEOUT"] == 300
    assert parse_service(decoded).persistence == 300
    decoded, _ = wire(service_message(Command.SET, VIP, "mh"))
    service = attrs(decoded, "IPVS_CMD_ATTR_SERVICE")
    assert service["IPVS_SVC_ATTR_SCHED_NAME"] == "mh"
    assert service["IPVS_SVC_ATTR_FLAGS"] == {"flags": FLAG_MH_PORT, "mask": 0xFFFF}
    assert parse_service(decoded).persistence == 0
